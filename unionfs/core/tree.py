"""The merged tree: the layer stack, lookup through whiteouts/opaque/redirects, and listings.

Lookup follows the kernel's overlayfs (fs/overlayfs/namei.c): the upper first, then each lower
directory merged into the parent, top first. A whiteout (char 0/0, or ``.wh.NAME`` in the same
directory) ends the search; a non-directory ends it; a directory is merged with the directories of
the same name below it until one of them is opaque. An ``*.overlay.redirect`` xattr on a directory
redirects the search in the layers below to another path (absolute from the layer root, or a sibling
name), which is how a renamed lower directory keeps its contents without copying them.

The tree holds the parts every operation shares: the open directories (unionfs.core.dirs), the
hard-link index (unionfs.core.hardlinks) and the marker writer (unionfs.core.marking). What changes
the tree is in the ``*_ops`` modules, what callers see of an object in unionfs.core.attributes, and
unionfs.core.ops puts them together as :class:`~unionfs.core.ops.UnionFS`.

Nothing here imports pyfuse3: errors are OSError with an errno, which the adapter translates.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from unionfs.core import fsat, merge, ondisk
from unionfs.core.backing import (
    Layer,
    getxattr_at,
    join,
    lstat_at,
    split,
)
from unionfs.core.dirs import UnionError, open_union_dirs
from unionfs.core.hardlinks import HardlinkIndex, index_entry_name
from unionfs.core.marking import Marking, probe_whiteout_style, probe_xattr_namespace
from unionfs.core.nodes import OVERRIDE_UNKNOWN, InodeTable, Node

log = logging.getLogger(__name__)

LAYER_XATTR = "user.lamina.layer"
NAME_MAX = 255

__all__ = ["Caller", "DirEntry", "LAYER_XATTR", "UnionError", "UnionTree", "check_name", "ensure_writable",
           "index_entry_name"]


@dataclass
class Caller:
    """Who asks: the credentials of the process behind a request."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's


@dataclass(slots=True)
class DirEntry:
    """One entry of a merged listing, with a hint of where its top copy lives."""

    name: str
    layer: Layer
    path: str  # in a lower layer; for the upper it is recomputed (the directory may move)
    is_dir: bool
    kind: int  # S_IFMT bits, from d_type (no stat)
    ino: int  # d_ino: the backing st_ino, no stat needed
    raw: bytes  # the name as the kernel gets it


def check_name(name: str) -> None:
    if len(os.fsencode(name)) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long", name)


# The steps of a lookup (unionfs.core.merge), bound once: lookups compare with them in every layer.
_ENTRY, _LOOK_BELOW, _MERGE, _MERGE_LAST = merge.Step.ENTRY, merge.Step.LOOK_BELOW, merge.Step.MERGE, \
    merge.Step.MERGE_LAST

# In WORK/work: the char 0/0 device that whiteouts are hard links to (see make_char_whiteout).
SHARED_WHITEOUT = "whiteout"

# Lookups that must miss in one lower directory before its names are listed and kept: a listing
# costs about what 20 missed lookups do in a directory of a thousand entries.
LOWER_NAMES_AFTER = 2
NO_LOWER_NAMES = -1


class UnionTree:
    """Layers, nodes and read-only operations on the merged tree."""

    def __init__(
        self,
        lowers: list[str],
        upper: str | None,
        work: str | None,
        *,
        trace: Callable[[str], None] | None = None,
        layer_xattr: bool = False,
        redirect_dir: bool | None = None,
        opened: dict[str, int] | None = None,
    ) -> None:
        """``opened``: layer, upper and work directories already opened (by path as given), taken
        out of the dict as they are used (see unionfs.detached_layers); the rest are opened here."""
        self.trace = trace
        # Told of every finished copy-up, after the nodes it changed were touched: the adapter
        # drops what the kernel keeps of them (the copy has its own ctime, and so do the parents).
        self.on_copy_up: Callable[[Node], None] | None = None
        # What the adapter keeps by inode number that must go when a node changes (see ``touch``):
        # a mapping whose entry for the node is dropped, in place of a call per changed node.
        self.forget_on_change: dict[int, Any] | None = None
        self.layer_xattr = layer_xattr
        self.table = InodeTable()
        self.dirs = dirs = open_union_dirs(lowers, upper, work, opened)
        self.lowers = dirs.lowers
        self.upper = dirs.upper
        self.work_fd = dirs.work_fd
        self.readonly = self.upper is None
        # Names in busy lower directories, keyed by (layer index, path): lower layers never change
        # while mounted, so once a directory has missed LOWER_NAMES_AFTER lookups, one listing
        # answers its later misses (and their whiteout-file checks) without a system call. Until
        # then the value counts the misses; NO_LOWER_NAMES marks a directory we could not list.
        self._lower_names: dict[tuple[int, str], int | frozenset[str]] = {}
        self._tmp_counter = 0
        self.xattr_ns = probe_xattr_namespace(self.upper, self.work_fd)
        self.marks = Marking(self.upper, self.work_fd, self.xattr_ns,
                             probe_whiteout_style(self.upper, self.work_fd), self.tmp_name, self.emit)
        self.whiteout_style = self.marks.whiteout_style
        # Where a copied-up file records the lower object it came from (its inode number's source).
        self.origin_xattr = f"{self.xattr_ns.value}.overlay.lamina.origin"
        self.index = HardlinkIndex(dirs.index_fd, self.work_fd, f"{self.xattr_ns.value}.overlay.lamina.nlink",
                                   dirs.index_used, self.tmp_name)
        # Renamed lower directories get a redirect xattr only where the kernel would follow it: it
        # ignores user.overlay.redirect (userxattr mounts never follow redirects), so with user
        # xattrs a renamed directory is copied up whole instead, and the upper stays kernel-readable.
        self.redirect_dir = (self.xattr_ns is ondisk.XattrNamespace.TRUSTED) if redirect_dir is None \
            else redirect_dir
        self.root = self.table.new_root()
        self.root.in_upper = self.upper is not None
        self.root.lowers = [(layer, "") for layer in self.lowers]

    def close(self) -> None:
        self.table.close_pins()
        self.dirs.close()

    def tmp_name(self) -> str:
        """A fresh name in the scratch directory (WORK/work)."""
        self._tmp_counter += 1
        return f"#{os.getpid():x}.{self._tmp_counter:x}"

    def emit(self, line: str) -> None:
        if self.trace is not None:
            self.trace(line)

    def upper_fd(self) -> int:
        """The upper directory's descriptor; EROFS for a read-only union."""
        ensure_writable(self)
        assert self.upper is not None
        return self.upper.fd

    # --- lookup ----------------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, "stale inode")
        return node

    def lookup(self, parent: Node, name: str) -> Node | None:
        """The child ``name`` of ``parent`` in the merged view (no lookup count taken), or None."""
        assert parent.children is not None
        node = parent.children.get(name)
        if node is not None:
            return node
        if ondisk.is_marker_name(name) or name in (".", ".."):
            return None
        check_name(name)
        return self._resolve(parent, name)

    def lookup_existing(self, parent: Node, name: str) -> Node:
        node = self.lookup(parent, name)
        if node is None:
            raise OSError(errno.ENOENT, "no such file", name)
        return node

    def _resolve(self, parent: Node, name: str) -> Node | None:
        """Look ``name`` up in each layer, top first, and merge what they hold (:mod:`.merge`)."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if parent.deleted:
            return None
        ppath = parent.path()
        top_st: os.stat_result | None = None
        held = merge.ABSENT
        upper = self.upper
        if parent.in_upper and upper is not None:
            cpath = join(ppath, name)
            held, st = ondisk.held_at(upper.fd, cpath)
            step = held.steps[False]  # = merge.lookup_step(held, False), without the call
            if step is merge.Step.HIDDEN:
                return None
            if step is merge.Step.ENTRY:
                assert st is not None
                return self._upper_file_node(parent, name, cpath, st)
            top_st = st
        in_upper = top_st is not None
        opaque = held.opaque or (parent.opaque and not merge.reaches_below_opaque_parent(held.redirect))
        lowers: list[tuple[Layer, str]] = []
        lower_st: os.stat_result | None = None
        if not opaque:
            found = self._merge_lowers(parent, name, held.redirect, merging=in_upper)
            if isinstance(found, Node):
                return found
            lowers, lower_st = found
        if top_st is None:
            top_st = lower_st
        if top_st is None:
            return None
        return self._dir_node(parent, name, top_st, lower_st, in_upper, opaque, lowers)

    def _upper_file_node(self, parent: Node, name: str, path: str, st: os.stat_result) -> Node:
        """The node of a non-directory found in the upper at ``path``."""
        node = self._node_for(parent, name, stat.S_IFMT(st.st_mode), self.upper_identity(path, st.st_ino),
                              True, [])
        node.st_hint = st
        return node

    def _lower_file_node(self, parent: Node, name: str, layer: Layer, path: str,
                         st: os.stat_result) -> Node:
        """The node of a non-directory found first in lower ``layer`` at ``path``."""
        if st.st_nlink > 1 and self.index.used:
            linked = self.link_from_index(parent, name, layer, path, st)
            if linked is not None:
                return linked
        node = self._node_for(parent, name, stat.S_IFMT(st.st_mode), (layer.slot, st.st_ino),
                              False, [(layer, path)])
        node.st_hint = node.lower_st = st
        return node

    def _dir_node(self, parent: Node, name: str, top_st: os.stat_result, lower_st: os.stat_result | None,
                  in_upper: bool, opaque: bool, lowers: list[tuple[Layer, str]]) -> Node:
        """The node of a directory that ``_resolve`` found (``top_st``: its top copy's stat)."""
        if lowers and lower_st is not None:
            identity = (lowers[0][0].slot, lower_st.st_ino)
        elif in_upper:
            # e.g. a lower directory copied up whole (renamed without redirects): its origin
            identity = self.upper_identity(parent.child_path(name), top_st.st_ino)
        else:
            identity = (0, top_st.st_ino)
        node = self._node_for(parent, name, stat.S_IFDIR, identity, in_upper, lowers)
        node.st_hint = top_st
        node.opaque = opaque and in_upper
        return node

    def _merge_lowers(self, parent: Node, name: str, redirect: str | None, merging: bool
                      ) -> Node | tuple[list[tuple[Layer, str]], os.stat_result | None]:
        """The lower half of a lookup: the node when a lower non-directory is the entry, else the
        lower directories that merge into it (top first) and the top one's stat."""
        parent_paths = {layer.index: path for layer, path in parent.lowers}
        lowers: list[tuple[Layer, str]] = []
        lower_st: os.stat_result | None = None
        for layer in self.lowers:
            last_layer = False
            if redirect is not None and redirect.startswith("/"):
                path = redirect.strip("/")
                reach = merge.reach(ondisk.held_ancestors_at(layer.fd, path))
                if reach is merge.Reach.HIDDEN:
                    break
                if reach is merge.Reach.ABSENT:
                    continue
                last_layer = reach is merge.Reach.OPAQUE_ABOVE
            else:
                ppath_l = parent_paths.get(layer.index)
                if ppath_l is None:
                    continue
                if redirect is None:
                    known = self._lower_names.get((layer.index, ppath_l))
                    if type(known) is frozenset and name not in known:
                        if ondisk.whiteout_file_name(name) in known:
                            break
                        continue
                path = merge.path_below(ppath_l, name, redirect)
            held, st = ondisk.held_at(layer.fd, path)
            if held is merge.ABSENT and redirect is None:
                _count_lower_miss(self._lower_names, layer, split(path)[0])
            if layer.placeholders and st is not None and path in layer.placeholders:
                continue  # a device node rootless storage could not make: as if absent here
            step = held.steps[merging or bool(lowers)]  # = merge.lookup_step, without the call
            if step is _ENTRY:
                assert st is not None
                return self._lower_file_node(parent, name, layer, path, st)
            if step is _LOOK_BELOW and not last_layer:
                continue
            if step is _MERGE or step is _MERGE_LAST:
                lowers.append((layer, path))
                if lower_st is None:
                    lower_st = st
            if step is not _MERGE or last_layer:
                break
            if held.redirect is not None:
                redirect = held.redirect  # applies to the layers below this one
        return lowers, lower_st

    def _node_for(self, parent: Node, name: str, kind: int, identity: tuple[int, int], in_upper: bool,
                  lowers: list[tuple[Layer, str]]) -> Node:
        """Find or make the node for a resolved object and remember it as ``parent``'s child."""
        node = self.table.find(identity)
        register = True
        if node is not None:
            if node.kind != kind or (node.is_dir and (
                    node.deleted or node.parent is not parent or node.name != name)):
                self.table.drop_identities(node)  # stale
                node = None
            elif node.in_upper != in_upper:
                # A lower hardlink left behind when another name of it was copied up: the kernel
                # (index=off) makes it a separate file, and so do we.
                node = None
                register = False
            elif node.deleted:
                # Removed, not forgotten, and its object is still there under this other name
                # (a removed node keeps its identity only while its object cannot go: see nodes.py).
                self.table.revive(node, parent, name)
                node.lowers = lowers
                node.owner_override = OVERRIDE_UNKNOWN
                self.touch(node)
        if node is None:
            node = self.table.add(kind, parent, name, identity if register else None)
            node.in_upper = in_upper
            node.lowers = lowers
        elif (node.parent is not parent or node.name != name) and (parent, name) not in node.links:
            node.links.append((parent, name))
        assert parent.children is not None
        parent.children[name] = node
        return node

    def link_from_index(self, parent: Node, name: str, layer: Layer, path: str,
                        st: os.stat_result) -> Node | None:
        """Hook (see unionfs.core.namespace_ops): the upper copy of a lower hardlink copied up under
        another name."""
        return None

    def upper_identity(self, path: str, st_ino: int) -> tuple[int, int]:
        """Identity of an upper non-directory: its lower origin when it was copied up (so inode
        numbers survive copy-up and remounts), else the upper object itself."""
        assert self.upper is not None
        raw = getxattr_at(self.upper.fd, path, self.origin_xattr)
        if not raw:
            raw = self.index.origin_of(st_ino)
        if raw:
            slot, _, ino = raw.partition(b":")
            try:
                return int(slot), int(ino)
            except ValueError:
                pass
        return 0, st_ino

    def lower_has(self, parent: Node, name: str) -> bool:
        """True when a lower layer shows ``name`` under ``parent`` (so removing it needs a whiteout)."""
        if parent.opaque:
            return False
        for layer, ppath in parent.lowers:
            st = lstat_at(layer.fd, join(ppath, name))
            if st is None:
                if ondisk.whiteout_file_at(layer.fd, join(ppath, name)):
                    return False
                continue
            if layer.placeholders and join(ppath, name) in layer.placeholders:
                continue
            return not ondisk.is_whiteout_stat(st)
        return False

    # --- where objects live ----------------------------------------------------------------------

    def backing(self, node: Node) -> tuple[Layer, str]:
        """Where the node's top copy lives: (layer, path in that layer)."""
        if node.in_upper:
            assert self.upper is not None
            return self.upper, node.path()
        if node.lowers:
            return node.lowers[0]
        raise OSError(errno.ESTALE, "node has no backing object")

    # --- listings --------------------------------------------------------------------------------

    def list_dir(self, node: Node) -> list[DirEntry]:
        """The merged entries of a directory (no '.' or '..'), upper first, whiteouts applied.

        Cached on the node until something in the directory changes (see ``touch``).
        """
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if node.deleted:
            return []
        if node.listing is not None:
            return node.listing
        sources: list[tuple[Layer, str]] = []
        if node.in_upper and self.upper is not None:
            sources.append((self.upper, node.path()))
        if not node.opaque:
            sources.extend(node.lowers)
        listing = list(merge.merge_listing(self._scan(layer, path) for layer, path in sources).values())
        node.listing = listing
        return listing

    @staticmethod
    def _scan(layer: Layer, path: str) -> Iterator[tuple[str, DirEntry | None]]:
        """One layer's directory for merge_listing: (name, entry) per entry, (name, None) per
        whiteout. It runs once per entry of every layer (tens of thousands for a big directory): it
        keeps to cheap calls (d_type answers is_file/is_dir without a stat)."""
        whiteout_prefix, opaque_marker = ondisk.WHITEOUT_PREFIX, ondisk.OPAQUE_MARKER
        s_ifreg, s_ifdir = stat.S_IFREG, stat.S_IFDIR
        prefix = f"{path}/" if path else ""
        placeholders = layer.placeholders
        fd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.fd)
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    n = entry.name
                    if n.startswith(whiteout_prefix):
                        if n != opaque_marker:
                            yield n[4:], None
                        continue
                    if entry.is_file(follow_symlinks=False):
                        if placeholders and prefix + n in placeholders:
                            continue
                        kind = s_ifreg
                    elif entry.is_dir(follow_symlinks=False):
                        kind = s_ifdir
                    elif entry.is_symlink():
                        kind = stat.S_IFLNK
                    else:
                        st = entry.stat(follow_symlinks=False)
                        if ondisk.is_whiteout_stat(st):
                            yield n, None
                            continue
                        kind = stat.S_IFMT(st.st_mode)
                    yield n, DirEntry(n, layer, prefix + n, kind == s_ifdir, kind, entry.inode(),
                                      n.encode(_FS_ENCODING, _FS_ERRORS))
        finally:
            os.close(fd)

    def touch(self, *nodes: Node | None) -> None:
        """Forget cached attributes (and, for directories, listings) of nodes that changed."""
        forget = self.forget_on_change
        for node in nodes:
            if node is not None:
                node.listing = None
                node.st_hint = None
                if forget is not None:
                    forget.pop(node.ino, None)

    def entry_node(self, parent: Node, entry: DirEntry) -> Node | None:
        """The node behind a listing entry, without a stat for non-directories; None if gone."""
        assert parent.children is not None
        node = parent.children.get(entry.name)
        if node is not None:
            return node
        if entry.is_dir:
            return self._resolve(parent, entry.name)
        layer = entry.layer
        if layer.index < 0:  # the upper
            identity = self.upper_identity(parent.child_path(entry.name), entry.ino)
            return self._node_for(parent, entry.name, entry.kind, identity, True, [])
        index = self.index
        if index.used and index.has_entry(layer.slot, entry.ino):
            return self._resolve(parent, entry.name)  # a hardlink whose other name was copied up
        identity = (layer.slot, entry.ino)
        table = self.table
        if identity not in table.by_identity:
            # The common case of a big listing, _node_for's first branch without its checks.
            node = table.add(entry.kind, parent, entry.name, identity)
            node.lowers = [(layer, entry.path)]
            parent.children[entry.name] = node
            return node
        return self._node_for(parent, entry.name, entry.kind, identity, False, [(layer, entry.path)])


def _count_lower_miss(lower_names: dict[tuple[int, str], int | frozenset[str]], layer: Layer, path: str) -> None:
    """Count a lookup that missed in lower directory ``path``; list it once it is busy (see
    ``UnionTree._lower_names``)."""
    key = (layer.index, path)
    seen = lower_names.get(key, 0)
    if type(seen) is not int or seen < 0:
        return
    if seen + 1 < LOWER_NAMES_AFTER:
        lower_names[key] = seen + 1
        return
    try:
        dfd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=layer.fd)
        try:
            lower_names[key] = frozenset(os.listdir(dfd))
        finally:
            os.close(dfd)
    except OSError as e:
        log.debug("lower directory %s of %s not listed: %s", path or "/", layer.label, e)
        lower_names[key] = NO_LOWER_NAMES


def ensure_writable(tree: UnionTree) -> None:
    if tree.readonly:
        raise OSError(errno.EROFS, "read-only union (no upperdir)")
