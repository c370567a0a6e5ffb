"""Unit tests of the pure core (unionfs.core) on plain directories: no FUSE, no kernel mount.

Merging, the on-disk formats, whiteouts and opaque directories, copy-up. Renames are in
test_unionfs_core_rename.py, inode numbers and hard links in test_unionfs_core_inodes.py.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core import Caller, UnionError, UnionFS
from unionfs_core_support import IS_ROOT, ME, Layers, names, needs_root, read, walk, whiteout, write_file


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


# --- 1. priority and merging ---------------------------------------------------------------------


def test_upper_hides_lowers_and_directories_merge(layers: Layers) -> None:
    l0, l1 = layers.lowers
    write_file(l1 / "a", "bottom")
    write_file(l0 / "a", "top")
    write_file(layers.upper / "b", "up")
    write_file(l1 / "b", "hidden")
    write_file(l1 / "d" / "x", "1")
    write_file(l0 / "d" / "y", "2")
    write_file(layers.upper / "d" / "z", "3")
    fs = layers.open()
    assert read(fs, "a") == b"top"
    assert read(fs, "b") == b"up"
    assert names(fs) == {"a", "b", "d"}
    assert names(fs, "d") == {"x", "y", "z"}
    d = walk(fs, "d")
    assert d.in_upper and [layer.index for layer, _ in d.lowers] == [0, 1]


def test_device_placeholders_of_a_lower_are_left_out(layers: Layers) -> None:
    """A device node kept as a placeholder (an unprivileged unpack) is absent from the merged view,
    lookups and listings alike, as in rootless podman whose storage skips such nodes: what the
    layers below hold at that name shows through. Unlisted placeholders stay ordinary files."""
    l0, l1 = layers.lowers
    write_file(l1 / "srv" / "full", "below")
    write_file(l1 / "dev" / "keep", "x")
    (l0 / "srv").mkdir()
    (l0 / "dev").mkdir()
    for rel in ("srv/full", "dev/null", "dev/unlisted"):
        parent = os.open(l0 / os.path.dirname(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            override = ondisk.OwnerOverride.for_device(0, 0, stat.S_IFCHR | 0o666, 1, 3)
            os.close(ondisk.write_device_placeholder(parent, os.path.basename(rel), override))
        finally:
            os.close(parent)
    assert ondisk.write_placeholder_list(str(l0), ["srv/full", "dev/null"])
    fs = layers.open()
    assert names(fs, "dev") == {"keep", "unlisted"}
    assert fs.lookup(walk(fs, "dev"), "null") is None
    assert read(fs, "srv/full") == b"below"
    assert names(fs, "srv") == {"full"}


def test_nondirectory_above_directory_hides_it(layers: Layers) -> None:
    l0, l1 = layers.lowers
    write_file(l1 / "d" / "x")
    write_file(l0 / "d", "file")
    fs = layers.open()
    assert not walk(fs, "d").is_dir
    assert read(fs, "d") == b"file"


# --- 2. reading every format ---------------------------------------------------------------------


@needs_root
def test_reads_char_device_whiteouts_and_trusted_opaque(layers: Layers) -> None:
    l0, l1 = layers.lowers
    write_file(l1 / "gone")
    whiteout(l0 / "gone")
    write_file(l1 / "op" / "hidden")
    (l0 / "op").mkdir()
    os.setxattr(l0 / "op", "trusted.overlay.opaque", b"y")
    write_file(l0 / "op" / "shown")
    fs = layers.open()
    assert fs.lookup(fs.root, "gone") is None
    assert "gone" not in names(fs)
    assert names(fs, "op") == {"shown"}
    assert fs.lookup(walk(fs, "op"), "hidden") is None
    assert "trusted.overlay.opaque" not in fs.listxattr(walk(fs, "op"))


def test_reads_wh_files_and_opq_marker_and_user_opaque(layers: Layers) -> None:
    l0, l1 = layers.lowers
    write_file(l1 / "gone")
    write_file(l0 / ".wh.gone", "")
    write_file(l1 / "op" / "hidden")
    write_file(l0 / "op" / ".wh..wh..opq", "")
    write_file(l0 / "op" / "shown")
    write_file(l1 / "uop" / "hidden")
    (l0 / "uop").mkdir()
    os.setxattr(l0 / "uop", "user.overlay.opaque", b"y")
    fs = layers.open()
    assert fs.lookup(fs.root, "gone") is None
    assert names(fs) == {"op", "uop"}
    assert names(fs, "op") == {"shown"}
    assert names(fs, "uop") == set()
    assert fs.lookup(fs.root, ".wh.gone") is None


def test_whiteout_in_upper_hides_all_lowers(layers: Layers) -> None:
    l0, l1 = layers.lowers
    write_file(l0 / "f")
    write_file(l1 / "f")
    write_file(layers.upper / ".wh.f", "")
    fs = layers.open()
    assert fs.lookup(fs.root, "f") is None and names(fs) == set()


# --- 3/4. writing whiteouts and opaque directories -----------------------------------------------


def test_unlink_leaves_whiteout_only_where_a_lower_has_the_name(layers: Layers) -> None:
    write_file(layers.lowers[1] / "low")
    fs = layers.open()
    node = fs.create(fs.root, "mine", 0o644, os.O_WRONLY, ME)[0]
    fs.release(node, node.fds[0])
    fs.unlink(fs.root, "mine")
    fs.unlink(fs.root, "low")
    assert names(fs) == set()
    entries = set(os.listdir(layers.upper))
    if fs.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE:
        assert entries == {"low"}
        assert ondisk.is_whiteout_stat(os.lstat(layers.upper / "low"))
    else:
        assert entries == {".wh.low"}
    assert "whiteout /low" in layers.traces
    # a fresh core reads what was written
    assert layers.open().lookup(layers.open().root, "low") is None


def test_whiteouts_are_links_to_one_shared_device(layers: Layers) -> None:
    for name in ("a", "b", "c"):
        write_file(layers.lowers[1] / "d" / name)
    fs = layers.open()
    if fs.whiteout_style is not ondisk.WhiteoutStyle.CHAR_DEVICE:
        pytest.skip("mknod refused here: whiteouts are .wh. files")
    d = walk(fs, "d")
    fs.unlink(d, "a")
    fs.unlink(d, "b")
    shared = os.lstat(layers.work / "work" / "whiteout")
    a, b = os.lstat(layers.upper / "d" / "a"), os.lstat(layers.upper / "d" / "b")
    assert ondisk.is_whiteout_stat(a) and a.st_ino == b.st_ino == shared.st_ino
    assert shared.st_nlink == 3
    # Without the shared device (say it reached the link limit or was removed), a whiteout is
    # still made, and a new shared device takes over for the next ones.
    os.unlink(layers.work / "work" / "whiteout")
    fs.unlink(d, "c")
    c = os.lstat(layers.upper / "d" / "c")
    assert ondisk.is_whiteout_stat(c) and c.st_ino != a.st_ino
    assert ondisk.is_whiteout_stat(os.lstat(layers.work / "work" / "whiteout"))
    assert names(fs, "d") == set()
    assert names(layers.open(), "d") == set()


def test_busy_lower_directory_is_listed_once_and_still_honours_whiteouts(layers: Layers) -> None:
    # The top lower hides "gone" with a .wh. file and "dev" with a char whiteout; after enough
    # missed lookups its names come from one listing, which must give the same answers.
    for i in range(40):
        write_file(layers.lowers[1] / "d" / f"f{i}")
    write_file(layers.lowers[1] / "d" / "gone")
    write_file(layers.lowers[1] / "d" / "dev")
    write_file(layers.lowers[0] / "d" / "top")
    write_file(layers.lowers[0] / "d" / ".wh.gone", "")
    if IS_ROOT:
        os.mknod(layers.lowers[0] / "d" / "dev", stat.S_IFCHR, os.makedev(0, 0))
    fs = layers.open()
    d = walk(fs, "d")
    for i in range(40):
        assert fs.lookup(d, f"f{i}") is not None
    assert fs._lower_names  # the top lower's d was listed
    assert fs.lookup(d, "gone") is None
    assert (fs.lookup(d, "dev") is None) == IS_ROOT
    assert fs.lookup(d, "top") is not None
    assert fs.lookup(d, "missing") is None
    assert names(fs, "d") == {f"f{i}" for i in range(40)} | {"top"} | (set() if IS_ROOT else {"dev"})


def test_rm_rf_then_mkdir_gives_empty_opaque_directory(layers: Layers) -> None:
    write_file(layers.lowers[1] / "d" / "a")
    write_file(layers.lowers[0] / "d" / "b")
    fs = layers.open()
    d = walk(fs, "d")
    fs.unlink(d, "a")
    fs.unlink(d, "b")
    fs.rmdir(fs.root, "d")
    fs.mkdir(fs.root, "d", 0o755, ME)
    assert names(fs, "d") == set()
    assert fs.lookup(walk(fs, "d"), "a") is None  # lookups, not only the listing, see it empty
    assert any(ondisk.is_opaque_dir(str(layers.upper / "d")) for _ in [0])
    fresh = layers.open()
    assert names(fresh, "d") == set()
    assert "opaque /d" in layers.traces


def test_rmdir_of_merged_directory(layers: Layers) -> None:
    write_file(layers.lowers[1] / "d" / "a")
    write_file(layers.lowers[0] / "full" / "keep")
    fs = layers.open()
    with pytest.raises(OSError) as e:
        fs.rmdir(fs.root, "full")
    assert e.value.errno == errno.ENOTEMPTY
    fs.unlink(walk(fs, "d"), "a")
    fs.rmdir(fs.root, "d")
    assert names(fs) == {"full"}
    assert names(layers.open()) == {"full"}


def test_unlink_errors(layers: Layers) -> None:
    write_file(layers.lowers[0] / "d" / "f")
    fs = layers.open()
    with pytest.raises(IsADirectoryError):
        fs.unlink(fs.root, "d")
    with pytest.raises(NotADirectoryError):
        fs.rmdir(walk(fs, "d"), "f")
    with pytest.raises(FileNotFoundError):
        fs.unlink(fs.root, "nope")
    with pytest.raises(FileExistsError):
        fs.mkdir(fs.root, "d", 0o755, ME)
    with pytest.raises(OSError) as e:
        fs.mkdir(fs.root, "n" * 256, 0o755, ME)
    assert e.value.errno == errno.ENAMETOOLONG
    fs.mkdir(fs.root, "n" * 255, 0o755, ME)


# --- 5. copy-up ----------------------------------------------------------------------------------


def test_copy_up_preserves_data_mode_times_xattrs_and_keeps_holes(layers: Layers) -> None:
    low = layers.lowers[1]
    big = low / "d" / "sparse"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    os.chmod(big, 0o6755 if IS_ROOT else 0o755)
    os.setxattr(big, "user.note", b"kept")
    os.utime(big, ns=(1_000_000_000, 2_000_000_000))
    os.utime(low / "d", ns=(3_000_000_000, 4_000_000_000))
    fs = layers.open()
    node = walk(fs, "d/sparse")
    ino = node.ino
    fs.setxattr(node, "user.other", b"1")
    up = layers.upper / "d" / "sparse"
    st = os.lstat(up)
    assert st.st_size == (64 << 20) + 4
    assert st.st_blocks * 512 < (1 << 20)  # still sparse
    assert stat.S_IMODE(st.st_mode) == (0o6755 if IS_ROOT else 0o755)
    assert st.st_mtime_ns == 2_000_000_000
    assert os.getxattr(up, "user.note") == b"kept"
    assert os.lstat(layers.upper / "d").st_mtime_ns == 4_000_000_000
    with open(up, "rb") as f:
        assert f.read(4) == b"head"
    assert walk(fs, "d/sparse").ino == ino  # stable across copy-up
    assert "copy-up /d from lower:1" in layers.traces and "copy-up /d/sparse from lower:1" in layers.traces


def test_read_only_open_does_not_copy_up(layers: Layers) -> None:
    write_file(layers.lowers[0] / "f", "data")
    fs = layers.open()
    assert read(fs, "f") == b"data"
    assert os.listdir(layers.upper) == []
    fd, in_upper = fs.open(walk(fs, "f"), os.O_RDWR)
    fs.release(walk(fs, "f"), fd)
    assert in_upper and (layers.upper / "f").read_text() == "data"


def test_truncate_to_zero_copies_no_data(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(layers.lowers[0] / "f", "x" * 100000)
    fs = layers.open()
    from unionfs.core import backing

    def fail(*a: object) -> None:
        raise AssertionError("data copied")

    monkeypatch.setattr(backing, "copy_file_data", fail)
    import unionfs.core.copyup as copyup_mod
    monkeypatch.setattr(copyup_mod, "copy_file_data", fail)
    fs.setattr(walk(fs, "f"), size=0)
    assert (layers.upper / "f").read_bytes() == b""


def test_copy_up_of_symlink_fifo_and_setgid_directory(layers: Layers) -> None:
    low = layers.lowers[0]
    (low / "sg").mkdir()
    os.chmod(low / "sg", 0o2775)
    os.symlink("target/../x", low / "sg" / "link")
    os.utime(low / "sg" / "link", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
    os.mkfifo(low / "sg" / "fifo", 0o640)
    fs = layers.open()
    fs.setattr(walk(fs, "sg/link"), atime_ns=5_000_000_000, mtime_ns=6_000_000_000)
    fs.setattr(walk(fs, "sg/fifo"), mode=0o600)
    up = layers.upper / "sg"
    assert stat.S_IMODE(os.lstat(up).st_mode) == 0o2775
    assert os.readlink(up / "link") == "target/../x"
    assert os.lstat(up / "link").st_mtime_ns == 6_000_000_000
    assert stat.S_ISFIFO(os.lstat(up / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(up / "fifo").st_mode) == 0o600


@needs_root
def test_copy_up_preserves_owner_setuid_and_devices(layers: Layers) -> None:
    low = layers.lowers[0]
    f = write_file(low / "suid", "x")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o4755)
    os.mknod(low / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("x", low / "sl")
    os.chown(low / "sl", 42, 43, follow_symlinks=False)
    fs = layers.open()
    fs.setxattr(walk(fs, "suid"), "user.t", b"1")
    fs.setxattr(walk(fs, "null"), "trusted.t", b"1")
    fs.setattr(walk(fs, "sl"), mtime_ns=1)
    st = os.lstat(layers.upper / "suid")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4755)
    st = os.lstat(layers.upper / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.lstat(layers.upper / "sl")
    assert (st.st_uid, st.st_gid) == (42, 43)


def test_workdir_is_cleaned_at_start(layers: Layers) -> None:
    write_file(layers.work / "work" / "stale-copy", "half")
    layers.open()
    # what is left is the shared whiteout, made at mount (when mknod is allowed)
    assert os.listdir(layers.work / "work") in ([], ["whiteout"])


def test_bad_configuration_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(UnionError, match="no such directory"):
        UnionFS([str(tmp_path / "missing")], None, None)


def test_read_only_union_refuses_writes(layers: Layers) -> None:
    write_file(layers.lowers[0] / "f")
    fs = UnionFS([str(p) for p in layers.lowers], None, None)
    for call in (lambda: fs.unlink(fs.root, "f"), lambda: fs.mkdir(fs.root, "d", 0o755, ME),
                 lambda: fs.open(walk(fs, "f"), os.O_WRONLY), lambda: fs.setattr(walk(fs, "f"), mode=0)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EROFS


def test_write_access_to_a_read_only_union_is_erofs(layers: Layers) -> None:
    fs = UnionFS([str(p) for p in layers.lowers], None, None)
    with pytest.raises(OSError) as e:
        fs.may_access(os.W_OK, ME, stat.S_IFREG | 0o666, ME.uid, ME.gid)
    assert e.value.errno == errno.EROFS
    assert fs.may_access(os.R_OK, ME, stat.S_IFREG | 0o444, ME.uid, ME.gid)
    fs.close()


def test_access_checks_owner_then_group_then_other_bits() -> None:
    from unionfs.core.attributes import access_allowed

    user = Caller(uid=1000, gid=1000)
    assert access_allowed(os.R_OK | os.W_OK, user, stat.S_IFREG | 0o600, 1000, 0)
    assert not access_allowed(os.X_OK, user, stat.S_IFREG | 0o677, 1000, 1000)  # owner bits only
    assert access_allowed(os.R_OK, user, stat.S_IFREG | 0o040, 0, 1000)
    assert not access_allowed(os.W_OK, user, stat.S_IFREG | 0o646, 0, 1000)  # group bits, not other
    assert access_allowed(os.W_OK, user, stat.S_IFREG | 0o002, 0, 0)
    root = Caller(uid=0, gid=0)
    assert access_allowed(os.R_OK | os.W_OK, root, stat.S_IFREG | 0o000, 1000, 1000)
    assert not access_allowed(os.X_OK, root, stat.S_IFREG | 0o644, 1000, 1000)  # no x bit at all
    assert access_allowed(os.X_OK, root, stat.S_IFREG | 0o010, 1000, 1000)
    assert access_allowed(os.X_OK, root, stat.S_IFDIR | 0o000, 1000, 1000)
