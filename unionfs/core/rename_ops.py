"""Renaming: moving a name, exchanging two, and the directory moves that need the layers' help.

Renaming a directory that has lower contents does not copy them: the directory itself is copied up,
gets ``*.overlay.redirect`` naming its lower path (the kernel's redirect_dir format), is renamed in
the upper, and a whiteout hides the old name. Where redirects are off (user xattrs: the kernel
ignores user.overlay.redirect), the directory is copied up whole and made opaque instead. A pure
upper directory moved over a name that a lower shows is marked opaque.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from unionfs.core import fsat, ondisk
from unionfs.core.backing import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    join,
    lstat_at,
    remove_tree_at,
    renameat2,
)
from unionfs.core.copyup import copy_up
from unionfs.core.namespace_ops import NamespaceOps
from unionfs.core.nodes import UPPER_SLOT, Node
from unionfs.core.tree import UnionTree, check_name, ensure_writable

log = logging.getLogger(__name__)


class RenameOps:
    """Renames in the merged tree (removal bookkeeping of a replaced target: ``names``)."""

    def __init__(self, tree: UnionTree, names: NamespaceOps) -> None:
        self.tree = tree
        self.names = names

    def rename(self, oldp: Node, oldn: str, newp: Node, newn: str, flags: int = 0) -> None:
        ensure_writable(self.tree)
        check_name(newn)
        src = self.tree.lookup_existing(oldp, oldn)
        dst = self.tree.lookup(newp, newn)
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
            if dst.is_dir and self.tree.list_dir(dst):
                self._refuse_nonempty_target(oldp, oldn, src, newp, newn, dst)
        copy_up(self.tree, oldp)
        copy_up(self.tree, newp)
        copy_up(self.tree, src)
        dst_lower_count = self.names.lower_hardlink_count(dst) \
            if dst is not None and not dst.is_dir and not dst.in_upper else None
        dst_upper_st = self.names.before_removal(dst, newp, newn) if dst is not None else None
        ufd = self.tree.upper_fd()
        old_path, new_path = oldp.child_path(oldn), newp.child_path(newn)
        old_needs_whiteout = self.tree.lower_has(oldp, oldn)
        ust = lstat_at(ufd, new_path)
        if ust is not None:
            if stat.S_ISDIR(ust.st_mode):
                _empty_dir(ufd, new_path)  # merged-empty: only whiteouts left in it
            elif ondisk.is_whiteout_stat(ust) and src.is_dir:
                fsat.unlink(new_path, dir_fd=ufd)
        if src.is_dir:
            self._prepare_moved_dir(src, old_path, new_path, newp, newn)
        fsat.rename(old_path, new_path, src_dir_fd=ufd, dst_dir_fd=ufd)
        self.tree.marks.drop_whiteout_file(newp.path(), newn)
        if old_needs_whiteout:
            self.tree.marks.whiteout(oldp, oldn)
        self.tree.touch(oldp, newp, src, dst)
        if dst is not None:
            if not dst.is_dir:
                self.tree.index.adjust_nlink(dst, -1)
            if dst_lower_count is not None:
                self.tree.index.record_link_count(dst, dst_lower_count - 1)  # see unlink
            self.names.forget_name(dst, newp, newn, dst_upper_st)
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
        if pure_upper and self.tree.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE \
                and self.tree.lower_has(oldp, oldn):
            copy_up(self.tree, oldp)
            copy_up(self.tree, newp)
            copy_up(self.tree, src)
            try:
                renameat2(self.tree.upper_fd(), oldp.child_path(oldn), self.tree.upper_fd(), newp.child_path(newn),
                          RENAME_WHITEOUT)
            except OSError:
                pass
            else:  # pragma: no cover - the upper target held an entry a moment ago
                log.error("rename of /%s over the non-empty /%s went through", oldp.child_path(oldn),
                          newp.child_path(newn))
            self.tree.touch(oldp)
        raise OSError(errno.ENOTEMPTY, "directory not empty", newn)

    def _prepare_moved_dir(self, node: Node, old_path: str, new_path: str, newp: Node, newn: str) -> None:
        """Keep a moved directory's lower contents (redirect, or a full copy) or hide the target's."""
        if node.lowers and not node.opaque:
            if not self.tree.redirect_dir:
                self.copy_up_tree(node)
                self.tree.marks.drop_whiteouts(old_path)
                self.tree.marks.mark_opaque(old_path)
                self._detach_lowers(node)
                node.opaque = True
                return
            self.tree.marks.set_redirect(old_path, "/" + node.lowers[0][1])
            self.tree.emit(f"redirect /{old_path} -> /{new_path}")
        elif not node.opaque and self.tree.lower_has(newp, newn):
            self.tree.marks.mark_opaque(old_path)
            node.opaque = True

    def copy_up_tree(self, node: Node) -> None:
        """Copy up a directory and everything it shows, so the upper alone holds all of it."""
        copy_up(self.tree, node)
        for entry in self.tree.list_dir(node):
            child = self.tree.entry_node(node, entry)
            if child is None:
                continue
            if child.is_dir:
                self.copy_up_tree(child)
            else:
                copy_up(self.tree, child)

    def _detach_lowers(self, node: Node) -> None:
        """After a whole-tree copy-up the upper holds everything: the directories we know below
        must stop merging lower contents (their whiteouts are gone)."""
        pending = [node]
        while pending:
            n = pending.pop()
            if not n.is_dir:
                continue
            n.lowers = []
            self.tree.touch(n)
            if n.children:
                pending.extend(n.children.values())

    def flatten_redirects(self) -> int:
        """Replace every redirected directory of the upper by a full copy (opaque, no redirect).

        A layer tar cannot express a redirect; run this (unmounted) before exporting an upper.
        Returns the number of directories flattened.
        """
        ufd = self.tree.upper_fd()
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
                if self.tree.marks.redirect_of(sub) is None:
                    pending.append(sub)
                    continue
                node = self.tree.root
                for part in sub.split("/"):
                    found = self.tree.lookup(node, part)
                    if found is None:
                        break
                    node = found
                else:
                    self.copy_up_tree(node)
                    self.tree.marks.drop_whiteouts(sub)
                    self._detach_lowers(node)
                self.tree.marks.remove_redirect(sub)
                self.tree.marks.mark_opaque(sub)
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
        copy_up(self.tree, oldp)
        copy_up(self.tree, newp)
        copy_up(self.tree, src)
        copy_up(self.tree, dst)
        ufd = self.tree.upper_fd()
        old_path, new_path = oldp.child_path(oldn), newp.child_path(newn)
        if src.is_dir:
            self._prepare_moved_dir(src, old_path, new_path, newp, newn)
        if dst.is_dir:
            self._prepare_moved_dir(dst, new_path, old_path, oldp, oldn)
        renameat2(ufd, old_path, ufd, new_path, RENAME_EXCHANGE)
        self.tree.touch(oldp, newp, src, dst)
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


def _empty_dir(fd: int, path: str) -> None:
    dfd = fsat.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        for name in os.listdir(dfd):
            remove_tree_at(dfd, name)
    finally:
        os.close(dfd)
