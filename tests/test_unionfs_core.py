"""Unit tests of the pure core (unionfs.core) on plain directories: no FUSE, no kernel mount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core import Caller, UnionError, UnionFS
from unionfs.core.backing import RENAME_EXCHANGE, RENAME_NOREPLACE
from unionfs.core.nodes import Node

IS_ROOT = os.geteuid() == 0
ME = Caller(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())


class Layers:
    def __init__(self, tmp: Path, nlowers: int = 2) -> None:
        self.lowers = [tmp / f"l{i}" for i in range(nlowers)]
        self.upper = tmp / "upper"
        self.work = tmp / "work"
        for d in [*self.lowers, self.upper, self.work]:
            d.mkdir()
        self.traces: list[str] = []

    def open(self, **kw: object) -> UnionFS:
        return UnionFS([str(p) for p in self.lowers], str(self.upper), str(self.work),
                       trace=self.traces.append, **kw)  # type: ignore[arg-type]


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


def walk(fs: UnionFS, path: str) -> Node:
    node = fs.root
    for part in [p for p in path.split("/") if p]:
        child = fs.lookup(node, part)
        assert child is not None, f"{path}: {part} missing"
        node = child
    return node


def names(fs: UnionFS, path: str = "") -> set[str]:
    return {e.name for e in fs.list_dir(walk(fs, path))}


def read(fs: UnionFS, path: str) -> bytes:
    fd, _ = fs.open(walk(fs, path), os.O_RDONLY)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        fs.release(walk(fs, path), fd)


def write_file(p: Path, data: str | bytes = "x", mode: int | None = None) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(p, mode)
    return p


def whiteout(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, trusted xattrs, chown)")


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


# --- 6. rename -----------------------------------------------------------------------------------


def test_rename_lower_directory_uses_redirect_not_copy(layers: Layers) -> None:
    low = layers.lowers[1]
    for i in range(50):
        write_file(low / "src" / f"f{i}", str(i))
    write_file(low / "src" / "sub" / "deep", "deep")
    fs = layers.open()
    fs.rename(fs.root, "src", fs.root, "dst")
    assert names(fs) == {"dst"}
    assert len(names(fs, "dst")) == 51
    assert read(fs, "dst/sub/deep") == b"deep"
    # only the directory itself was copied up
    assert sorted(os.listdir(layers.upper / "dst")) == []
    redirect = ondisk.read_redirect(str(layers.upper / "dst"))
    assert redirect == "/src"
    assert any(t.startswith("redirect /src -> /dst") for t in layers.traces)
    fresh = layers.open()
    assert names(fresh) == {"dst"} and len(names(fresh, "dst")) == 51
    # renaming again keeps pointing at the lower path
    fresh.rename(fresh.root, "dst", fresh.root, "again")
    assert ondisk.read_redirect(str(layers.upper / "again")) == "/src"
    assert read(layers.open(), "again/f7") == b"7"


def test_rename_file_over_existing_and_over_whiteout(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "a", "A")
    write_file(low / "b", "B")
    write_file(low / "c", "C")
    fs = layers.open()
    fs.rename(fs.root, "a", fs.root, "b")
    assert names(fs) == {"b", "c"} and read(fs, "b") == b"A"
    fs.unlink(fs.root, "c")
    fs.rename(fs.root, "b", fs.root, "c")
    assert names(fs) == {"c"} and read(fs, "c") == b"A"
    assert names(layers.open()) == {"c"}


def test_rename_noreplace_and_exchange(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "a", "A")
    write_file(low / "d" / "in-d")
    fs = layers.open()
    fs.mkdir(fs.root, "e", 0o755, ME)
    with pytest.raises(FileExistsError):
        fs.rename(fs.root, "a", fs.root, "d", RENAME_NOREPLACE)
    fs.rename(fs.root, "d", fs.root, "e", RENAME_EXCHANGE)
    assert names(fs, "e") == {"in-d"} and names(fs, "d") == set()
    fs.rename(fs.root, "a", fs.root, "new", RENAME_NOREPLACE)
    assert read(fs, "new") == b"A"
    fresh = layers.open()
    assert names(fresh, "e") == {"in-d"} and names(fresh, "d") == set()
    assert names(fresh) == {"d", "e", "new"}


@needs_root
def test_redirect_is_followed_per_layer_through_whited_out_ancestors(tmp_path: Path) -> None:
    """A lower directory renamed away (redirect "/a/d") must not pick up, after a remount, what a
    middle layer hid by whiting out its parent ``a`` (fsops seed 96: a deleted file came back)."""
    layers = Layers(tmp_path, nlowers=3)
    top, middle, bottom = layers.lowers
    write_file(top / "a" / "d" / "kept")
    whiteout(middle / "a")
    write_file(bottom / "a" / "d" / "hidden")
    (top / "n").mkdir()
    fs = layers.open()
    fs.rename(walk(fs, "a"), "d", walk(fs, "n"), "m")
    assert names(fs, "n/m") == {"kept"}
    assert names(layers.open(), "n/m") == {"kept"}


@needs_root
def test_redirect_inside_an_opaque_directory_is_followed(layers: Layers) -> None:
    """An absolute redirect reaches the lowers from the root, also below an opaque directory."""
    write_file(layers.lowers[0] / "a" / "f")
    write_file(layers.lowers[0] / "c" / "old")
    fs = layers.open()
    fs.unlink(walk(fs, "c"), "old")
    fs.rmdir(fs.root, "c")
    fs.mkdir(fs.root, "c", 0o755, ME)
    fs.rename(fs.root, "a", walk(fs, "c"), "a")
    assert names(fs, "c/a") == {"f"}
    fresh = layers.open()
    assert names(fresh, "c") == {"a"} and names(fresh, "c/a") == {"f"}


@needs_root
def test_rename_lower_directory_over_nonempty_upper_directory_changes_nothing(layers: Layers) -> None:
    """ENOTEMPTY after trying the upper rename as the kernel does (RENAME_WHITEOUT): both stay."""
    write_file(layers.lowers[0] / "p" / "src" / "f", "lower")
    fs = layers.open()
    fs.mkdir(fs.root, "t", 0o755, ME)
    node, fd = fs.create(walk(fs, "t"), "g", 0o644, os.O_WRONLY, ME)
    fs.release(node, fd)
    with pytest.raises(OSError) as err:
        fs.rename(walk(fs, "p"), "src", fs.root, "t")
    assert err.value.errno == errno.ENOTEMPTY
    assert names(fs, "p") == {"src"} and names(fs, "t") == {"g"}
    # the kernel copies up the source before it tries: a directory, no whiteout
    assert os.listdir(layers.upper / "p") == ["src"] and (layers.upper / "p" / "src").is_dir()
    assert os.listdir(layers.upper / "t") == ["g"]
    assert names(layers.open(), "p/src") == {"f"}


def test_rename_directory_over_merged_directory_whose_entries_are_whited_out(layers: Layers) -> None:
    write_file(layers.lowers[0] / "target" / "gone")
    write_file(layers.lowers[0] / "src" / "keep")
    fs = layers.open()
    fs.unlink(walk(fs, "target"), "gone")
    fs.rename(fs.root, "src", fs.root, "target")
    assert names(fs, "target") == {"keep"}
    assert names(layers.open(), "target") == {"keep"}


def test_upper_directory_moved_over_lower_name_is_opaque(layers: Layers) -> None:
    write_file(layers.lowers[0] / "t" / "lower-only")
    fs = layers.open()
    fs.mkdir(fs.root, "new", 0o755, ME)
    walk(fs, "t")
    fs.unlink(walk(fs, "t"), "lower-only")
    fs.rmdir(fs.root, "t")
    fs.rename(fs.root, "new", fs.root, "t")
    assert names(fs, "t") == set()
    assert names(layers.open(), "t") == set()


def test_rename_away_directory_created_over_whiteout_keeps_whiteout(layers: Layers) -> None:
    write_file(layers.lowers[0] / "d" / "x")
    fs = layers.open()
    fs.unlink(walk(fs, "d"), "x")
    fs.rmdir(fs.root, "d")
    fs.mkdir(fs.root, "d", 0o755, ME)
    fs.rename(fs.root, "d", fs.root, "e")
    assert names(fs) == {"e"}
    assert names(layers.open()) == {"e"}


# --- 7. inodes -----------------------------------------------------------------------------------


def test_lower_hardlinks_share_a_node_and_copy_up_keeps_them_together(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "a", "same")
    os.link(low / "a", low / "b")
    fs = layers.open()
    a, b = walk(fs, "a"), walk(fs, "b")
    assert a is b
    fd, _ = fs.open(a, os.O_WRONLY)
    os.pwrite(fd, b"SAME", 0)
    fs.release(a, fd)
    fs.rename(fs.root, "a", fs.root, "moved")
    assert read(fs, "b") == b"SAME"
    fresh = layers.open()
    assert read(fresh, "b") == b"SAME" and read(fresh, "moved") == b"SAME"


def test_inode_numbers_are_unique_and_stable_across_remounts(layers: Layers) -> None:
    for i in range(20):
        write_file(layers.lowers[i % 2] / f"f{i}")
    write_file(layers.lowers[0] / "d" / "x")
    write_file(layers.lowers[1] / "d" / "y")
    fs = layers.open()
    inos = {n: walk(fs, n).ino for n in names(fs)}
    assert len(set(inos.values())) == len(inos)
    assert fs.root.ino == 1
    fresh = layers.open()
    assert {n: walk(fresh, n).ino for n in names(fresh)} == inos


def test_unlinked_open_file_stays_usable(layers: Layers) -> None:
    fs = layers.open()
    node, fd = fs.create(fs.root, "tmp", 0o600, os.O_RDWR, ME)
    os.pwrite(fd, b"still here", 0)
    fs.unlink(fs.root, "tmp")
    assert node.deleted
    st, _ = fs.stat(node)
    assert st.st_size == 10
    fs.setattr(node, size=5)
    assert os.pread(fd, 100, 0) == b"still"
    fs.release(node, fd)


def test_long_paths_are_fd_relative(layers: Layers) -> None:
    fs = layers.open()
    node = fs.root
    depth = 0
    while depth * 200 < 3800:  # near PATH_MAX: longer than any full path could be
        node = fs.mkdir(node, f"{depth:03d}" + "d" * 196, 0o755, ME)
        depth += 1
    child, fd = fs.create(node, "leaf", 0o644, os.O_WRONLY, ME)
    os.write(fd, b"deep")
    fs.release(child, fd)
    assert fs.stat(child)[0].st_size == 4
    fs.setxattr(child, "user.deep", b"1")
    assert fs.getxattr(child, "user.deep") == b"1"


def test_rename_with_redirects_off_copies_the_whole_directory(layers: Layers) -> None:
    write_file(layers.lowers[1] / "src" / "a" / "f", "f")
    write_file(layers.lowers[0] / "src" / "g", "g")
    write_file(layers.lowers[0] / "dst" / "old", "hidden after the rename")
    fs = layers.open(redirect_dir=False)
    walk(fs, "dst")
    fs.unlink(walk(fs, "dst"), "old")
    fs.rmdir(fs.root, "dst")
    fs.rename(fs.root, "src", fs.root, "dst")
    assert ondisk.read_redirect(str(layers.upper / "dst")) is None
    assert (layers.upper / "dst" / "a" / "f").read_text() == "f"
    fresh = layers.open()
    assert names(fresh) == {"dst"} and names(fresh, "dst") == {"a", "g"}


def test_flatten_redirects_makes_the_upper_self_contained(layers: Layers) -> None:
    from unionfs.export import flatten_redirects

    write_file(layers.lowers[1] / "src" / "a" / "f", "f")
    write_file(layers.lowers[1] / "src" / "inner" / "x", "x")
    fs = layers.open(redirect_dir=True)
    fs.rename(fs.root, "src", fs.root, "moved")
    fs.rename(walk(fs, "moved"), "inner", walk(fs, "moved"), "inner2")
    fs.close()
    assert flatten_redirects(layers.lowers, layers.upper, layers.work) >= 1
    for dirpath, dirnames, _ in os.walk(layers.upper):
        for d in dirnames:
            assert ondisk.read_redirect(os.path.join(dirpath, d)) is None
    # the upper alone (no lowers) now shows the renamed tree
    alone = UnionFS([str(layers.upper)], None, None)
    assert names(alone, "moved") == {"a", "inner2"}
    assert read(alone, "moved/inner2/x") == b"x"
    assert names(layers.open(), "moved") == {"a", "inner2"}


def test_mark_opaque_writes_a_marker_every_reader_sees(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    ondisk.mark_opaque(str(d))
    assert os.getxattr(d, "user.overlay.opaque") == b"y"  # readable inside a user namespace too
    if IS_ROOT:
        assert os.getxattr(d, "trusted.overlay.opaque") == b"y"


def test_copied_up_file_keeps_its_inode_number_across_remounts(layers: Layers) -> None:
    write_file(layers.lowers[1] / "d" / "f", "x")
    fs = layers.open()
    ino = walk(fs, "d/f").ino
    fs.setattr(walk(fs, "d/f"), mode=0o600)
    assert walk(fs, "d/f").ino == ino
    fs.close()
    fresh = layers.open()
    assert walk(fresh, "d/f").ino == ino
    assert "trusted.overlay.lamina.origin" not in fresh.listxattr(walk(fresh, "d/f"))


def test_xattrs_on_the_root_directory(layers: Layers) -> None:
    fs = layers.open()
    fs.setxattr(fs.root, "user.a", b"hi")
    assert fs.getxattr(fs.root, "user.a") == b"hi"
    assert "user.a" in fs.listxattr(fs.root)
    fs.removexattr(fs.root, "user.a")
    assert "user.a" not in fs.listxattr(fs.root)


def test_mkdir_over_whiteout_in_setgid_directory_inherits_setgid(layers: Layers) -> None:
    sg = layers.lowers[0] / "sg"
    write_file(sg / "old" / "x")
    os.chmod(sg, 0o2775)
    fs = layers.open()
    fs.unlink(walk(fs, "sg/old"), "x")
    fs.rmdir(walk(fs, "sg"), "old")
    fs.mkdir(walk(fs, "sg"), "old", 0o755, ME)
    fs.mkdir(walk(fs, "sg"), "new", 0o755, ME)
    assert stat.S_IMODE(os.lstat(layers.upper / "sg" / "old").st_mode) == 0o2755
    assert stat.S_IMODE(os.lstat(layers.upper / "sg" / "new").st_mode) == 0o2755


def test_hardlink_name_looked_up_after_copy_up_sees_the_copy_even_after_remount(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "p" / "f", "0123456789")
    (low / "q").mkdir()
    os.link(low / "p" / "f", low / "q" / "g")
    os.utime(low / "q", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    fs = layers.open()
    f = walk(fs, "p/f")
    ino = f.ino
    fd, _ = fs.open(f, os.O_WRONLY)
    os.pwrite(fd, b"AB", 2)
    fs.release(f, fd)
    g = walk(fs, "q/g")  # never looked up before the write
    assert g.ino == ino and read(fs, "q/g") == b"01AB456789"
    assert os.lstat(layers.upper / "q").st_mtime_ns == 1_500_000_000_000_000_000
    fs.close()
    fresh = layers.open()
    assert read(fresh, "q/g") == b"01AB456789"
    assert walk(fresh, "q/g").ino == walk(fresh, "p/f").ino == ino
    fresh.close()
    # a mount that never saw either name looked up: the index still joins them
    shutil.rmtree(layers.upper / "q")
    assert read(layers.open(), "q/g") == b"01AB456789"


def test_link_counts_of_lower_hardlinks_follow_the_merged_view(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "p" / "f", "x")
    (low / "q").mkdir()
    os.link(low / "p" / "f", low / "q" / "g")
    os.link(low / "p" / "f", low / "q" / "h")
    fs = layers.open()

    def nlink(path: str) -> int:
        node = walk(fs, path)
        return fs.nlink(node, fs.stat(node)[0])

    assert nlink("p/f") == 3
    fs.setattr(walk(fs, "p/f"), mode=0o600)  # copy-up: the index link does not count
    assert nlink("p/f") == 3
    fs.unlink(walk(fs, "q"), "g")
    assert nlink("p/f") == 2
    fs.link(walk(fs, "p/f"), walk(fs, "q"), "new")
    assert nlink("p/f") == 3 and nlink("q/h") == 3
    fs.rename(walk(fs, "q"), "new", walk(fs, "q"), "renamed")
    assert nlink("q/renamed") == 3


def test_removing_a_name_of_a_lower_hardlink_keeps_the_count_without_copying_data(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "p" / "f", "lower data")
    write_file(low / "p" / "other", "other")
    (low / "q").mkdir()
    os.link(low / "p" / "f", low / "q" / "g")
    os.link(low / "p" / "f", low / "q" / "h")
    fs = layers.open()

    def nlink(fs: UnionFS, path: str) -> int:
        node = walk(fs, path)
        return fs.nlink(node, fs.stat(node)[0])

    fs.unlink(walk(fs, "q"), "g")
    assert nlink(fs, "p/f") == 2 and nlink(fs, "q/h") == 2
    assert not walk(fs, "p/f").in_upper
    assert not (layers.upper / "p").exists()  # no data was copied: only the whiteout of q/g
    assert ondisk.is_whiteout_stat(os.lstat(layers.upper / "q" / "g"))
    fs.rename(walk(fs, "p"), "other", walk(fs, "q"), "h")  # a rename over a name counts too
    fs.close()

    fs = layers.open()  # the count survives a remount
    assert names(fs, "q") == {"h"} and names(fs, "p") == {"f"}
    assert read(fs, "q/h") == b"other" and nlink(fs, "p/f") == 1
    fs.setattr(walk(fs, "p/f"), mode=0o600)  # a later copy-up starts from the kept count
    assert walk(fs, "p/f").in_upper and nlink(fs, "p/f") == 1
    assert not [n for n in os.listdir(layers.work / "lamina-index") if n.startswith("n")]
    fs.close()
    fs = layers.open()
    assert nlink(fs, "p/f") == 1 and read(fs, "p/f") == b"lower data"


def test_merged_paths_longer_than_path_max_work(layers: Layers) -> None:
    # The caller's path is short (relative to a deep cwd); ours, from the layer root, is not.
    prefix = "/".join(f"p{i:02d}" + "x" * 120 for i in range(5))
    (layers.lowers[0] / prefix).mkdir(parents=True)
    fs = layers.open()
    node = walk(fs, prefix)
    for i in range(32):  # 32 * 128 = 4096 bytes below a 620-byte prefix
        node = fs.mkdir(node, f"d{i:02d}" + "y" * 124, 0o755, ME)
    assert len(node.path()) > 4096
    child, fd = fs.create(node, "leaf", 0o644, os.O_WRONLY, ME)
    os.write(fd, b"deep")
    fs.release(child, fd)
    fs.setattr(child, mode=0o600, mtime_ns=10**9, atime_ns=10**9)
    fs.setxattr(child, "user.deep", b"1")
    assert fs.getxattr(child, "user.deep") == b"1"
    assert fs.stat(child)[0].st_size == 4
    fs.rename(node, "leaf", node, "leaf2")
    fs.unlink(node, "leaf2")
    assert fs.list_dir(node) == []


# --- 7b. inode numbers of removed objects the kernel still knows -----------------------------------
#
# The kernel may keep a node after its last name went (no FORGET yet: an open O_PATH descriptor, a
# release still in flight). The backing filesystem must not hand that node's backing inode number to
# a new object meanwhile (ext4 reuses a freed number at once), or the new object's number would
# collide with the live node's and differ after a remount.

UPPER_SLOT_BASE = 1 << 48


def kernel_knows(node: Node) -> Node:
    node.lookups += 1  # what the adapter does for every entry it replies with
    return node


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_removed_file_the_kernel_still_knows_keeps_its_number_to_itself(layers: Layers) -> None:
    fs = layers.open()
    old, fd = fs.create(fs.root, "old", 0o644, os.O_WRONLY, ME)
    kernel_knows(old)
    fs.release(old, fd)
    old_backing = os.lstat(layers.upper / "old").st_ino
    fs.unlink(fs.root, "old")
    new = []
    for i in range(8):
        node, fd = fs.create(fs.root, f"new{i}", 0o644, os.O_WRONLY, ME)
        fs.release(node, fd)
        new.append(node)
    backing = [os.lstat(layers.upper / f"new{i}").st_ino for i in range(8)]
    assert old_backing not in backing  # pinned until the kernel forgets the old node
    assert [n.ino for n in new] == [UPPER_SLOT_BASE | b for b in backing]
    assert old.ino not in {n.ino for n in new}
    fds = open_fds()
    fs.table.forget(old, 1)
    assert open_fds() == fds - 1  # the pin goes with the node
    fresh = layers.open()
    assert [walk(fresh, f"new{i}").ino for i in range(8)] == [n.ino for n in new]


def test_pins_are_bounded_and_released(layers: Layers) -> None:
    unmounted = open_fds()
    fs = layers.open()
    fs.table.max_pins = 2
    fds = open_fds()
    known = []
    for i in range(3):
        node, fd = fs.create(fs.root, f"f{i}", 0o644, os.O_WRONLY, ME)
        known.append(kernel_knows(node))
        fs.release(node, fd)
        fs.unlink(fs.root, f"f{i}")
    assert fs.table.pins == 2 and open_fds() == fds + 2  # the third goes unpinned (and unprotected)
    assert not known[2].identities
    fs.table.forget(known[0], 1)
    assert fs.table.pins == 1 and open_fds() == fds + 1
    fs.close()
    assert fs.table.pins == 0 and open_fds() == unmounted


def test_removed_directory_and_replaced_file_keep_their_numbers_to_themselves(layers: Layers) -> None:
    fs = layers.open()
    d = kernel_knows(fs.mkdir(fs.root, "d", 0o755, ME))
    fs.rmdir(fs.root, "d")
    e = fs.mkdir(fs.root, "e", 0o755, ME)
    assert e.ino != d.ino and e.ino == UPPER_SLOT_BASE | os.lstat(layers.upper / "e").st_ino
    for name in ("src", "dst"):
        node, fd = fs.create(fs.root, name, 0o644, os.O_WRONLY, ME)
        fs.release(node, fd)
    dst = kernel_knows(walk(fs, "dst"))
    fs.rename(fs.root, "src", fs.root, "dst")
    node, fd = fs.create(fs.root, "f", 0o644, os.O_WRONLY, ME)
    fs.release(node, fd)
    assert node.ino != dst.ino and node.ino == UPPER_SLOT_BASE | os.lstat(layers.upper / "f").st_ino
    fresh = layers.open()
    assert walk(fresh, "e").ino == e.ino and walk(fresh, "f").ino == node.ino


def test_removed_node_nobody_knows_is_dropped_at_once(layers: Layers) -> None:
    fs = layers.open()
    node, fd = fs.create(fs.root, "f", 0o644, os.O_WRONLY, ME)
    fs.release(node, fd)
    fds = open_fds()
    fs.unlink(fs.root, "f")
    assert fs.table.get(node.ino) is None and open_fds() == fds
    again, fd = fs.create(fs.root, "g", 0o644, os.O_WRONLY, ME)
    fs.release(again, fd)
    assert again.ino == UPPER_SLOT_BASE | os.lstat(layers.upper / "g").st_ino


def test_forgotten_directory_takes_what_the_kernel_never_looked_up_below_it(layers: Layers) -> None:
    """A rename with redirects off (as in a user namespace) copies the whole tree up, making nodes
    the kernel never looks up; when the kernel then forgets the directory (a busy machine reclaims
    dentries), those must go with it. Left behind, they kept identities whose parent was gone:
    "sub" came back with a counter number that a remount does not give (the differential test's
    "inode numbers changed after remount"), and "f" kept a path through the old directory, wrong
    once the directory moved on."""
    write_file(layers.lowers[1] / "src" / "sub" / "f", "f")
    fs = layers.open(redirect_dir=False)
    src = kernel_knows(walk(fs, "src"))
    fs.rename(fs.root, "src", fs.root, "dst")
    fs.table.forget(src, 1)
    assert set(fs.table.by_ino) == {fs.root.ino}  # nothing is left of what nobody knows
    kernel_knows(walk(fs, "dst/sub/f"))
    fs.rename(fs.root, "dst", fs.root, "moved")
    assert read(fs, "moved/sub/f") == b"f"
    remounted = layers.open()
    assert [walk(fs, p).ino for p in ("moved", "moved/sub", "moved/sub/f")] == \
        [walk(remounted, p).ino for p in ("moved", "moved/sub", "moved/sub/f")]


def test_forgotten_directory_stays_while_the_kernel_knows_something_below_it(layers: Layers) -> None:
    """A node below that the kernel still knows (forgets may come in any order) keeps the
    directory's node, so that looking the directory up again finds that same node."""
    write_file(layers.lowers[0] / "d" / "e" / "f", "f")
    fs = layers.open()
    d = kernel_knows(walk(fs, "d"))
    f = kernel_knows(walk(fs, "d/e/f"))
    fs.table.forget(d, 1)
    assert walk(fs, "d") is d and walk(fs, "d/e/f") is f
    fs.table.forget(f, 1)
    fs.table.maybe_drop(d)
    assert set(fs.table.by_ino) == {fs.root.ino}


def test_other_name_of_a_removed_upper_hardlink_is_the_same_node(layers: Layers) -> None:
    write_file(layers.upper / "a", "linked")
    os.link(layers.upper / "a", layers.upper / "b")
    fs = layers.open()
    a = kernel_knows(walk(fs, "a"))
    fs.unlink(fs.root, "a")
    b = walk(fs, "b")  # never looked up while "a" was there
    assert b is a and not b.deleted and read(fs, "b") == b"linked"
    assert walk(layers.open(), "b").ino == a.ino


def test_other_name_of_a_removed_lower_hardlink_is_the_same_node(layers: Layers) -> None:
    low = layers.lowers[0]
    write_file(low / "p" / "f", "0123456789")
    (low / "q").mkdir()
    os.link(low / "p" / "f", low / "q" / "g")
    fs = layers.open()
    f = kernel_knows(walk(fs, "p/f"))
    fs.unlink(walk(fs, "p"), "f")
    g = walk(fs, "q/g")
    assert g is f and not g.deleted and read(fs, "q/g") == b"0123456789"
    assert walk(layers.open(), "q/g").ino == f.ino


def test_removed_object_takes_its_origin_index_entry_along(layers: Layers) -> None:
    # Where the origin xattr is refused (user.* on a symlink, in a user namespace), the index keeps
    # it under the upper inode number; a new object that gets the number must not inherit it.
    os.symlink("target", layers.lowers[0] / "s")
    fs = layers.open()
    fs.origin_xattr = "user.overlay.lamina.origin"
    fs.setattr(walk(fs, "s"), mtime_ns=10**18, atime_ns=10**18)  # copy-up
    upper_ino = os.lstat(layers.upper / "s").st_ino
    assert (layers.work / "lamina-index" / f"u{upper_ino}").is_symlink()
    fs.unlink(fs.root, "s")
    assert not os.path.lexists(layers.work / "lamina-index" / f"u{upper_ino}")
    node, fd = fs.create(fs.root, "new", 0o644, os.O_WRONLY, ME)
    fs.release(node, fd)
    fresh = layers.open()
    fresh.origin_xattr = "user.overlay.lamina.origin"
    assert walk(fresh, "new").ino == node.ino


def test_stale_origin_index_entry_is_not_inherited_by_a_new_object(layers: Layers) -> None:
    # A crash between removing an object and its index entry leaves the entry behind.
    write_file(layers.upper / "f")
    stale = os.lstat(layers.upper / "f").st_ino
    layers.open().close()  # makes the index
    os.symlink("1:12345", layers.work / "lamina-index" / f"u{stale}")
    fs = layers.open()
    os.unlink(layers.upper / "f")  # as the crashed mount did
    created = []
    for i in range(8):
        node, fd = fs.create(fs.root, f"n{i}", 0o644, os.O_WRONLY, ME)
        fs.release(node, fd)
        created.append(node)
    if stale not in [os.lstat(layers.upper / f"n{i}").st_ino for i in range(8)]:
        pytest.skip("the backing filesystem did not reuse the inode number")
    fresh = layers.open()
    assert [walk(fresh, f"n{i}").ino for i in range(8)] == [n.ino for n in created]


def test_fd_relative_xattrs_agree_with_the_proc_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """getxattrat/listxattrat (where the kernel has them) and the /proc/self/fd path give the same
    answers: values of any size, long name lists, symlinks not followed, absent xattrs, missing files."""
    from unionfs.core import backing

    write_file(tmp_path / "d" / "f")
    os.symlink("f", tmp_path / "d" / "link")
    os.setxattr(tmp_path / "d" / "f", "user.small", b"y")
    os.setxattr(tmp_path / "d" / "f", "user.big", bytes(range(256)) * 4)  # past the first guess
    for i in range(50):  # a name list longer than the first guess
        os.setxattr(tmp_path / "d", f"user.name-{i:03d}-" + "x" * 20, b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def answers() -> list[object]:
            got: list[object] = []
            for path, name in [("d/f", "user.small"), ("d/f", "user.big"), ("d/f", "user.none"),
                               ("d/link", "user.small"), ("d", "user.name-000-" + "x" * 20)]:
                got.append(backing.getxattr_at(fd, path, name))
            for path in ("d/f", "d/link", "d"):
                got.append(sorted(backing.listxattr_at(fd, path)))
            for call in (lambda: backing.getxattr_at(fd, "d/missing", "user.small"),
                         lambda: backing.listxattr_at(fd, "d/missing")):
                with pytest.raises(FileNotFoundError):
                    call()
            return got

        fast = answers()
        monkeypatch.setattr(backing, "_xattrat_usable", False)
        assert fast == answers()
        assert fast[0] == b"y" and fast[1] == bytes(range(256)) * 4 and fast[2] is None and fast[3] is None
        assert len(fast[7]) == 50  # type: ignore[arg-type]
    finally:
        os.close(fd)


# --- policies of what callers see (unionfs.core.attributes) ---------------------------------------


def test_merged_directories_count_one_link_and_plain_ones_their_own(layers: Layers) -> None:
    # The kernel's overlayfs shows 1 for a directory merged from several layers (its
    # subdirectories are not counted; find(1) then looks into it instead of skipping).
    for low in layers.lowers:
        (low / "merged" / "sub").mkdir(parents=True)
    (layers.lowers[0] / "plain" / "a").mkdir(parents=True)
    (layers.lowers[0] / "plain" / "b").mkdir()
    fs = layers.open()

    def nlink(path: str) -> int:
        node = walk(fs, path)
        return fs.nlink(node, fs.stat(node)[0])

    assert nlink("merged") == 1
    assert nlink("plain") == 4  # '.', its name, and two subdirectories' '..'
    fs.mkdir(walk(fs, "plain"), "c", 0o755, ME)  # copied up: the upper merges with the lower
    assert nlink("plain") == 1
    new = fs.mkdir(fs.root, "new", 0o755, ME)  # upper only: its own count
    fs.mkdir(new, "sub", 0o755, ME)
    assert nlink("new") == os.stat(layers.upper / "new").st_nlink == 3


def test_removed_file_counts_what_it_still_has(layers: Layers) -> None:
    fs = layers.open()
    node, fd = fs.create(fs.root, "f", 0o644, os.O_RDWR, ME)
    fs.link(node, fs.root, "g")
    fs.unlink(fs.root, "f")
    assert fs.nlink(node, fs.stat(node)[0]) == 1  # its other name
    fs.unlink(fs.root, "g")
    assert node.deleted
    assert fs.nlink(node, fs.stat(node)[0]) == 0  # open, no name left
    fs.release(node, fd)


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


def test_write_access_to_a_read_only_union_is_erofs(layers: Layers) -> None:
    fs = UnionFS([str(p) for p in layers.lowers], None, None)
    with pytest.raises(OSError) as e:
        fs.may_access(os.W_OK, ME, stat.S_IFREG | 0o666, ME.uid, ME.gid)
    assert e.value.errno == errno.EROFS
    assert fs.may_access(os.R_OK, ME, stat.S_IFREG | 0o444, ME.uid, ME.gid)
    fs.close()


def test_the_core_reports_changed_and_dropped_nodes(layers: Layers) -> None:
    # What the adapter caches by inode number depends on these reports (unionfs.kernel_cache).
    (layers.lowers[0] / "d").mkdir()
    fs = layers.open()
    cached: dict[int, str] = {}
    dropped: list[int] = []
    fs.forget_on_change = cached
    fs.table.on_drop = lambda node: dropped.append(node.ino)
    d = walk(fs, "d")
    cached[d.ino] = "attributes of d"
    node, fd = fs.create(d, "f", 0o644, os.O_RDWR, ME)
    assert d.ino not in cached  # its mtime and ctime changed
    cached[node.ino] = "attributes of f"
    fs.setattr(node, mode=0o600)
    assert node.ino not in cached
    fs.release(node, fd)
    assert node.ino in dropped  # no lookup by the kernel, no open file: gone from the table
