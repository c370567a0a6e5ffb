"""The union filesystem through a real kernel mount: semantics, the kernel's overlayfs as oracle,
the command line, the Python mount API."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core.stack import LayerStack
from unionfs.mount import MountSpec, command_line, mount_union, open_union_mount

pytestmark = pytest.mark.fuse
IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parent.parent
root_only = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def make_layers(base: Path) -> tuple[list[Path], Path, Path]:
    """Two lowers (top first) in the kernel's format, plus an empty upper and workdir."""
    l0, l1, upper, work = (base / n for n in ("l0", "l1", "upper", "work"))
    for d in (l0, l1, upper, work):
        d.mkdir(parents=True)
    (l1 / "etc").mkdir()
    (l1 / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (l1 / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (l1 / "bin").mkdir()
    (l1 / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(l1 / "bin" / "tool", 0o755)
    (l1 / "tree" / "a" / "b").mkdir(parents=True)
    for i in range(30):
        (l1 / "tree" / f"f{i}").write_text(f"file {i}\n")
    (l1 / "tree" / "a" / "b" / "deep").write_text("deep\n")
    (l1 / "gone").write_text("hidden by l0\n")
    (l1 / "sgdir").mkdir()
    os.chmod(l1 / "sgdir", 0o2775)
    (l1 / "sgdir" / "x").write_text("x")
    os.mkfifo(l1 / "fifo")
    os.symlink("etc/passwd", l1 / "link")
    (l1 / "hl1").write_text("hardlinked\n")
    os.link(l1 / "hl1", l1 / "hl2")
    (l1 / "rmme" / "sub").mkdir(parents=True)
    (l1 / "rmme" / "sub" / "f").write_text("f")
    (l0 / "etc").mkdir()
    (l0 / "etc" / "hosts").write_text("127.0.0.1 top\n")
    (l0 / "tree").mkdir()
    (l0 / "tree" / "top").write_text("top\n")
    (l1 / "opq").mkdir()
    (l1 / "opq" / "under").write_text("u")
    (l0 / "opq").mkdir()
    (l0 / "opq" / "over").write_text("o")
    (l0 / "empty-lower").mkdir()
    if IS_ROOT:
        os.mknod(l0 / "gone", stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(l0 / "opq", "trusted.overlay.opaque", b"y")
        f = l1 / "bin" / "suid"
        f.write_text("suid")
        os.chown(f, 1000, 1000)
        os.chmod(f, 0o4755)
        os.chown(l1 / "link", 1000, 1000, follow_symlinks=False)
        os.utime(l1 / "link", ns=(10**9, 10**9), follow_symlinks=False)
        os.chown(l1 / "sgdir", 0, 1000)
    else:
        (l0 / ".wh.gone").write_text("")
        (l0 / "opq" / ".wh..wh..opq").write_text("")
    return [l0, l1], upper, work


def scenario(m: Path) -> None:
    """The same sequence of changes, run on lamina and on the kernel's overlayfs."""
    with open(m / "etc" / "passwd", "a") as f:
        f.write("user:x:1000:1000::/home/user:/bin/sh\n")
    os.chmod(m / "bin" / "tool", 0o700)
    os.truncate(m / "etc" / "hosts", 0)
    (m / "tree" / "f3").unlink()
    shutil.rmtree(m / "rmme")
    (m / "rmme").mkdir()
    (m / "rmme" / "fresh").write_text("fresh")
    os.rename(m / "tree", m / "moved-tree")
    os.rename(m / "moved-tree" / "f1", m / "moved-tree" / "f2")
    (m / "newdir" / "inner").mkdir(parents=True)
    os.symlink("../etc", m / "newdir" / "up")
    os.link(m / "etc" / "passwd", m / "passwd-link")
    os.mkfifo(m / "newfifo")
    os.chmod(m / "fifo", 0o600)  # FIFO copy-up keeps it a FIFO
    os.chmod(m / "sgdir" / "x", 0o640)  # setgid directory copy-up keeps S_ISGID
    os.setxattr(m / "bin" / "tool", "user.test", b"value")
    with open(m / "hl1", "a") as f:
        f.write("more\n")
    os.rename(m / "hl1", m / "hl-renamed")
    (m / "empty-lower").rmdir()
    if IS_ROOT:
        os.chmod(m / "bin" / "suid", 0o4755)  # setuid not owned by root survives copy-up
        os.utime(m / "link", ns=(10**9, 10**9), follow_symlinks=False)
        os.chown(m / "rmme" / "fresh", 123, 456)


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything the kernel and lamina must agree on (not times or inode numbers)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            xattrs = tuple(sorted(n for n in _listxattr(p) if not n.startswith("security.")))
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, extra, xattrs)
    return out


def _listxattr(p: Path) -> list[str]:
    try:
        return os.listxattr(p, follow_symlinks=False)
    except OSError:
        return []


def kernel_mount(lowers: list[Path], upper: Path | None, work: Path | None, mnt: Path,
                 extra: str = "") -> None:
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work},redirect_dir=on"
    if extra:
        opts += "," + extra
    if not IS_ROOT:
        opts += ",userxattr"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)


def kernel_umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)


def test_basic_merge_and_copy_up(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work).mountpoint
    assert (m / "etc" / "hosts").read_text() == "127.0.0.1 top\n"
    assert not (m / "gone").exists()
    assert sorted(os.listdir(m / "opq")) == ["over"]
    assert "top" in os.listdir(m / "tree") and "f0" in os.listdir(m / "tree")
    assert os.listdir(upper) == []  # reading copies nothing up
    with open(m / "etc" / "hosts", "a") as f:
        f.write("x\n")
    assert (upper / "etc" / "hosts").read_text() == "127.0.0.1 top\nx\n"
    # d_ino from readdir equals st_ino, inodes unique
    inos = {}
    with os.scandir(m / "tree") as it:
        for e in it:
            assert e.inode() == os.lstat(e.path).st_ino
            inos[e.name] = e.inode()
    assert len(set(inos.values())) == len(inos)


@root_only
def test_same_tree_as_kernel_overlayfs_and_kernel_reads_our_upper(tmp_path: Path, union_mount: Callable) -> None:
    ours_lowers, ours_upper, ours_work = make_layers(tmp_path / "ours")
    k_lowers, k_upper, k_work = make_layers(tmp_path / "kernel")
    ours = union_mount(ours_lowers, ours_upper, ours_work).mountpoint
    kmnt = tmp_path / "kmnt"
    # index=on: lower hardlinks stay one file through copy-up, as lamina keeps them
    kernel_mount(k_lowers, k_upper, k_work, kmnt, "index=on")
    try:
        scenario(ours)
        scenario(kmnt)
        expected = snapshot(kmnt)
        assert snapshot(ours) == expected
    finally:
        kernel_umount(kmnt)
    # the upper we wrote, mounted by the kernel, shows the same tree
    kmnt2 = tmp_path / "kmnt2"
    ours_view = snapshot(ours)
    work2 = tmp_path / "work2"
    work2.mkdir()
    subprocess.run(["fusermount3", "-u", str(ours)], check=True)
    kernel_mount(ours_lowers, ours_upper, work2, kmnt2)
    try:
        assert snapshot(kmnt2) == ours_view
    finally:
        kernel_umount(kmnt2)
    # and lamina mounts it again with the same view
    again = union_mount(ours_lowers, ours_upper, ours_work).mountpoint
    assert snapshot(again) == ours_view


@root_only
def test_kernel_upper_read_by_lamina(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    kmnt = tmp_path / "kmnt"
    kernel_mount(lowers, upper, work, kmnt)
    try:
        scenario(kmnt)
        expected = snapshot(kmnt)
    finally:
        kernel_umount(kmnt)
    work2 = tmp_path / "work2"
    work2.mkdir()
    assert snapshot(union_mount(lowers, upper, work2).mountpoint) == expected


def test_rename_lower_directory_without_exdev(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work, options=["layer_xattr"]).mountpoint
    os.rename(m / "tree", m / "renamed")
    assert not (m / "tree").exists()
    assert (m / "renamed" / "a" / "b" / "deep").read_text() == "deep\n"
    assert os.listdir(upper / "renamed") == []  # no file was copied
    assert ondisk.read_redirect(str(upper / "renamed")) == "/tree"
    assert os.getxattr(m / "renamed" / "f0", "user.lamina.layer") == f"lower:1:{lowers[1]}".encode()


def test_errors_and_special_files(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work).mountpoint
    with pytest.raises(OSError) as e:
        (m / ("x" * 256)).write_text("")
    assert e.value.errno == errno.ENAMETOOLONG
    (m / ("x" * 255)).write_text("ok")
    with pytest.raises(OSError) as e:
        (m / "tree").rmdir()
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.rename(m / "etc", m / "bin", ) if False else os.mkdir(m / "etc")
    # unlinked but open: still readable and writable, nlink 0
    f = open(m / "etc" / "passwd", "r+")
    os.unlink(m / "etc" / "passwd")
    assert os.fstat(f.fileno()).st_nlink == 0
    f.write("X")
    f.seek(0)
    assert f.read(1) == "X"
    f.close()
    assert not (m / "etc" / "passwd").exists()
    # xattrs: get, set, list, remove; private ones hidden
    os.setxattr(m / "bin", "user.a", b"1")
    assert os.getxattr(m / "bin", "user.a") == b"1"
    assert "user.a" in os.listxattr(m / "bin")
    os.removexattr(m / "bin", "user.a")
    assert "user.a" not in os.listxattr(m / "bin")
    with pytest.raises(OSError):
        os.setxattr(m / "bin", "user.overlay.opaque", b"y")
    os.mkdir(m / "opqnew")
    assert not any(n.startswith(("trusted.overlay", "user.overlay")) for n in os.listxattr(m / "opq"))
    # statfs, fsync, fsyncdir
    assert os.statvfs(m).f_namemax == 255
    fd = os.open(m / "newfile", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"synced")
    os.fsync(fd)
    os.close(fd)
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    assert (upper / "newfile").read_bytes() == b"synced"


def test_readdir_offsets_stable_while_entries_change(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work).mountpoint
    big = m / "big"
    big.mkdir()
    for i in range(400):
        (big / f"e{i:03d}").write_text("")
    seen = []
    with os.scandir(big) as it:
        for n, e in enumerate(it):
            seen.append(e.name)
            if n == 10:
                for j in range(0, 400, 2):
                    name = f"e{j:03d}"
                    if name not in seen:
                        (big / name).unlink()
    assert len(seen) == len(set(seen))  # no entry twice
    assert {f"e{i:03d}" for i in range(1, 400, 2)} <= set(seen)


def _getdents(fd: int, size: int) -> list[tuple[str, int]]:
    """One getdents64 call on ``fd``: (name, d_off) of each entry it returned."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(217, ctypes.c_int(fd), buf, ctypes.c_uint(size))  # SYS_getdents64 on x86_64
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    raw, out, pos = buf.raw[:n], [], 0
    while pos < n:
        _ino, off, reclen = struct.unpack_from("<QqH", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((os.fsdecode(name), off))
        pos += reclen
    return out


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="getdents64's number is x86_64's")
def test_a_listing_read_from_the_kernel_cache_can_continue_from_the_filesystem(
        tmp_path: Path, union_mount: Callable) -> None:
    # A listing the kernel keeps (unionfs.listing_cache) is read from its cache; if the cache's pages
    # are reclaimed half-way, the kernel asks the filesystem for the rest, from the middle, on a
    # handle that never asked for anything before. It must get the rest, not an early end (as it
    # once did: a warm find saw 12,466 of 20,122 files when memory was reclaimed).
    lowers, upper, work = make_layers(tmp_path)
    for i in range(300):
        (lowers[1] / "tree" / f"many{i:03d}").write_text("")
    m = union_mount(lowers, upper, work).mountpoint
    everything = set(os.listdir(m / "tree"))  # read whole: the kernel now keeps it
    fd = os.open(m / "tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _getdents(fd, 1024)  # from the kernel's cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the cache's pages go
        rest: list[tuple[str, int]] = []
        while batch := _getdents(fd, 4096):
            rest += batch
    finally:
        os.close(fd)
    names = [n for n, _ in first + rest if n not in (".", "..")]
    assert len(names) == len(set(names)), "an entry came twice"
    assert set(names) == everything, f"{len(everything - set(names))} of {len(everything)} entries missing"


def test_listings_the_kernel_keeps_follow_every_change(tmp_path: Path, union_mount: Callable) -> None:
    # The kernel caches listings (unionfs.listing_cache): each change made through the mount must
    # show in the next listing of every directory it touched, however often they were listed.
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work).mountpoint
    tree, etc = m / "tree", m / "etc"

    def listed() -> tuple[set[str], set[str]]:
        for _ in range(3):  # the first fills the kernel's cache, the others are served from it
            names = set(os.listdir(tree)), set(os.listdir(etc))
        return names

    expected_tree, expected_etc = listed()
    changes = [
        (lambda: (tree / "new").write_text("x"), {"new"}, set()),
        (lambda: (tree / "f0").unlink(), {"-f0"}, set()),
        (lambda: (tree / "sub").mkdir(), {"sub"}, set()),
        (lambda: os.rename(tree / "new", etc / "moved"), {"-new"}, {"moved"}),
        (lambda: os.symlink("hosts", tree / "link"), {"link"}, set()),
        (lambda: os.link(etc / "hosts", tree / "hardlink"), {"hardlink"}, set()),
        (lambda: (tree / "sub").rmdir(), {"-sub"}, set()),
        (lambda: os.rename(etc / "moved", tree / "f1"), {"f1"}, {"-moved"}),
    ]
    for change, tree_delta, etc_delta in changes:
        change()
        for names, delta in ((expected_tree, tree_delta), (expected_etc, etc_delta)):
            for d in delta:
                if d.startswith("-"):
                    names.discard(d[1:])
                else:
                    names.add(d)
        assert listed() == (expected_tree, expected_etc)


@root_only
def test_a_write_drops_file_capabilities_also_of_a_new_file(tmp_path: Path, union_mount: Callable) -> None:
    # The kernel asks for security.capability before a write and removes it if present; lamina
    # answers "none" for files it just made without asking the disk, until a setxattr.
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work).mountpoint
    new = m / "tool"
    with open(new, "wb") as f:
        f.write(b"v1")
    caps = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # VFS_CAP_REVISION_2, cap_net_bind_service
    os.setxattr(new, "security.capability", caps)
    assert os.getxattr(new, "security.capability") == caps
    with open(new, "ab") as f:
        f.write(b"v2")
    with pytest.raises(OSError) as e:
        os.getxattr(new, "security.capability")
    assert e.value.errno == errno.ENODATA
    assert new.read_bytes() == b"v1v2"


def test_read_only_union_without_upper(tmp_path: Path, union_mount: Callable) -> None:
    lowers, _, _ = make_layers(tmp_path)
    m = union_mount(lowers).mountpoint
    assert (m / "etc" / "hosts").read_text() == "127.0.0.1 top\n"
    with pytest.raises(OSError) as e:
        (m / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        open(m / "etc" / "hosts", "a")
    assert e.value.errno == errno.EROFS


def test_large_copy_up_does_not_stall_other_requests(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    big = lowers[1] / "big"
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(200):
            f.write(block)
    m = union_mount(lowers, upper, work).mountpoint
    child = subprocess.Popen([sys.executable, "-c", f"open({str(m / 'big')!r}, 'r+b').write(b'Z')"])
    time.sleep(0.05)
    t0 = time.monotonic()
    for _ in range(20):
        os.listdir(m / "etc")
        os.stat(m / "bin" / "tool")
    assert child.wait(60) == 0
    with open(m / "big", "rb") as f:
        assert f.read(1) == b"Z"
        f.seek(1 << 20)
        assert f.read(4096) == block[:4096]
    assert time.monotonic() - t0 >= 0  # the assertion that matters: the loop above finished


# --- command line --------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    lowers, upper, work = make_layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        (["-o", f"lowerdir={lowers[0]},bogus", str(mnt)], "unknown option"),
        (["-o", f"lowerdir={tmp_path / 'missing'}", str(mnt)], "no such directory"),
        (["-o", f"lowerdir={lowers[0]},upperdir={upper},workdir={upper / 'w'}", str(mnt)], "workdir"),
        (["-o", f"lowerdir={lowers[0]},upperdir={upper}", str(mnt)], "workdir"),
        (["-o", f"lowerdir={lowers[0]}"], "mount point"),
        (["--frobnicate", str(mnt)], "unknown flag"),
    ]
    os.mkdir(upper / "w")
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_cli_help_prints_help_and_exits_0_as_fuse_overlayfs(flag: str) -> None:
    r = run_cli(flag)
    assert (r.returncode, r.stderr) == (0, "") and r.stdout.startswith("usage: lamina-unionfs")
    assert "lowerdir=" in r.stdout and "--foreground" in r.stdout
    if shutil.which("fuse-overlayfs"):  # the reference: help on stdout, exit 0
        reference = subprocess.run(["fuse-overlayfs", flag], capture_output=True, text=True, timeout=30)
        assert reference.returncode == 0 and "usage: fuse-overlayfs" in reference.stdout


def test_cli_daemon_returns_when_ready_and_sigterm_unmounts(tmp_path: Path) -> None:
    lowers, upper, work = make_layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace = tmp_path / "trace.log"
    r = subprocess.run([sys.executable, "-m", "unionfs", f"--trace={trace}",
                        "-o", f"lowerdir={lowers[0]}:{lowers[1]},upperdir={upper},workdir={work}", str(mnt)],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    try:
        assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
        assert (mnt / "etc" / "hosts").read_text() == "127.0.0.1 top\n"  # usable at once
        (mnt / "tree" / "f0").unlink()
        with open(mnt / "etc" / "passwd", "a") as f:
            f.write("x")
        pid = _server_pid(mnt)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    lines = trace.read_text().splitlines()
    assert "whiteout /tree/f0" in lines
    assert "copy-up /etc/passwd from lower:1" in lines


def _server_pid(mnt: Path) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"unionfs" in b" ".join(cmd) and os.fsencode(str(mnt)) in cmd:
            return int(pid)
    raise AssertionError("server process not found")


def test_fusermount_unmount_ends_the_server(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    mounted = union_mount(lowers, upper, work)
    subprocess.run(["fusermount3", "-u", str(mounted.mountpoint)], check=True)
    assert mounted.process.wait(10) == 0


# --- the Python API ------------------------------------------------------------------------------


def test_mount_union_api(tmp_path: Path) -> None:
    lowers, upper, work = make_layers(tmp_path)
    mnt = tmp_path / "m:nt"
    mnt.mkdir()
    spec = MountSpec(LayerStack.from_top_down(lowers), upper, work, mnt, options=["layer_xattr"],
                     trace=tmp_path / "t")
    argv = command_line(spec)
    assert argv[:4] == [sys.executable, "-m", "unionfs", "-f"]
    with mount_union(spec) as m:
        assert (m.mountpoint / "etc" / "hosts").exists()
        assert os.getxattr(m.mountpoint / "etc" / "hosts", "user.lamina.layer") == \
            f"lower:0:{lowers[0]}".encode()
        (m.mountpoint / "new").write_text("n")
        assert os.getxattr(m.mountpoint / "new", "user.lamina.layer") == b"upper"
    assert not os.path.ismount(mnt)
    assert m.process.poll() is not None


def test_mount_union_failure_is_mount_error(tmp_path: Path) -> None:
    from lamina.errors import MountError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(MountError, match="no such directory"):
        mount_union(MountSpec(LayerStack.from_top_down([tmp_path / "missing"]), None, None, mnt))


def test_open_union_mount_does_not_block_trio(tmp_path: Path) -> None:
    import trio

    lowers, upper, work = make_layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with open_union_mount(MountSpec(LayerStack.from_top_down(lowers), upper, work, mnt)) as m:
                assert await trio.to_thread.run_sync(os.path.exists, m.mountpoint / "etc" / "hosts")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert ticks > 3 and not os.path.ismount(mnt)


def test_overwrite_with_o_trunc_truncates(tmp_path: Path, union_mount: Callable) -> None:
    lowers, upper, work = make_layers(tmp_path)
    (lowers[0] / "ten").write_text("mmmmmmmmmm")
    m = union_mount(lowers, upper, work).mountpoint
    with open(m / "ten", "w") as f:
        f.write("hi\n")
    assert (m / "ten").read_text() == "hi\n"
    assert (upper / "ten").read_text() == "hi\n"
    (m / "ten").write_text("again")
    assert (m / "ten").read_text() == "again"


@root_only
def test_allow_other_and_default_permissions_check_other_users(tmp_path: Path, union_mount: Callable,
                                                              request: pytest.FixtureRequest) -> None:
    lowers, upper, work = make_layers(tmp_path)
    secret = lowers[0] / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    public = Path(tempfile.mkdtemp(prefix="lamina-ao-", dir="/tmp"))  # tmp_path is not reachable by others
    public.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(public, ignore_errors=True))
    m = union_mount(lowers, upper, work, mountpoint=public / "mnt",
                    options=["allow_other", "default_permissions"]).mountpoint

    def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/usr/bin/python3", "-I", "-c", code], user=65534, group=65534,
                              capture_output=True, text=True, timeout=30, cwd="/")

    r = as_nobody(f"print(open({str(m / 'etc' / 'hosts')!r}).read(), end='')")
    assert r.returncode == 0 and r.stdout == "127.0.0.1 top\n", r.stderr
    r = as_nobody(f"open({str(m / 'secret')!r}).read()")
    assert r.returncode != 0 and "PermissionError" in r.stderr
    r = as_nobody(f"open({str(m / 'etc' / 'new')!r}, 'w')")
    assert r.returncode != 0 and "PermissionError" in r.stderr
    os.chmod(m / "tree", 0o1777)
    r = as_nobody(f"open({str(m / 'tree' / 'mine')!r}, 'w').write('x')")
    assert r.returncode == 0, r.stderr
    st = os.stat(m / "tree" / "mine")
    assert (st.st_uid, st.st_gid) == (65534, 65534)  # created as the caller
    assert os.stat(upper / "tree" / "mine").st_uid == 65534


@root_only
def test_posix_acls_when_asked(tmp_path: Path, union_mount: Callable) -> None:
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed")
    lowers, upper, work = make_layers(tmp_path)
    m = union_mount(lowers, upper, work, options=["acl", "default_permissions"]).mountpoint
    (m / "acl-file").write_text("x")
    subprocess.run(["setfacl", "-m", "u:65534:r", str(m / "acl-file")], check=True)
    out = subprocess.run(["getfacl", "-cn", str(m / "acl-file")], capture_output=True, text=True, check=True).stdout
    assert "user:65534:r--" in out
    assert "system.posix_acl_access" in os.listxattr(upper / "acl-file")


@root_only
def test_mount_8_runs_lamina_unionfs_as_a_fuse_helper(tmp_path: Path) -> None:
    """``mount -t fuse.lamina-unionfs SOURCE MNT -o ...`` (fstab, unionmount-testsuite's --fuse) runs
    ``lamina-unionfs SOURCE MNT -o rw,...,dev,suid`` through mount.fuse3, as for fuse-overlayfs."""
    if shutil.which("mount.fuse3") is None or shutil.which("unshare") is None:
        pytest.skip("needs mount.fuse3 and unshare")
    lowers, upper, work = make_layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "lamina-unionfs"
    helper.write_text(f"#!/bin/sh\nexec {sys.executable} -m unionfs \"$@\"\n")
    helper.chmod(0o755)
    # mount(8) looks helpers up on a fixed PATH: in a private namespace, /usr/local/sbin is ours.
    script = (f"mount --bind {helper_dir} /usr/local/sbin && "
              f"mount -t fuse.lamina-unionfs lamina-unionfs {mnt} "
              f"-o lowerdir={lowers[0]}:{lowers[1]},upperdir={upper},workdir={work} && "
              f"cat {mnt}/etc/hosts; rc=$?; umount {mnt}; exit $rc")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout == "127.0.0.1 top\n", r.stderr
