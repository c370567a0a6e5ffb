"""``lamina diff`` (runner.diff) against podman's answer for the same container changes.

The oracle: podman (containers/storage's overlay driver, as root) diffs a container whose /etc was
removed and made again (an opaque directory in the upper): it reports the directory itself as
deleted, ``D /etc``, and what the new /etc holds as ``A`` or ``C``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from test_unionfs_view import whiteout

from runner.diff import changes
from unionfs.core import ondisk
from unionfs.core.stack import LayerStack

# `podman diff` on containers/storage 1.5x / podman 5 for the changes made in change_root below.
PODMAN_ANSWER = [("C", "/bin"), ("D", "/bin/busybox"), ("D", "/etc"), ("C", "/etc/passwd"),
                 ("C", "/etc/sub"), ("A", "/etc/sub/g"), ("A", "/newdir")]


def make_image_root(root: Path) -> None:
    for d in ("bin", "etc/sub"):
        (root / d).mkdir(parents=True)
    (root / "bin" / "busybox").write_text("not really\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "sub" / "f").write_text("x\n")


def change_root(root: Path) -> None:
    """What a process in the container does: delete a file, replace /etc, add a directory."""
    (root / "bin" / "busybox").unlink()
    shutil.rmtree(root / "etc")
    (root / "etc" / "sub").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("new\n")
    (root / "etc" / "sub" / "g").write_text("n\n")
    (root / "newdir").mkdir()


def test_opaque_directory_is_reported_as_podman_does(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    make_image_root(lower)
    # The upper the kernel's overlayfs leaves for change_root (as podman's run below shows).
    (upper / "bin").mkdir(parents=True)
    whiteout(upper / "bin", "busybox")
    (upper / "etc" / "sub").mkdir(parents=True)
    ondisk.mark_opaque(str(upper / "etc"))
    (upper / "etc" / "passwd").write_text("new\n")
    (upper / "etc" / "sub" / "g").write_text("n\n")
    (upper / "newdir").mkdir()
    assert changes(upper, LayerStack.from_top_down([lower])) == PODMAN_ANSWER


def test_opaque_directory_new_to_the_image_is_added(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    make_image_root(lower)
    (upper / "fresh").mkdir(parents=True)
    ondisk.mark_opaque(str(upper / "fresh"))
    assert changes(upper, LayerStack.from_top_down([lower])) == [("A", "/fresh")]


def _podman(tmp_path: Path, runroot: Path) -> Callable[..., str]:
    if os.geteuid() != 0:
        pytest.skip("podman's overlay storage runs as root here")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    base = ["podman", "--root", str(tmp_path / "podman-root"), "--runroot", str(runroot),
            "--storage-driver", "overlay"]

    def run(*args: str) -> str:
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.skip(f"podman {args[0]} failed here: {result.stderr.strip()[-300:]}")
        return result.stdout.strip()
    return run


def test_diff_agrees_with_podman(tmp_path: Path) -> None:
    runroot = Path(tempfile.mkdtemp(prefix="lamina-pd-"))  # podman wants at most 50 characters
    try:
        _diff_agrees_with_podman(tmp_path, _podman(tmp_path, runroot))
    finally:
        subprocess.run(["podman", "--root", str(tmp_path / "podman-root"), "--runroot", str(runroot),
                        "--storage-driver", "overlay", "system", "reset", "-f"], capture_output=True, timeout=120)
        shutil.rmtree(runroot, ignore_errors=True)


def _diff_agrees_with_podman(tmp_path: Path, podman: Callable[..., str]) -> None:
    rootfs = tmp_path / "rootfs"
    make_image_root(rootfs)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tmp_path / "img.tar"), "."], check=True)
    podman("import", str(tmp_path / "img.tar"), "localhost/lamina-diff-test:1")
    podman("create", "--name", "difftest", "localhost/lamina-diff-test:1", "/bin/busybox", "true")
    merged = Path(podman("mount", "difftest"))
    try:
        change_root(merged)
    finally:
        podman("umount", "difftest")
    answer = [tuple(line.split(" ", 1)) for line in podman("diff", "difftest").splitlines()]
    upper = Path(podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "difftest"))
    lowers = podman("inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", "difftest").split(":")
    assert answer == PODMAN_ANSWER
    assert changes(upper, LayerStack.from_top_down(lowers)) == sorted(answer, key=lambda a: a[1])
