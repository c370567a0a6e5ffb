"""What the adapter keeps per node for the kernel, by inode number, and the listings it sends.

The rules for what may be kept are in unionfs.fuse_ops's docstring ("What the kernel keeps"). State
lives here, keyed by inode number, not on the core's nodes: the core reports every node a change
reaches (``UnionTree.forget_on_change``) and every node it drops (``InodeTable.on_drop``, after which the
number may come back for another object), and this cache forgets what it had of them.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from unionfs.bare_entries import bare_entry_writer
from unionfs.core import DirEntry, UnionFS
from unionfs.core.nodes import Node

# All changes go through the mount, so the kernel may cache names and attributes for a long time.
CACHE_TIMEOUT = 86400.0
BARE_SCORE_RANGE = 32


class KernelCache:
    """Attributes given to the kernel, listing entries, and what is known of file capabilities."""

    def __init__(self, core: UnionFS) -> None:
        self.core = core
        # The attributes last given to the kernel (reused by lookup, getattr, setattr replies and
        # listings) until the core says the node changed.
        self.attrs_by_ino: dict[int, pyfuse3.EntryAttributes] = {}
        # Sent in a listing without attributes and not looked up since.
        self.listed_bare: set[int] = set()
        # Known to have no security.capability: a file gains it only through setxattr.
        self.no_caps: set[int] = set()
        self.bare_score = 0  # > 0: callers look up what they list; send true attributes
        self.make_bare = bare_entry_writer(pyfuse3.EntryAttributes)
        self._bare = pyfuse3.EntryAttributes()  # reused for every bare entry of every listing
        core.forget_on_change = self.attrs_by_ino
        # The core's attribute reader, called once per attributes made.
        self._stat = core.attributes.stat
        self._override_of = core.attributes.override_of
        self._nlink = core.attributes.visible_nlink
        core.table.on_drop = self.dropped

    def dropped(self, node: Node) -> None:
        ino = node.ino
        self.attrs_by_ino.pop(ino, None)
        self.listed_bare.discard(ino)
        self.no_caps.discard(ino)

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """The node's attributes (kept until the core says the node changed)."""
        cached = self.attrs_by_ino.get(node.ino)
        if cached is not None and not node.deleted:
            return cached
        hint = node.st_hint
        if hint is not None and not node.deleted:
            # fresh from the lookup or create this reply belongs to
            node.st_hint = None
            st, override = hint, self._override_of(node, hint)
        else:
            st, override = self._stat(node)
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        if override is not None:
            a.st_mode = stat.S_IFMT(st.st_mode) | override.mode
            a.st_uid = override.uid
            a.st_gid = override.gid
        else:
            a.st_mode = st.st_mode
            a.st_uid = st.st_uid
            a.st_gid = st.st_gid
        a.st_nlink = self._nlink(node, st)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blocks = st.st_blocks
        a.st_blksize = st.st_blksize
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        if not node.deleted:
            self.attrs_by_ino[node.ino] = a
        return a

    def size(self, node: Node) -> int:
        cached = self.attrs_by_ino.get(node.ino)
        if cached is not None:
            return int(cached.st_size)
        hint = node.st_hint
        if hint is not None:
            return int(hint.st_size)
        return self._stat(node)[0].st_size

    def looked_up(self, node: Node) -> None:
        """``node``, in ``listed_bare``, is being looked up: the caller uses what it lists, so true
        attributes in listings will save it a round trip per entry (see ``send_entries``)."""
        self.listed_bare.discard(node.ino)
        self.bare_score = min(self.bare_score + 4, BARE_SCORE_RANGE)

    def _bare_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """A plain listing entry (name, type, inode number; no node id, no attributes): the kernel
        makes no inode of it, so nothing it could keep may be wrong (see unionfs.bare_entries)."""
        assert self.make_bare is not None
        a = self._bare
        a.st_ino = node.ino
        a.st_mode = node.kind
        self.make_bare(a)
        return a

    def send_entries(self, token: pyfuse3.ReaddirToken, node: Node, entries: list[DirEntry],
                     start: int) -> None:
        """Reply with ``entries[start:]`` of directory ``node`` until the kernel's buffer is full
        (entry ``i`` has offset ``i + 3``: '.' and '..' come first)."""
        core = self.core
        attrs = self.attrs
        reply = pyfuse3.readdir_reply
        children = node.children
        assert children is not None
        number_is_stable = core.table.number_is_stable
        cached_attrs = self.attrs_by_ino
        listed_bare = self.listed_bare
        # Bare entries while callers do not look closer at what they list (ls, find, listdir);
        # true attributes, which cost a stat per entry, once they do (ls -l, du, a build's walk).
        use_bare = self.make_bare is not None and self.bare_score <= 0
        sent_bare = 0
        try:
            for i in range(start, len(entries)):
                entry = entries[i]
                child = children.get(entry.name)
                if child is None:
                    try:
                        child = core.entry_node(node, entry)
                    except (FileNotFoundError, NotADirectoryError):
                        child = None
                    if child is None:
                        continue  # removed since the listing was taken
                if use_bare and child.ino not in cached_attrs and not child.is_dir and number_is_stable(child):
                    # (A bare entry holds no lookup, so the node may be dropped and made again:
                    # only with a number that comes back is the listing's d_ino still its st_ino.)
                    # readdir_reply copies the entry at once, so one object serves every entry
                    if not reply(token, entry.raw, self._bare_entry(child), i + 3):
                        return
                    listed_bare.add(child.ino)
                    sent_bare += 1
                    continue
                try:
                    a = attrs(child)
                except FileNotFoundError:
                    continue
                if not reply(token, entry.raw, a, i + 3):
                    return
                child.lookups += 1
        finally:
            if sent_bare:
                self.bare_score = max(self.bare_score - sent_bare, -BARE_SCORE_RANGE)


def statvfs_data(sv: os.statvfs_result) -> pyfuse3.StatvfsData:
    """pyfuse3's form of an ``os.statvfs_result``."""
    out = pyfuse3.StatvfsData()
    for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
        setattr(out, name, getattr(sv, name))
    out.f_namemax = 255
    return out
