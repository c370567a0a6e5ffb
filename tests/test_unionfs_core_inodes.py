"""Unit tests of the pure core (unionfs.core): inode numbers, hard links and link counts, removed
objects the kernel still knows, and the fd-relative calls below them."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core import UnionFS
from unionfs.core.nodes import Node
from unionfs.core.stack import LayerStack
from unionfs_core_support import IS_ROOT, ME, Layers, names, read, walk, write_file


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


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
    assert flatten_redirects(LayerStack.from_top_down(layers.lowers), layers.upper, layers.work) >= 1
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


# --- 7c. link counts callers see (unionfs.core.attributes) ---------------------------------------


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
