"""Operations that change the merged tree: create, remove, rename, setattr, xattrs, open.

Removing a name that a lower layer shows leaves a whiteout (char 0/0 where mknod is allowed, else
``.wh.NAME``), written through the workdir and renamed over the old entry so the name never shows
the lower object in between. A directory made where a lower name was whited out is opaque, so the
hidden lower contents stay hidden.

Renaming a directory that has lower contents does not copy them: the directory itself is copied up,
gets ``*.overlay.redirect`` naming its lower path (the kernel's redirect_dir format), is renamed in
the upper, and a whiteout hides the old name. A pure upper directory moved over a name that a lower
shows is marked opaque instead.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from unionfs.core import fsat, ondisk
from unionfs.core.backing import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Layer,
    exists_at,
    getxattr_at,
    join,
    lstat_at,
    open_dir_at,
    remove_tree_at,
    removexattr_at,
    renameat2,
    setxattr_at,
)
from unionfs.core.copyup import copy_up
from unionfs.core.nodes import OVERRIDE_UNKNOWN, UPPER_SLOT, Node
from unionfs.core.tree import LAYER_XATTR, Caller, UnionTree, check_name, ensure_writable, index_entry_name

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


class UnionFS(UnionTree):
    """The whole core: the merged tree plus every operation that changes it."""

    # --- helpers ---------------------------------------------------------------------------------

    def copy_up(self, node: Node, truncate: bool = False) -> None:
        copy_up(self, node, truncate)

    def link_from_index(self, parent: Node, name: str, layer: Layer, path: str,
                        st: os.stat_result) -> Node | None:
        """A lower hardlink whose other name was copied up (maybe in an earlier mount): give this
        name the upper copy too, by a hard link from the index, so every name shows the same data."""
        if self.readonly or self.index_fd < 0:
            return None
        key = index_entry_name(layer.slot, st.st_ino)
        if not exists_at(self.index_fd, key):
            return None
        self.copy_up(parent)
        ufd = self._upper_fd()
        cpath = parent.child_path(name)
        ppath = parent.path() or "."
        pst = fsat.stat(ppath, dir_fd=ufd)
        fsat.link(key, cpath, src_dir_fd=self.index_fd, dst_dir_fd=ufd, follow_symlinks=False)
        fsat.utime(ppath, ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=ufd)
        ust = fsat.stat(cpath, dir_fd=ufd, follow_symlinks=False)
        node = self._node_for(parent, name, stat.S_IFMT(ust.st_mode), self.upper_identity(cpath, ust.st_ino),
                              True, [(layer, path)])
        node.st_hint = ust
        self.touch(parent)
        return node

    def _upper_fd(self) -> int:
        ensure_writable(self)
        assert self.upper is not None
        return self.upper.fd

    def whiteout(self, parent: Node, name: str, *, upper_vacant: bool = False) -> None:
        """Replace whatever the upper has at ``parent/name`` with a whiteout. ``upper_vacant``: the
        caller knows the upper has nothing there (the name shows a lower object)."""
        ufd = self._upper_fd()
        ppath = parent.path()
        path = join(ppath, name)
        st = None if upper_vacant else lstat_at(ufd, path)
        if self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE and st is None:
            # nothing to replace: creating the whiteout is one atomic step already
            self.make_char_whiteout(ufd, path)
        elif self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE:
            tmp = self.tmp_name()
            self.make_char_whiteout(self.work_fd, tmp)
            if st is not None and stat.S_ISDIR(st.st_mode):
                renameat2(self.work_fd, tmp, ufd, path, RENAME_EXCHANGE)
                remove_tree_at(self.work_fd, tmp)
            else:
                fsat.rename(tmp, path, src_dir_fd=self.work_fd, dst_dir_fd=ufd)
        else:
            pfd = open_dir_at(ufd, ppath)
            try:
                if not ondisk.whiteout_file_at(pfd, name):
                    ondisk.make_whiteout(pfd, name, ondisk.WhiteoutStyle.WH_FILE)
            finally:
                os.close(pfd)
            if st is not None:
                remove_tree_at(ufd, path)
        self.emit(f"whiteout /{path}")

    def _upper_whiteout_at(self, ppath: str, name: str) -> str | None:
        """'char' or 'file' when the upper holds a whiteout for ``name``; None otherwise."""
        ufd = self._upper_fd()
        st = lstat_at(ufd, join(ppath, name))
        if st is not None and ondisk.is_whiteout_stat(st):
            return "char"
        if ondisk.whiteout_file_at(ufd, join(ppath, name)):
            return "file"
        return None

    def mark_opaque(self, path: str) -> None:
        ondisk.set_marker_at(self._upper_fd(), path, self.xattr_ns, opaque=True)
        self.emit(f"opaque /{path}")

    def _lower_hardlink_count(self, node: Node) -> int | None:
        """For a lower-only file with several names (that are counted, see tree.nlink): how many it
        has now. None for anything else."""
        if node.is_dir or self.index_fd < 0 or self.has_one_lower_name(node):
            return None
        recorded = self.recorded_link_count(node)
        if recorded is not None:
            return recorded
        count = self._lower_nlink(node)
        return count if count > 1 else None

    def _lower_nlink(self, node: Node) -> int:
        cached = node.attr  # the adapter's attributes, when the kernel has seen them
        if cached is not None:
            return int(cached.st_nlink)
        hint = node.st_hint
        if hint is not None:
            return int(hint.st_nlink)
        layer, path = self.backing(node)
        st = lstat_at(layer.fd, path)
        return st.st_nlink if st is not None else 1

    def _before_removal(self, node: Node, parent: Node, name: str) -> os.stat_result | None:
        """Before ``parent/name`` goes: keep the node's attributes (see ``stat`` of removed nodes),
        and pin its upper object if the kernel keeps the node once its last name is gone (nodes.py
        says why). Returns the upper object's stat, for ``_forget_name``; None when it has none."""
        table = self.table
        if node.in_upper and table.survives(node) and table.needs_pin(node) \
                and table.is_last_name(node, parent, name):
            path = parent.child_path(name)
            if table.pins >= table.max_pins:
                log.debug("%d removed files still referenced: /%s not pinned, its inode number may "
                          "change at remount", table.pins, path)
            else:
                try:
                    fd = fsat.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._upper_fd())
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
            layer, lpath = self.backing(node)
            node.gone_stat = lstat_at(layer.fd, lpath)
        except OSError:
            node.gone_stat = None
        if node.in_upper:
            return node.gone_stat
        node.lower_st = node.gone_stat  # what the unlink that follows asks has_one_lower_name
        return None

    def _forget_name(self, node: Node, parent: Node, name: str, upper_st: os.stat_result | None) -> None:
        """After ``parent/name`` went; ``upper_st`` is what ``_before_removal`` returned."""
        self.table.unlink_name(node, parent, name)
        if upper_st is not None and (upper_st.st_nlink == 1 or stat.S_ISDIR(upper_st.st_mode)):
            self._drop_origin_entry(upper_st.st_ino)  # the object itself is gone
        if node.deleted:
            if node.children:
                for child in list(node.children.values()):
                    child.deleted = True
                    self.table.drop_identities(child)
                    self.table.maybe_drop(child)
                node.children.clear()
            self.table.removed(node)

    def _drop_origin_entry(self, upper_ino: int) -> None:
        """Remove the index's record of where upper object ``upper_ino`` came from (see copy-up):
        that object is gone, and the next object to get the number must not inherit its origin
        (and with it a lower object's inode number). Also run for every new object, for records
        a crash left between removing an object and its record."""
        if self.index_used:
            try:
                fsat.unlink(f"u{upper_ino}", dir_fd=self.index_fd)
            except FileNotFoundError:
                pass

    def _check_free(self, parent: Node, name: str) -> None:
        ensure_writable(self)
        check_name(name)
        if parent.deleted:
            raise OSError(errno.ENOENT, "directory was removed")
        if self.lookup(parent, name) is not None:
            raise OSError(errno.EEXIST, "file exists", name)

    # --- creating --------------------------------------------------------------------------------

    def _create(self, parent: Node, name: str, caller: Caller, mode: int,
                make: Callable[[int, str], None]) -> Node:
        """Create an object with ``make(dir_fd, name)`` at ``parent/name`` owned by the caller."""
        self._check_free(parent, name)
        self.copy_up(parent)
        ufd = self._upper_fd()
        ppath = parent.path()
        path = join(ppath, name)
        is_dir = stat.S_ISDIR(mode)
        pst = fsat.stat(ppath or ".", dir_fd=ufd)
        st: os.stat_result | None = None
        override: ondisk.OwnerOverride | None = None
        opaque = False
        if (not parent.lowers or parent.opaque) and \
                self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE:
            # Fast path: nothing below can show through here, so no whiteout or opaque marker is
            # needed; a stale whiteout in the upper shows up as EEXIST and takes the slow path.
            try:
                make(ufd, path)
                st, override = self._own(ufd, path, caller, pst, mode)
            except FileExistsError:
                st = None
        if st is None:
            wh = self._upper_whiteout_at(ppath, name)
            opaque = is_dir and (wh is not None or self.lower_has(parent, name))
            if wh == "char" or opaque:
                # Build it in the workdir and swap it in: the name never shows the lower object.
                tmp = self.tmp_name()
                make(self.work_fd, tmp)
                override = self._own(self.work_fd, tmp, caller, pst, mode)[1]
                if opaque:
                    ondisk.set_marker_at(self.work_fd, tmp, self.xattr_ns, opaque=True)
                if wh == "char" and is_dir:
                    renameat2(self.work_fd, tmp, ufd, path, RENAME_EXCHANGE)
                    fsat.unlink(tmp, dir_fd=self.work_fd)
                else:
                    fsat.rename(tmp, path, src_dir_fd=self.work_fd, dst_dir_fd=ufd)
                if opaque:
                    self.emit(f"opaque /{path}")
            else:
                make(ufd, path)
                override = self._own(ufd, path, caller, pst, mode)[1]
            if wh == "file":
                ondisk.remove_whiteout_file_at(ufd, join(ppath, name))
            st = fsat.stat(path, dir_fd=ufd, follow_symlinks=False)
        self._drop_origin_entry(st.st_ino)
        self.touch(parent)
        node = self.table.add(stat.S_IFMT(st.st_mode), parent, name, (0, st.st_ino))
        node.in_upper = True
        node.opaque = opaque
        node.st_hint = st
        node.owner_override = override  # no getxattr to learn what was just written
        node.no_caps = True  # file capabilities come only by setxattr, which resets this
        assert parent.children is not None
        parent.children[name] = node
        return node

    def _can_trusted(self) -> bool:
        return self.xattr_ns is ondisk.XattrNamespace.TRUSTED

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
        self._check_free(parent, name)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        self.copy_up(node)
        self.copy_up(parent)
        ufd = self._upper_fd()
        ppath = parent.path()
        wh = self._upper_whiteout_at(ppath, name)
        src = node.path()
        if wh == "char":
            fsat.unlink(join(ppath, name), dir_fd=ufd)
        fsat.link(src, join(ppath, name), src_dir_fd=ufd, dst_dir_fd=ufd, follow_symlinks=False)
        if wh == "file":
            ondisk.remove_whiteout_file_at(ufd, join(ppath, name))
        node.links.append((parent, name))
        assert parent.children is not None
        parent.children[name] = node
        self.adjust_nlink(node, +1)
        self.touch(node, parent)
        return node

    # --- removing --------------------------------------------------------------------------------

    def unlink(self, parent: Node, name: str) -> None:
        ensure_writable(self)
        node = self.lookup_existing(parent, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory", name)
        upper_st = self._before_removal(node, parent, name)
        self.copy_up(parent)
        # A name that resolved to an object only the lowers have is a lower's name: it needs a
        # whiteout, and the upper holds nothing there yet (no need to ask the layers again).
        from_lower = not node.in_upper
        lower_count = self._lower_hardlink_count(node) if from_lower else None
        self.adjust_nlink(node, -1)
        if from_lower or self.lower_has(parent, name):
            self.whiteout(parent, name, upper_vacant=from_lower)
        else:
            fsat.unlink(join(parent.path(), name), dir_fd=self._upper_fd())
        if lower_count is not None:
            self.record_link_count(node, lower_count - 1)  # its other names count one less
        self.touch(node, parent)
        self._forget_name(node, parent, name, upper_st)

    def rmdir(self, parent: Node, name: str) -> None:
        ensure_writable(self)
        node = self.lookup_existing(parent, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", name)
        if self.list_dir(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty", name)
        upper_st = self._before_removal(node, parent, name)
        self.copy_up(parent)
        if not node.in_upper or self.lower_has(parent, name):  # see unlink
            self.whiteout(parent, name, upper_vacant=not node.in_upper)
        else:
            # merged-empty: what is left are whiteouts of lower entries
            remove_tree_at(self._upper_fd(), join(parent.path(), name))
        self.touch(node, parent)
        self._forget_name(node, parent, name, upper_st)

    # --- rename ----------------------------------------------------------------------------------

    def rename(self, oldp: Node, oldn: str, newp: Node, newn: str, flags: int = 0) -> None:
        ensure_writable(self)
        check_name(newn)
        src = self.lookup_existing(oldp, oldn)
        dst = self.lookup(newp, newn)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise OSError(errno.EEXIST, "file exists", newn)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise OSError(errno.ENOENT, "no such file", newn)
            self._exchange(oldp, oldn, src, newp, newn, dst)
            return
        if dst is src:
            return
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", newn)
            if not src.is_dir and dst.is_dir:
                raise OSError(errno.EISDIR, "is a directory", newn)
            if dst.is_dir and self.list_dir(dst):
                self._refuse_nonempty_target(oldp, oldn, src, newp, newn, dst)
        self.copy_up(oldp)
        self.copy_up(newp)
        self.copy_up(src)
        dst_lower_count = self._lower_hardlink_count(dst) \
            if dst is not None and not dst.is_dir and not dst.in_upper else None
        dst_upper_st = self._before_removal(dst, newp, newn) if dst is not None else None
        ufd = self._upper_fd()
        old_path, new_path = oldp.child_path(oldn), newp.child_path(newn)
        old_needs_whiteout = self.lower_has(oldp, oldn)
        ust = lstat_at(ufd, new_path)
        if ust is not None:
            if stat.S_ISDIR(ust.st_mode):
                _empty_dir(ufd, new_path)  # merged-empty: only whiteouts left in it
            elif ondisk.is_whiteout_stat(ust) and src.is_dir:
                fsat.unlink(new_path, dir_fd=ufd)
        if src.is_dir:
            self._prepare_moved_dir(src, old_path, new_path, newp, newn)
        fsat.rename(old_path, new_path, src_dir_fd=ufd, dst_dir_fd=ufd)
        ondisk.remove_whiteout_file_at(ufd, join(newp.path(), newn))
        if old_needs_whiteout:
            self.whiteout(oldp, oldn)
        self.touch(oldp, newp, src, dst)
        if dst is not None:
            if not dst.is_dir:
                self.adjust_nlink(dst, -1)
            if dst_lower_count is not None:
                self.record_link_count(dst, dst_lower_count - 1)  # see unlink
            self._forget_name(dst, newp, newn, dst_upper_st)
        self._move_name(src, oldp, oldn, newp, newn)

    def _refuse_nonempty_target(self, oldp: Node, oldn: str, src: Node, newp: Node, newn: str,
                                dst: Node) -> None:
        """Fail a rename over a non-empty directory with ENOTEMPTY, after what the kernel does first.

        The kernel checks a merged target (or one with a lower origin) itself, before touching
        anything. A pure upper target it leaves to the upper filesystem: it copies up both parents
        and the source, then tries the upper rename, with RENAME_WHITEOUT where a lower shows the
        source's name; ext4 refuses that only after stamping the source's parent with the current
        mtime and ctime. The same call here (which cannot succeed: the target has a real upper
        entry) leaves the parent as whatever filesystem holds the upper leaves it for the kernel.
        """
        pure_upper = dst.in_upper and not dst.lowers and all(slot == UPPER_SLOT for slot, _ in dst.identities)
        if pure_upper and self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE \
                and self.lower_has(oldp, oldn):
            self.copy_up(oldp)
            self.copy_up(newp)
            self.copy_up(src)
            try:
                renameat2(self._upper_fd(), oldp.child_path(oldn), self._upper_fd(), newp.child_path(newn),
                          RENAME_WHITEOUT)
            except OSError:
                pass
            else:  # pragma: no cover - the upper target held an entry a moment ago
                log.error("rename of /%s over the non-empty /%s went through", oldp.child_path(oldn),
                          newp.child_path(newn))
            self.touch(oldp)
        raise OSError(errno.ENOTEMPTY, "directory not empty", newn)

    def _prepare_moved_dir(self, node: Node, old_path: str, new_path: str, newp: Node, newn: str) -> None:
        """Keep a moved directory's lower contents (redirect, or a full copy) or hide the target's."""
        ufd = self._upper_fd()
        if node.lowers and not node.opaque:
            if not self.redirect_dir:
                self.copy_up_tree(node)
                self._drop_whiteouts(old_path)
                self.mark_opaque(old_path)
                self._detach_lowers(node)
                node.opaque = True
                return
            target = "/" + node.lowers[0][1]
            current = getxattr_at(ufd, old_path, self.xattr_ns.redirect_xattr)
            if current != os.fsencode(target):
                ondisk.set_marker_at(ufd, old_path, self.xattr_ns, redirect=target)
            self.emit(f"redirect /{old_path} -> /{new_path}")
        elif not node.opaque and self.lower_has(newp, newn):
            self.mark_opaque(old_path)
            node.opaque = True

    def copy_up_tree(self, node: Node) -> None:
        """Copy up a directory and everything it shows, so the upper alone holds all of it."""
        self.copy_up(node)
        for entry in self.list_dir(node):
            child = self.entry_node(node, entry)
            if child is None:
                continue
            if child.is_dir:
                self.copy_up_tree(child)
            else:
                self.copy_up(child)

    def _detach_lowers(self, node: Node) -> None:
        """After a whole-tree copy-up the upper holds everything: the directories we know below
        must stop merging lower contents (their whiteouts are gone)."""
        pending = [node]
        while pending:
            n = pending.pop()
            if not n.is_dir:
                continue
            n.lowers = []
            self.touch(n)
            if n.children:
                pending.extend(n.children.values())

    def _drop_whiteouts(self, path: str) -> None:
        """Remove the whiteouts below an upper directory that now holds everything it shows and
        becomes opaque: the kernel lists a pure upper directory as it is, whiteouts included."""
        ufd = self._upper_fd()
        dfd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
        try:
            with os.scandir(dfd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                           for e in it]
            dst: os.stat_result | None = None
            for name, is_dir, is_file in entries:
                if is_dir:
                    self._drop_whiteouts(join(path, name))
                elif (ondisk.whited_out_name(name) is not None and is_file) or \
                        (not is_file and ondisk.is_whiteout_stat(fsat.stat(name, dir_fd=dfd, follow_symlinks=False))):
                    if dst is None:
                        dst = os.fstat(dfd)
                    fsat.unlink(name, dir_fd=dfd)
            if dst is not None:
                # What the directory shows did not change: neither do its times (as with copy-up).
                os.utime(dfd, ns=(dst.st_atime_ns, dst.st_mtime_ns))
        finally:
            os.close(dfd)

    def flatten_redirects(self) -> int:
        """Replace every redirected directory of the upper by a full copy (opaque, no redirect).

        A layer tar cannot express a redirect; run this (unmounted) before exporting an upper.
        Returns the number of directories flattened.
        """
        ufd = self._upper_fd()
        count = 0
        pending = [""]
        while pending:
            path = pending.pop()
            dfd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
            try:
                with os.scandir(dfd) as it:
                    subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            finally:
                os.close(dfd)
            for name in subdirs:
                sub = join(path, name)
                if ondisk.redirect_at(ufd, sub) is None:
                    pending.append(sub)
                    continue
                node = self.root
                for part in sub.split("/"):
                    found = self.lookup(node, part)
                    if found is None:
                        break
                    node = found
                else:
                    self.copy_up_tree(node)
                    self._drop_whiteouts(sub)
                    self._detach_lowers(node)
                ondisk.clear_redirect_at(ufd, sub)
                self.mark_opaque(sub)
                count += 1
                pending.append(sub)  # redirects nested below it go too
        return count

    def _move_name(self, node: Node, oldp: Node, oldn: str, newp: Node, newn: str) -> None:
        assert oldp.children is not None and newp.children is not None
        if oldp.children.get(oldn) is node:
            del oldp.children[oldn]
        if node.parent is oldp and node.name == oldn:
            node.parent, node.name = newp, newn
        else:
            try:
                node.links.remove((oldp, oldn))
            except ValueError:
                pass
            node.links.append((newp, newn))
        newp.children[newn] = node

    def _exchange(self, oldp: Node, oldn: str, src: Node, newp: Node, newn: str, dst: Node) -> None:
        self.copy_up(oldp)
        self.copy_up(newp)
        self.copy_up(src)
        self.copy_up(dst)
        ufd = self._upper_fd()
        old_path, new_path = oldp.child_path(oldn), newp.child_path(newn)
        if src.is_dir:
            self._prepare_moved_dir(src, old_path, new_path, newp, newn)
        if dst.is_dir:
            self._prepare_moved_dir(dst, new_path, old_path, oldp, oldn)
        renameat2(ufd, old_path, ufd, new_path, RENAME_EXCHANGE)
        self.touch(oldp, newp, src, dst)
        assert oldp.children is not None and newp.children is not None
        oldp.children.pop(oldn, None)
        newp.children.pop(newn, None)
        for node, (p, n), (q, m) in ((src, (oldp, oldn), (newp, newn)), (dst, (newp, newn), (oldp, oldn))):
            if node.parent is p and node.name == n:
                node.parent, node.name = q, m
            else:
                if (p, n) in node.links:
                    node.links.remove((p, n))
                node.links.append((q, m))
        newp.children[newn] = src
        oldp.children[oldn] = dst

    # --- attributes ------------------------------------------------------------------------------

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fd: int | None = None) -> None:
        ensure_writable(self)
        if not node.deleted:
            self.copy_up(node, truncate=size == 0)
        self.touch(node)
        ufd = self._upper_fd()
        path = node.path()
        live_fd = node.fds[0] if node.deleted and node.fds else None
        if node.deleted and live_fd is None:
            raise OSError(errno.ENOENT, "file was removed")
        target: str = f"/proc/self/fd/{live_fd}" if live_fd is not None else ""
        is_link = node.kind == stat.S_IFLNK
        is_dir = node.is_dir

        def current() -> os.stat_result:
            return os.fstat(live_fd) if live_fd is not None else fsat.stat(path or ".", dir_fd=ufd,
                                                                          follow_symlinks=False)

        if size is not None:
            tfd = fd if fd is not None else live_fd
            if tfd is not None:
                os.ftruncate(tfd, size)
            else:
                wfd = fsat.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
                try:
                    os.ftruncate(wfd, size)
                finally:
                    os.close(wfd)
        override = None
        owner_or_mode = not is_link and (uid is not None or gid is not None or mode is not None)
        if owner_or_mode and not target:
            override = self.stored_override(node)
        if uid is not None or gid is not None:
            st = current() if (uid is None or gid is None) and override is None else None
            new_uid = uid if uid is not None else (override.uid if override else st.st_uid)  # type: ignore[union-attr]
            new_gid = gid if gid is not None else (override.gid if override else st.st_gid)  # type: ignore[union-attr]
            try:
                if target:
                    fsat.chown(target, new_uid, new_gid)
                else:
                    fsat.chown(path or ".", new_uid, new_gid, dir_fd=ufd, follow_symlinks=False)
                if override is not None:
                    os.removexattr(target or f"/proc/self/fd/{ufd}/{path}", ondisk.OWNER_OVERRIDE_XATTR)
                    override = None
            except PermissionError:
                if is_link:
                    raise
                perm = override.mode if override else current().st_mode & 0o7777
                if not is_dir:
                    perm &= ~0o6000  # chown clears setuid/setgid, as a real chown would
                override = ondisk.OwnerOverride(new_uid, new_gid, perm)
                ondisk.write_owner_override(target or f"/proc/self/fd/{ufd}/{path}", override)
        if mode is not None and not is_link:
            perm = mode & 0o7777
            if override is not None:
                override = ondisk.OwnerOverride(override.uid, override.gid, perm)
                ondisk.write_owner_override(target or f"/proc/self/fd/{ufd}/{path}", override)
                # keep the real mode usable by us: the override is what callers see
                perm |= 0o700 if is_dir else 0o600
            if target:
                fsat.chmod(target, perm)
            else:
                fsat.chmod(path or ".", perm, dir_fd=ufd)
        if owner_or_mode:
            # What the object's override xattr holds now (see stored_override).
            node.owner_override = override if not target else OVERRIDE_UNKNOWN
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                cur = current()
                times = (atime_ns if atime_ns is not None else cur.st_atime_ns,
                         mtime_ns if mtime_ns is not None else cur.st_mtime_ns)
            else:
                times = (atime_ns, mtime_ns)
            if live_fd is not None:
                fsat.utime(live_fd, ns=times)
            else:
                fsat.utime(path or ".", ns=times, dir_fd=ufd, follow_symlinks=False)
        if (mode, uid, gid, size, atime_ns, mtime_ns) == (None,) * 6:
            # chown(f, -1, -1) comes as a setattr that changes nothing: Linux stamps ctime all the
            # same, and the same call on the upper object does.
            fsat.chown(target or path or ".", -1, -1, dir_fd=ufd, follow_symlinks=bool(target))

    # --- xattrs ----------------------------------------------------------------------------------

    def setxattr(self, node: Node, name: str, value: bytes, flags: int = 0) -> None:
        ensure_writable(self)
        if name == LAYER_XATTR or ondisk.is_private_xattr(name):
            raise OSError(errno.EPERM, "private attribute", name)
        self.copy_up(node)
        self.touch(node)
        setxattr_at(self._upper_fd(), node.path(), name, value, flags)

    def removexattr(self, node: Node, name: str) -> None:
        ensure_writable(self)
        if name == LAYER_XATTR or ondisk.is_private_xattr(name):
            raise OSError(errno.EPERM, "private attribute", name)
        self.getxattr(node, name)  # ENODATA before any copy-up
        self.copy_up(node)
        self.touch(node)
        removexattr_at(self._upper_fd(), node.path(), name)

    # --- files -----------------------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> tuple[int, bool]:
        """Open the node's backing file; writers (and O_TRUNC, whatever the access mode) get the
        upper copy. Returns (fd, in_upper)."""
        truncate = bool(flags & os.O_TRUNC)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or truncate:
            ensure_writable(self)
            self.copy_up(node, truncate=truncate)
            self.touch(node)
        layer, path = self.backing(node)
        keep = flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC | os.O_TRUNC)
        fd = fsat.open(path, keep | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=layer.fd)
        node.fds.append(fd)
        return fd, layer.is_upper

    def release(self, node: Node, fd: int) -> None:
        node.st_hint = None  # whatever was written through fd is not in it
        try:
            node.fds.remove(fd)
        except ValueError:
            pass
        os.close(fd)
        self.table.maybe_drop(node)

    def fsyncdir(self, node: Node) -> None:
        if not node.in_upper or self.upper is None:
            return
        fd = fsat.open(node.path() or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.upper.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _empty_dir(fd: int, path: str) -> None:
    dfd = fsat.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        for name in os.listdir(dfd):
            remove_tree_at(dfd, name)
    finally:
        os.close(dfd)
