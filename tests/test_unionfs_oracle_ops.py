"""Single operations whose result the kernel's overlayfs decides: the same layers, the same call on
lamina and on the kernel, the same outcome (as root: the kernel mounts overlayfs for root only)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from test_unionfs_mount import kernel_mount, kernel_umount

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(os.geteuid() != 0, reason="the kernel's overlayfs needs root")]

Layers = tuple[Path, Path, Path]
Outcome = object


def _layers(base: Path, fill: Callable[[Path, Path], None]) -> Layers:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    fill(lower, upper)
    return lower, upper, work


def on_both(tmp_path: Path, union_mount: Callable, fill: Callable[[Path, Path], None],
            act: Callable[[Path], Outcome]) -> tuple[Outcome, Outcome]:
    """(kernel's outcome, lamina's outcome) of ``act(mountpoint)`` on layers made by ``fill``."""
    k_lower, k_upper, k_work = _layers(tmp_path / "kernel", fill)
    kmnt = tmp_path / "kmnt"
    kernel_mount([k_lower], k_upper, k_work, kmnt)
    try:
        expected = act(kmnt)
    finally:
        kernel_umount(kmnt)
    lower, upper, work = _layers(tmp_path / "lamina", fill)
    ours = act(union_mount([lower], upper, work).mountpoint)
    return expected, ours


def _files(lower: Path, upper: Path) -> None:
    (lower / "low").write_bytes(b"lower data\n")
    (upper / "up").write_bytes(b"upper data\n")
    for target in ("low", "up"):
        os.symlink(target, lower / f"sym1-{target}")
        os.symlink(f"sym1-{target}", lower / f"sym2-{target}")


@pytest.mark.parametrize("name", ["low", "up", "sym1-low", "sym2-low", "sym1-up", "sym2-up"])
@pytest.mark.parametrize("extra", [0, os.O_CREAT], ids=["trunc", "creat-trunc"])
def test_read_only_open_with_o_trunc_truncates(tmp_path: Path, union_mount: Callable, name: str,
                                              extra: int) -> None:
    """unionmount-testsuite's open-trunc, open-creat-trunc, sym1-trunc, sym2-trunc."""

    def act(m: Path) -> Outcome:
        fd = os.open(m / name, os.O_RDONLY | os.O_TRUNC | extra, 0o644)
        try:
            read = os.read(fd, 100)
        finally:
            os.close(fd)
        target = os.path.realpath(m / name)
        return read, os.stat(target).st_size, Path(target).read_bytes(), os.stat(m / "low").st_size

    expected, ours = on_both(tmp_path, union_mount, _files, act)
    assert expected == (b"", 0, b"", 0 if "low" in name else 11)
    assert ours == expected
    assert (tmp_path / "lamina" / "lower" / "low").read_bytes() == b"lower data\n"  # lower untouched


def _objects(lower: Path, upper: Path) -> None:
    for layer, prefix in ((lower, "low"), (upper, "up")):
        (layer / f"{prefix}-file").write_bytes(b"x")
        (layer / f"{prefix}-dir").mkdir()
        os.mkfifo(layer / f"{prefix}-fifo")
        os.symlink(f"{prefix}-file", layer / f"{prefix}-link")
        for name in ("file", "dir", "fifo"):
            os.chmod(layer / f"{prefix}-{name}", 0o751)


@pytest.mark.parametrize("name", ["file", "dir", "fifo", "link"])
@pytest.mark.parametrize("layer", ["low", "up"])
def test_chown_to_minus_one_stamps_ctime(tmp_path: Path, union_mount: Callable, layer: str, name: str) -> None:
    """chown(f, -1, -1) changes nothing but ctime (pjdfstest chown/00.t marks the ctime check TODO
    on Linux for this reason: POSIX allows either)."""
    path = f"{layer}-{name}"

    def act(m: Path) -> Outcome:
        before = os.lstat(m / path)
        time.sleep(0.05)  # past the clock's granularity, so a new stamp shows
        os.chown(m / path, -1, -1, follow_symlinks=False)
        after = os.lstat(m / path)
        return after.st_ctime_ns > before.st_ctime_ns, stat.filemode(after.st_mode), after.st_uid, after.st_gid, after.st_mtime_ns == before.st_mtime_ns

    expected, ours = on_both(tmp_path, union_mount, _objects, act)
    assert ours == expected


@pytest.mark.parametrize("layer", ["low", "up"])
def test_atime_after_a_read_is_the_backing_files(tmp_path: Path, union_mount: Callable, layer: str) -> None:
    """A read moves atime (relatime: the old atime lies before mtime); a stat after it, with the
    attributes from before the read cached, shows the new one."""
    path = f"{layer}-file"

    def act(m: Path) -> Outcome:
        os.utime(m / path, ns=(10**18, 2 * 10**18))
        before = os.stat(m / path).st_atime_ns
        (m / path).read_bytes()
        return before, os.stat(m / path).st_atime_ns > before

    expected, ours = on_both(tmp_path, union_mount, _objects, act)
    assert expected == (10**18, True)
    assert ours == expected


def _nested(lower: Path, upper: Path) -> None:
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "f").write_bytes(b"data")
    (lower / "g").write_bytes(b"data")
    for p in (lower / "a" / "b" / "f", lower / "a" / "b", lower / "a", lower / "g"):
        os.utime(p, (10**9, 10**9))


@pytest.mark.parametrize("path", ["g", "a/b/f"])
def test_copy_up_on_open_for_writing_shows_new_ctimes(tmp_path: Path, union_mount: Callable, path: str) -> None:
    """open(O_WRONLY) of a lower file copies it up (no write follows): stat then shows the copy's
    ctime and its parents' new ctimes, as the kernel's overlayfs does, not what was cached before."""
    chain = [path, *[str(p) for p in Path(path).parents if str(p) != "."], ""]

    def act(m: Path) -> Outcome:
        before = [os.stat(m / p) for p in chain]
        time.sleep(0.05)
        os.close(os.open(m / path, os.O_WRONLY))
        after = [os.stat(m / p) for p in chain]
        # (Not the directories' st_blocks: the kernel's copies carry xattrs that take a block.)
        return [(a.st_ctime_ns > b.st_ctime_ns, a.st_mtime_ns == b.st_mtime_ns,
                 stat.S_ISDIR(a.st_mode) or a.st_blocks == b.st_blocks) for b, a in zip(before, after, strict=True)]

    expected, ours = on_both(tmp_path, union_mount, _nested, act)
    assert ours == expected
