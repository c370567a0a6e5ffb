"""fallocate(2) through a mounted union, with the kernel's overlayfs as the oracle.

pyfuse3 cannot receive FALLOCATE; unionfs.lowlevel_ops gives libfuse's session the operation
(see its docstring). Every test runs with that patch in place and with every patch turned off
(LAMINA_NO_PATCHES=1), when fallocate answers EOPNOTSUPP and changes nothing.

The cases (tests/fallocate_cases.py): every mode the kernel's FUSE client forwards (allocate, keep
size, punch hole, zero range with and without keep size) and those it does not (collapse, insert,
unshare, punch hole without keep size), on a file still in the lower layer (copied up first) and
on a new file, over ranges inside, across and past the end of the file, and an invalid one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import fallocate_cases as cases
from unionfs.startup import NO_PATCHES_ENV

pytestmark = [pytest.mark.fuse]

UNCHANGED = {"size": len(cases.CONTENT), "read": len(cases.CONTENT),
             "sha256": __import__("hashlib").sha256(cases.CONTENT).hexdigest()[:16]}
COMPARED = ("result", "size", "fstat_size", "blocks", "read", "sha256")


@pytest.fixture(params=["patched", "plain"])
def patched(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """True: the FALLOCATE patch is allowed; False: LAMINA_NO_PATCHES=1 (servers inherit it)."""
    if request.param == "plain":
        monkeypatch.setenv(NO_PATCHES_ENV, "1")
    else:
        monkeypatch.delenv(NO_PATCHES_ENV, raising=False)
    return bool(request.param == "patched")


def layers(base: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    cases.prepare_lower(str(lower))
    return lower, upper, work, mnt


def kernel_outcomes(base: Path) -> dict[str, dict[str, object]]:
    """The cases on the kernel's overlayfs (root only)."""
    lower, upper, work, mnt = layers(base)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)], check=True)
    try:
        return cases.run_cases(str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fuse_overlayfs_outcomes(base: Path) -> dict[str, dict[str, object]]:
    """The cases on fuse-overlayfs: another FUSE union, so refused the same modes as we are."""
    lower, upper, work, mnt = layers(base)
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)],
                   check=True, capture_output=True)
    try:
        return cases.run_cases(str(mnt))
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def check_against_kernel(ours: dict[str, dict[str, object]], kernel: dict[str, dict[str, object]],
                         patched: bool) -> None:
    assert ours.keys() == kernel.keys()
    for name, origin, mode, _offset, length in cases.case_names():
        mine, theirs = ours[name], kernel[name]
        if mode in cases.FORWARDED.values() and patched:
            assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}, (name, origin)
        else:
            # Collapse, insert and unshare cannot pass through FUSE (fuse-overlayfs answers the same);
            # an empty range is refused by the VFS before any filesystem is asked.
            assert mine["result"] == ("EINVAL" if length <= 0 else "EOPNOTSUPP"), (name, mine, theirs)
            assert {k: mine[k] for k in UNCHANGED} == UNCHANGED, (name, mine)
    if patched:
        # the cases must exercise real changes, not only errors
        assert sum(o["result"] == "ok" for o in ours.values()) >= 30


@pytest.mark.root
def test_every_mode_matches_kernel_overlayfs(tmp_path: Path, union_mount: Callable, patched: bool) -> None:
    kernel = kernel_outcomes(tmp_path / "kernel")
    lower, upper, work, mnt = layers(tmp_path / "lamina")
    union_mount([lower], upper, work, mountpoint=mnt)
    ours = cases.run_cases(str(mnt))
    check_against_kernel(ours, kernel, patched)
    # What the mount reports after every call is the upper file's truth, although attributes were
    # cached before it (and the open copied the lower files up).
    for name, outcome in ours.items():
        st = os.stat(upper / name)
        assert (outcome["size"], outcome["blocks"], outcome["mtime_ns"], outcome["ctime_ns"]) == \
            (st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns), name
    if patched and shutil.which("fuse-overlayfs"):
        other = fuse_overlayfs_outcomes(tmp_path / "fuse-overlayfs")
        for name, outcome in ours.items():
            assert {k: outcome[k] for k in COMPARED} == {k: other[name][k] for k in COMPARED}, name
    # the lower layer is never changed: the lower files were copied up first
    for name, origin, *_ in cases.case_names():
        if origin == "lower":
            assert (lower / name).read_bytes() == cases.CONTENT


@pytest.mark.root
def test_fallocate_on_a_lower_file_opened_before_a_big_copy_up(tmp_path: Path, union_mount: Callable,
                                                               patched: bool) -> None:
    """A writable open of a big lower file defers its copy-up; fallocate does it first."""
    lower, upper, work, mnt = layers(tmp_path)
    big = bytes(range(256)) * (8 << 12)  # 8 MiB: above the deferred copy-up threshold
    (lower / "big").write_bytes(big)
    union_mount([lower], upper, work, mountpoint=mnt)
    fd = os.open(mnt / "big", os.O_RDWR)
    try:
        result = cases._fallocate(fd, cases.FALLOC_FL_PUNCH_HOLE | cases.FALLOC_FL_KEEP_SIZE, 4096, 8192)
    finally:
        os.close(fd)
    data = (mnt / "big").read_bytes()
    if patched:
        assert result == "ok"
        assert data == big[:4096] + bytes(8192) + big[12288:]
        assert (upper / "big").read_bytes() == data
    else:
        assert result == "EOPNOTSUPP" and data == big
    assert (lower / "big").read_bytes() == big


@pytest.mark.root
@pytest.mark.unprivileged
def test_unprivileged_user_matches_kernel_overlayfs(unpriv, tmp_path: Path, patched: bool) -> None:
    kernel = kernel_outcomes(tmp_path / "kernel")
    base = unpriv.workdir / "fallocate"
    lower, upper, work, mnt = layers(base)
    script = base / "fallocate_cases.py"
    shutil.copy(cases.__file__, script)
    runner = base / "run.sh"
    runner.write_text(f'set -e\nlamina-unionfs -o lowerdir={lower},upperdir={upper},workdir={work} {mnt}\n'
                      f'trap "fusermount3 -u {mnt}" EXIT\nlamina-python {script} {mnt}\n')
    unpriv.chown_tree(base)
    env = {NO_PATCHES_ENV: "" if patched else "1"}
    r = unpriv.run(["sh", str(runner)], env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    check_against_kernel(json.loads(r.stdout), kernel, patched)
