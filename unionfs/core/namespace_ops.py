"""Operations that add and remove names: create, mknod, mkdir, symlink, link, unlink, rmdir.

Removing a name that a lower layer shows leaves a whiteout (unionfs.core.marking), written through
the workdir and renamed over the old entry so the name never shows the lower object in between. A
directory made where a lower name was whited out is opaque, so the hidden lower contents stay
hidden.

A removed node the kernel still knows keeps its attributes and, when its identity comes from an
upper object, pins that object (``before_removal``; unionfs.core.nodes says why). Removing a name
of a lower hardlink updates its link count in the hard-link index (unionfs.core.hardlinks).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from unionfs.core import fsat, ondisk
from unionfs.core.attributes import AttributeReader
from unionfs.core.backing import (
    RENAME_EXCHANGE,
    Layer,
    join,
    lstat_at,
    remove_tree_at,
    renameat2,
    setxattr_at,
)
from unionfs.core.copyup import copy_up
from unionfs.core.nodes import Node
from unionfs.core.tree import Caller, UnionTree, check_name, ensure_writable, index_entry_name

log = logging.getLogger(__name__)


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class NamespaceOps:
    """Adds and removes names in the merged tree."""

    def __init__(self, tree: UnionTree, attributes: AttributeReader) -> None:
        self.tree = tree
        self.attributes = attributes

    def link_from_index(self, parent: Node, name: str, layer: Layer, path: str,
                        st: os.stat_result) -> Node | None:
        """A lower hardlink whose other name was copied up (maybe in an earlier mount): give this
        name the upper copy too, by a hard link from the index, so every name shows the same data."""
        index = self.tree.index
        if self.tree.readonly or not index.enabled or not index.has_entry(layer.slot, st.st_ino):
            return None
        key = index_entry_name(layer.slot, st.st_ino)
        copy_up(self.tree, parent)
        ufd = self.tree.upper_fd()
        cpath = parent.child_path(name)
        ppath = parent.path() or "."
        pst = fsat.stat(ppath, dir_fd=ufd)
        fsat.link(key, cpath, src_dir_fd=index.fd, dst_dir_fd=ufd, follow_symlinks=False)
        fsat.utime(ppath, ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=ufd)
        ust = fsat.stat(cpath, dir_fd=ufd, follow_symlinks=False)
        node = self.tree._node_for(parent, name, stat.S_IFMT(ust.st_mode),
                                   self.tree.upper_identity(cpath, ust.st_ino), True, [(layer, path)])
        node.st_hint = ust
        self.tree.touch(parent)
        return node

    def lower_hardlink_count(self, node: Node) -> int | None:
        """For a lower-only file with several names (that are counted, see HardlinkIndex.nlink):
        how many it has now. None for anything else."""
        return self.tree.index.lower_hardlink_count(node, self.attributes.lower_nlink)

    def before_removal(self, node: Node, parent: Node, name: str) -> os.stat_result | None:
        """Before ``parent/name`` goes: keep the node's attributes (see ``stat`` of removed nodes),
        and pin its upper object if the kernel keeps the node once its last name is gone (nodes.py
        says why). Returns the upper object's stat, for ``forget_name``; None when it has none."""
        table = self.tree.table
        if node.in_upper and table.survives(node) and table.needs_pin(node) \
                and table.is_last_name(node, parent, name):
            path = parent.child_path(name)
            if table.pins >= table.max_pins:
                log.debug("%d removed files still referenced: /%s not pinned, its inode number may "
                          "change at remount", table.pins, path)
            else:
                try:
                    fd = fsat.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.tree.upper_fd())
                except OSError as e:
                    log.debug("could not pin /%s: %s", path, e)
                else:
                    table.pin(node, fd)
                    node.gone_stat = os.fstat(fd)  # cheaper than a second walk of the path
                    return node.gone_stat
        if not node.in_upper and node.lower_st is not None:
            node.gone_stat = node.lower_st
            return None
        try:
            layer, lpath = self.tree.backing(node)
            node.gone_stat = lstat_at(layer.fd, lpath)
        except OSError:
            node.gone_stat = None
        if node.in_upper:
            return node.gone_stat
        node.lower_st = node.gone_stat  # what the unlink that follows asks has_one_lower_name
        return None

    def forget_name(self, node: Node, parent: Node, name: str, upper_st: os.stat_result | None) -> None:
        """After ``parent/name`` went; ``upper_st`` is what ``before_removal`` returned."""
        self.tree.table.unlink_name(node, parent, name)
        if upper_st is not None and (upper_st.st_nlink == 1 or stat.S_ISDIR(upper_st.st_mode)):
            self.tree.index.drop_origin(upper_st.st_ino)  # the object itself is gone
        if node.deleted:
            if node.children:
                for child in list(node.children.values()):
                    child.deleted = True
                    self.tree.table.drop_identities(child)
                    self.tree.table.maybe_drop(child)
                node.children.clear()
            self.tree.table.removed(node)

    def check_free(self, parent: Node, name: str) -> None:
        ensure_writable(self.tree)
        check_name(name)
        if parent.deleted:
            raise OSError(errno.ENOENT, "directory was removed")
        if self.tree.lookup(parent, name) is not None:
            raise OSError(errno.EEXIST, "file exists", name)

    # --- creating --------------------------------------------------------------------------------

    def _create(self, parent: Node, name: str, caller: Caller, mode: int,
                make: Callable[[int, str], None]) -> Node:
        """Create an object with ``make(dir_fd, name)`` at ``parent/name`` owned by the caller."""
        self.check_free(parent, name)
        copy_up(self.tree, parent)
        ufd = self.tree.upper_fd()
        ppath = parent.path()
        path = join(ppath, name)
        is_dir = stat.S_ISDIR(mode)
        pst = fsat.stat(ppath or ".", dir_fd=ufd)
        st: os.stat_result | None = None
        override: ondisk.OwnerOverride | None = None
        opaque = False
        if (not parent.lowers or parent.opaque) and \
                self.tree.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE:
            # Fast path: nothing below can show through here, so no whiteout or opaque marker is
            # needed; a stale whiteout in the upper shows up as EEXIST and takes the slow path.
            try:
                make(ufd, path)
                st, override = self._own(ufd, path, caller, pst, mode)
            except FileExistsError:
                st = None
        if st is None:
            wh = self.tree.marks.upper_whiteout_at(ppath, name)
            opaque = is_dir and (wh is not None or self.tree.lower_has(parent, name))
            if wh == "char" or opaque:
                # Build it in the workdir and swap it in: the name never shows the lower object.
                tmp = self.tree.tmp_name()
                make(self.tree.work_fd, tmp)
                override = self._own(self.tree.work_fd, tmp, caller, pst, mode)[1]
                if opaque:
                    self.tree.marks.set_opaque(self.tree.work_fd, tmp)
                if wh == "char" and is_dir:
                    renameat2(self.tree.work_fd, tmp, ufd, path, RENAME_EXCHANGE)
                    fsat.unlink(tmp, dir_fd=self.tree.work_fd)
                else:
                    fsat.rename(tmp, path, src_dir_fd=self.tree.work_fd, dst_dir_fd=ufd)
                if opaque:
                    self.tree.emit(f"opaque /{path}")
            else:
                make(ufd, path)
                override = self._own(ufd, path, caller, pst, mode)[1]
            if wh == "file":
                self.tree.marks.drop_whiteout_file(ppath, name)
            st = fsat.stat(path, dir_fd=ufd, follow_symlinks=False)
        self.tree.index.drop_origin(st.st_ino)
        self.tree.touch(parent)
        node = self.tree.table.add(stat.S_IFMT(st.st_mode), parent, name, (0, st.st_ino))
        node.in_upper = True
        node.opaque = opaque
        node.st_hint = st
        node.owner_override = override  # no getxattr to learn what was just written
        assert parent.children is not None
        parent.children[name] = node
        return node

    def _own(self, dfd: int, name: str, caller: Caller, pst: os.stat_result,
             mode: int) -> tuple[os.stat_result, ondisk.OwnerOverride | None]:
        """Give a new object the caller's owner (group of a setgid parent), as the kernel would.
        Returns its stat and the owner override written for it (None: it has none)."""
        st = fsat.stat(name, dir_fd=dfd, follow_symlinks=False)
        uid = caller.uid
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else caller.gid
        is_link = stat.S_ISLNK(st.st_mode)
        perm = mode & 0o7777
        if stat.S_ISDIR(st.st_mode) and pst.st_mode & stat.S_ISGID:
            perm |= stat.S_ISGID  # inherited from a setgid parent (also when made in the workdir)
        if not is_link and stat.S_ISREG(st.st_mode) and perm & stat.S_ISGID and caller.uid != 0 \
                and gid != caller.gid and gid not in _groups_of(caller.pid):
            perm &= ~stat.S_ISGID  # the kernel drops setgid for a group the creator is not in
        override = None
        if (st.st_uid, st.st_gid) != (uid, gid):
            try:
                fsat.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            except PermissionError:
                if not is_link:
                    override = ondisk.OwnerOverride(uid, gid, perm)
                    setxattr_at(dfd, name, ondisk.OWNER_OVERRIDE_XATTR, override.encode())
        changed = (st.st_uid, st.st_gid) != (uid, gid)
        if not is_link and (st.st_mode & 0o7777) != perm or (not is_link and perm & 0o6000):
            fsat.chmod(name, perm, dir_fd=dfd)
            changed = True
        return (fsat.stat(name, dir_fd=dfd, follow_symlinks=False) if changed else st), override

    def create(self, parent: Node, name: str, mode: int, flags: int, caller: Caller) -> tuple[Node, int]:
        """Create and open a regular file; returns the node and an open descriptor."""
        fds: list[int] = []

        def make(dfd: int, n: str) -> None:
            acc = flags & os.O_ACCMODE
            fds.append(fsat.open(n, acc | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                               mode & 0o7777, dir_fd=dfd))

        try:
            node = self._create(parent, name, caller, stat.S_IFREG | mode, make)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node.fds.append(fds[0])
        return node, fds[0]

    def mkdir(self, parent: Node, name: str, mode: int, caller: Caller) -> Node:
        return self._create(parent, name, caller, stat.S_IFDIR | mode,
                            lambda dfd, n: fsat.mkdir(n, mode & 0o7777, dir_fd=dfd))

    def mknod(self, parent: Node, name: str, mode: int, rdev: int, caller: Caller) -> Node:
        return self._create(parent, name, caller, mode,
                            lambda dfd, n: fsat.mknod(n, mode, rdev, dir_fd=dfd))

    def symlink(self, parent: Node, name: str, target: str, caller: Caller) -> Node:
        return self._create(parent, name, caller, stat.S_IFLNK | 0o777,
                            lambda dfd, n: fsat.symlink(target, n, dir_fd=dfd))

    def link(self, node: Node, parent: Node, name: str) -> Node:
        self.check_free(parent, name)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        copy_up(self.tree, node)
        copy_up(self.tree, parent)
        ufd = self.tree.upper_fd()
        ppath = parent.path()
        wh = self.tree.marks.upper_whiteout_at(ppath, name)
        src = node.path()
        if wh == "char":
            fsat.unlink(join(ppath, name), dir_fd=ufd)
        fsat.link(src, join(ppath, name), src_dir_fd=ufd, dst_dir_fd=ufd, follow_symlinks=False)
        if wh == "file":
            self.tree.marks.drop_whiteout_file(ppath, name)
        node.links.append((parent, name))
        assert parent.children is not None
        parent.children[name] = node
        self.tree.index.adjust_nlink(node, +1)
        self.tree.touch(node, parent)
        return node

    # --- removing --------------------------------------------------------------------------------

    def unlink(self, parent: Node, name: str) -> None:
        ensure_writable(self.tree)
        node = self.tree.lookup_existing(parent, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory", name)
        upper_st = self.before_removal(node, parent, name)
        copy_up(self.tree, parent)
        # A name that resolved to an object only the lowers have is a lower's name: it needs a
        # whiteout, and the upper holds nothing there yet (no need to ask the layers again).
        from_lower = not node.in_upper
        lower_count = self.lower_hardlink_count(node) if from_lower else None
        self.tree.index.adjust_nlink(node, -1)
        if from_lower or self.tree.lower_has(parent, name):
            self.tree.marks.whiteout(parent, name, upper_vacant=from_lower)
        else:
            fsat.unlink(join(parent.path(), name), dir_fd=self.tree.upper_fd())
        if lower_count is not None:
            self.tree.index.record_link_count(node, lower_count - 1)  # its other names count one less
        self.tree.touch(node, parent)
        self.forget_name(node, parent, name, upper_st)

    def rmdir(self, parent: Node, name: str) -> None:
        ensure_writable(self.tree)
        node = self.tree.lookup_existing(parent, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", name)
        if self.tree.list_dir(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty", name)
        upper_st = self.before_removal(node, parent, name)
        copy_up(self.tree, parent)
        if not node.in_upper or self.tree.lower_has(parent, name):  # see unlink
            self.tree.marks.whiteout(parent, name, upper_vacant=not node.in_upper)
        else:
            # merged-empty: what is left are whiteouts of lower entries
            remove_tree_at(self.tree.upper_fd(), join(parent.path(), name))
        self.tree.touch(node, parent)
        self.forget_name(node, parent, name, upper_st)
