"""The merged tree: the layer stack, lookup through whiteouts/opaque/redirects, listings, attributes.

Lookup follows the kernel's overlayfs (fs/overlayfs/namei.c): the upper first, then each lower
directory merged into the parent, top first. A whiteout (char 0/0, or ``.wh.NAME`` in the same
directory) ends the search; a non-directory ends it; a directory is merged with the directories of
the same name below it until one of them is opaque. An ``*.overlay.redirect`` xattr on a directory
redirects the search in the layers below to another path (absolute from the layer root, or a sibling
name), which is how a renamed lower directory keeps its contents without copying them.

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

from unionfs.core import fsat, merge, ondisk
from unionfs.core.backing import (
    Layer,
    exists_at,
    getxattr_at,
    join,
    listxattr_at,
    lstat_at,
    remove_tree_at,
    setxattr_at,
    split,
)
from unionfs.core.nodes import OVERRIDE_UNKNOWN, InodeTable, Node

log = logging.getLogger(__name__)

LAYER_XATTR = "user.lamina.layer"
NAME_MAX = 255
WORK_SUBDIR = "work"
INDEX_SUBDIR = "lamina-index"


class UnionError(Exception):
    """A configuration problem found when opening the layers (one readable line)."""


@dataclass
class Caller:
    """Who asks: the credentials of the process behind a request."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


def index_entry_name(slot: int, ino: int) -> str:
    """The name in WORK/lamina-index of the upper copy of lower object ``ino`` of layer ``slot``
    (a link-count record of it, see UnionTree.record_link_count, adds an "n" in front)."""
    return f"{slot}-{ino}"


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


def _single_id_namespace() -> tuple[set[int], set[int]] | None:
    """The inner uids and gids when this user namespace maps just one of each, else None."""
    mapped: list[set[int]] = []
    for kind in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{kind}") as f:
                lines = [line.split() for line in f if line.strip()]
        except OSError:
            return None
        if len(lines) != 1 or lines[0][2] != "1":
            return None
        mapped.append({int(lines[0][0])})
    return mapped[0], mapped[1]


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
        if not lowers and upper is None:
            raise UnionError("no lowerdir given")
        if upper is not None and work is None:
            raise UnionError("upperdir needs a workdir")
        self.trace = trace
        # Told of every finished copy-up, after the nodes it changed were touched: the adapter
        # drops what the kernel keeps of them (the copy has its own ctime, and so do the parents).
        self.on_copy_up: Callable[[Node], None] | None = None
        self.layer_xattr = layer_xattr
        self._fds: list[int] = []
        self._opened = opened if opened is not None else {}
        self.table = InodeTable()
        try:
            self.lowers = [
                self._open_layer(p, 1 + i, f"lower:{i}:{p}", i) for i, p in enumerate(lowers)
            ]
            self.upper = self._open_layer(upper, 0, "upper", -1) if upper is not None else None
            self.work_fd = -1
            self.index_fd = -1
            self.index_used = False
            if work is not None and self.upper is not None:
                self.work_fd = self._open_work(work)
        except BaseException:
            self.close()
            raise
        self.readonly = self.upper is None
        # Names in busy lower directories, keyed by (layer index, path): lower layers never change
        # while mounted, so once a directory has missed LOWER_NAMES_AFTER lookups, one listing
        # answers its later misses (and their whiteout-file checks) without a system call. Until
        # then the value counts the misses; NO_LOWER_NAMES marks a directory we could not list.
        self._lower_names: dict[tuple[int, str], int | frozenset[str]] = {}
        # In a namespace that maps one id only (an unprivileged user without subordinate ids), an
        # owner override naming an unmapped id would show as the overflow id, which even the
        # namespace's root may not enter; such owners are shown as that root instead (as podman's
        # ignore_chown_errors does), while the override itself keeps the intended owner for export.
        self.single_ids = _single_id_namespace()
        self.xattr_ns = self._probe_xattr_namespace()
        self.whiteout_style = self._probe_whiteout_style()
        # Where a copied-up file records the lower object it came from (its inode number's source).
        self.origin_xattr = f"{self.xattr_ns.value}.overlay.lamina.origin"
        # On an indexed hardlink: how many names it has in the merged view (the upper's own count
        # includes the index link and misses lower names not linked up yet), as the kernel's
        # index=on keeps it in trusted.overlay.nlink.
        self.nlink_xattr = f"{self.xattr_ns.value}.overlay.lamina.nlink"
        # Renamed lower directories get a redirect xattr only where the kernel would follow it: it
        # ignores user.overlay.redirect (userxattr mounts never follow redirects), so with user
        # xattrs a renamed directory is copied up whole instead, and the upper stays kernel-readable.
        self.redirect_dir = (self.xattr_ns is ondisk.XattrNamespace.TRUSTED) if redirect_dir is None \
            else redirect_dir
        self.root = self.table.new_root()
        self.root.in_upper = self.upper is not None
        self.root.lowers = [(layer, "") for layer in self.lowers]
        self._tmp_counter = 0

    # --- set-up ----------------------------------------------------------------------------------

    def _open_dir(self, path: str) -> int:
        fd = self._opened.pop(path, None)
        return fsat.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if fd is None else fd

    def _open_layer(self, path: str, slot: int, label: str, index: int) -> Layer:
        try:
            fd = self._open_dir(path)
        except FileNotFoundError:
            raise UnionError(f"{path}: no such directory") from None
        except NotADirectoryError:
            raise UnionError(f"{path}: not a directory") from None
        except OSError as e:
            raise UnionError(f"{path}: {e.strerror}") from None
        self._fds.append(fd)
        placeholders = ondisk.read_placeholder_list(fd) if index >= 0 else frozenset()
        return Layer(path=path, fd=fd, slot=slot, label=label, index=index, dev=os.fstat(fd).st_dev,
                     placeholders=placeholders)

    def _open_work(self, work: str) -> int:
        """Open (creating if needed) WORK/work, emptied: leftovers of a crashed copy-up go away."""
        assert self.upper is not None
        try:
            wfd = self._open_dir(work)
        except OSError as e:
            raise UnionError(f"{work}: {e.strerror}") from None
        self._fds.append(wfd)
        if os.fstat(wfd).st_dev != self.upper.dev:
            raise UnionError(f"{work}: workdir and upperdir must be on the same filesystem")
        remove_tree_at(wfd, WORK_SUBDIR)
        fsat.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
        # The hardlink index (kept across mounts, like the kernel's index=on): for every copied-up
        # lower file with several names, WORK/lamina-index/SLOT-INO links to its upper copy, so the
        # other names find the copy instead of the stale lower data.
        try:
            fsat.mkdir(INDEX_SUBDIR, 0o700, dir_fd=wfd)
        except FileExistsError:
            pass
        self.index_fd = fsat.open(INDEX_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=wfd)
        self._fds.append(self.index_fd)
        self.index_used = bool(os.listdir(self.index_fd))
        fd = fsat.open(WORK_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=wfd)
        self._fds.append(fd)
        return fd

    def _probe_xattr_namespace(self) -> ondisk.XattrNamespace:
        """trusted.* when we may write it (root in the initial namespace), user.* otherwise.

        Probed, not guessed from the uid map: a user namespace mapping every id still lacks
        CAP_SYS_ADMIN over the initial namespace, which trusted.* needs.
        """
        guess = ondisk.XattrNamespace.for_current_user()
        if self.upper is None or guess is ondisk.XattrNamespace.USER:
            return guess
        probe = "xattr-probe"
        fsat.mkdir(probe, 0o700, dir_fd=self.work_fd)
        try:
            setxattr_at(self.work_fd, probe, ondisk.TRUSTED_OPAQUE, b"y")
        except OSError:
            return ondisk.XattrNamespace.USER
        finally:
            fsat.rmdir(probe, dir_fd=self.work_fd)
        return ondisk.XattrNamespace.TRUSTED

    def _probe_whiteout_style(self) -> ondisk.WhiteoutStyle:
        """Char 0/0 whiteouts where mknod works; the probe stays as the shared whiteout."""
        if self.upper is None:
            return ondisk.WhiteoutStyle.CHAR_DEVICE
        try:
            fsat.mknod(SHARED_WHITEOUT, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=self.work_fd)
        except PermissionError:
            return ondisk.WhiteoutStyle.WH_FILE
        return ondisk.WhiteoutStyle.CHAR_DEVICE

    def make_char_whiteout(self, dir_fd: int, path: str) -> None:
        """A char 0/0 whiteout at ``path`` under ``dir_fd`` (upper or workdir).

        A hard link to the workdir's shared whiteout, as the kernel's overlayfs makes them: a new
        name only, where mknod would also allocate an inode (14 µs instead of 55 on this ext4).
        Where linking is refused (the link limit, a filesystem without hard links) a new device
        node is made instead; FileExistsError goes to the caller either way.
        """
        try:
            fsat.link(SHARED_WHITEOUT, path, src_dir_fd=self.work_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return
        except FileExistsError:
            raise
        except OSError as e:
            log.debug("whiteout /%s: no link to the shared one (%s)", path, e.strerror)
            refused = e.errno
        fsat.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        if refused in (errno.EMLINK, errno.ENOENT):
            # Start a fresh shared whiteout for the next ones (the full one keeps its links).
            tmp = self.tmp_name()
            try:
                fsat.mknod(tmp, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=self.work_fd)
                fsat.rename(tmp, SHARED_WHITEOUT, src_dir_fd=self.work_fd, dst_dir_fd=self.work_fd)
            except OSError as e2:
                log.debug("no new shared whiteout: %s", e2.strerror)

    def close(self) -> None:
        self.table.close_pins()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def tmp_name(self) -> str:
        self._tmp_counter += 1
        return f"#{os.getpid():x}.{self._tmp_counter:x}"

    def emit(self, line: str) -> None:
        if self.trace is not None:
            self.trace(line)

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
                node = self._node_for(parent, name, stat.S_IFMT(st.st_mode),
                                      self.upper_identity(cpath, st.st_ino), True, [])
                node.st_hint = st
                return node
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
        if lowers and lower_st is not None:
            identity = (lowers[0][0].slot, lower_st.st_ino)
        elif in_upper:
            # e.g. a lower directory copied up whole (renamed without redirects): its origin
            identity = self.upper_identity(join(ppath, name), top_st.st_ino)
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
                self._lower_miss(layer, split(path)[0])
            if layer.placeholders and st is not None and path in layer.placeholders:
                continue  # a device node rootless storage could not make: as if absent here
            step = held.steps[merging or bool(lowers)]  # = merge.lookup_step, without the call
            if step is _ENTRY:
                assert st is not None
                if st.st_nlink > 1 and self.index_used:
                    linked = self.link_from_index(parent, name, layer, path, st)
                    if linked is not None:
                        return linked
                node = self._node_for(parent, name, stat.S_IFMT(st.st_mode), (layer.slot, st.st_ino), False,
                                      [(layer, path)])
                node.st_hint = node.lower_st = st
                return node
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

    def _lower_miss(self, layer: Layer, path: str) -> None:
        """Count a lookup that missed in lower directory ``path``; list it once it is busy."""
        key = (layer.index, path)
        seen = self._lower_names.get(key, 0)
        if type(seen) is not int or seen < 0:
            return
        if seen + 1 < LOWER_NAMES_AFTER:
            self._lower_names[key] = seen + 1
            return
        try:
            dfd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=layer.fd)
            try:
                self._lower_names[key] = frozenset(os.listdir(dfd))
            finally:
                os.close(dfd)
        except OSError as e:
            log.debug("lower directory %s of %s not listed: %s", path or "/", layer.label, e)
            self._lower_names[key] = NO_LOWER_NAMES

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
        """Hook (see UnionFS): the upper copy of a lower hardlink copied up under another name."""
        return None

    def upper_identity(self, path: str, st_ino: int) -> tuple[int, int]:
        """Identity of an upper non-directory: its lower origin when it was copied up (so inode
        numbers survive copy-up and remounts), else the upper object itself."""
        assert self.upper is not None
        raw = getxattr_at(self.upper.fd, path, self.origin_xattr)
        if not raw and self.index_used:
            try:
                raw = os.fsencode(fsat.readlink(f"u{st_ino}", dir_fd=self.index_fd))
            except OSError:
                raw = None
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

    # --- attributes ------------------------------------------------------------------------------

    def backing(self, node: Node) -> tuple[Layer, str]:
        """Where the node's top copy lives: (layer, path in that layer)."""
        if node.in_upper:
            assert self.upper is not None
            return self.upper, node.path()
        if node.lowers:
            return node.lowers[0]
        raise OSError(errno.ESTALE, "node has no backing object")

    def stat(self, node: Node) -> tuple[os.stat_result, ondisk.OwnerOverride | None]:
        hint = node.st_hint
        if hint is not None:
            node.st_hint = None
            if not node.deleted and not node.fds:  # an open file may have changed since
                return hint, self.override_of(node, hint)
        if node.deleted and not node.fds:
            # Its path may name another object by now: never stat it. (Fifos and devices are
            # opened by the kernel alone, so an open one has no descriptor here.)
            if node.gone_stat is None:
                raise OSError(errno.ENOENT, "removed")
            return node.gone_stat, None
        if node.deleted and node.fds:
            fst = os.fstat(node.fds[0])
            raw = _fgetxattr(node.fds[0], ondisk.OWNER_OVERRIDE_XATTR)
            return fst, self._visible_override(ondisk.OwnerOverride.decode(raw) if raw is not None else None)
        layer, path = self.backing(node)
        st = lstat_at(layer.fd, path)
        if st is None:
            raise OSError(errno.ENOENT, "backing object vanished", path)
        return st, self.override_of(node, st)

    def readlink(self, node: Node) -> str:
        layer, path = self.backing(node)
        return fsat.readlink(path, dir_fd=layer.fd)

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
        for node in nodes:
            if node is not None:
                node.attr = None
                node.listing = None
                node.st_hint = None

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
        if self.index_used and exists_at(self.index_fd, index_entry_name(layer.slot, entry.ino)):
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

    @staticmethod
    def has_one_lower_name(node: Node) -> bool:
        """A lower-only object known to have a single name: no index entry or link-count record
        can exist for it, as both are made only for lower objects with several names."""
        st = node.lower_st
        return st is not None and not node.in_upper and st.st_nlink == 1

    def index_key(self, node: Node) -> str | None:
        """The index entry of a copied-up lower hardlink, if it has one."""
        if node.is_dir or self.index_fd < 0 or not self.index_used or self.has_one_lower_name(node):
            return None
        for slot, ino in node.identities:
            if slot:
                key = index_entry_name(slot, ino)
                if exists_at(self.index_fd, key):
                    return key
        return None

    # --- link counts of lower hardlinks that lost a name ------------------------------------------
    #
    # When one name of a lower hardlink is removed, the others must count one name less, in this
    # mount and after a remount. The kernel (index=on) copies the file up to have an index entry to
    # keep that count in. Lamina keeps just the count: WORK/lamina-index/nSLOT-INO, a symlink whose
    # target is the decimal count, written after the removal; the data stays in the lower until a
    # write copies it up (copy-up then moves the count onto the index entry and drops the record).
    # The upper is the same as the kernel's (a whiteout); only the kernel's count differs, as it
    # does for any index lamina keeps.

    @staticmethod
    def _link_count_record(node: Node) -> str | None:
        for slot, ino in node.identities:
            if slot:
                return "n" + index_entry_name(slot, ino)
        return None

    def recorded_link_count(self, node: Node) -> int | None:
        """The merged link count of a lower hardlink that lost names without being copied up."""
        if self.index_fd < 0 or not self.index_used:
            return None
        name = self._link_count_record(node)
        if name is None:
            return None
        try:
            return int(os.readlink(name, dir_fd=self.index_fd))
        except (FileNotFoundError, ValueError):
            return None

    def record_link_count(self, node: Node, count: int) -> None:
        """Keep ``count`` as the link count of the lower hardlink ``node``. A symlink holds it: made
        in one step (no data block, nothing half-written after a crash) and read in one."""
        name = self._link_count_record(node)
        if name is None or self.index_fd < 0:
            return
        value = str(max(count, 0))
        try:
            fsat.symlink(value, name, dir_fd=self.index_fd)
        except FileExistsError:
            tmp = self.tmp_name()  # in the scratch directory, emptied at mount if we crash here
            fsat.symlink(value, tmp, dir_fd=self.work_fd)
            fsat.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=self.index_fd)
        self.index_used = True

    def drop_link_count_record(self, node: Node) -> None:
        name = self._link_count_record(node)
        if name is not None and self.index_used:
            try:
                fsat.unlink(name, dir_fd=self.index_fd)
            except FileNotFoundError:
                pass

    def nlink(self, node: Node, st: os.stat_result, *, removed: bool = False) -> int:
        """The link count callers see (see ``nlink_xattr`` and the link-count records above).

        ``removed``: ``st`` is an fstat of a file open after its last known name went. The kernel
        reports the upper object's own count then (0, or what its other upper names keep), and for
        an indexed hardlink the merged count, where the index's own link may be the only one left.
        """
        if not node.in_upper and not node.is_dir and st.st_nlink > 1 and self.index_used:
            recorded = self.recorded_link_count(node)
            return st.st_nlink if recorded is None else recorded
        if node.is_dir or not node.in_upper or self.index_fd < 0 or (st.st_nlink < 2 and not removed):
            return st.st_nlink
        key = self.index_key(node)
        if key is None:
            return st.st_nlink
        raw = getxattr_at(self.index_fd, key, self.nlink_xattr)
        try:
            return int(raw) if raw else st.st_nlink - 1
        except ValueError:
            return st.st_nlink - 1

    def adjust_nlink(self, node: Node, delta: int) -> None:
        key = self.index_key(node)
        if key is None:
            return
        st = fsat.stat(key, dir_fd=self.index_fd, follow_symlinks=False)
        raw = getxattr_at(self.index_fd, key, self.nlink_xattr)
        try:
            current = int(raw) if raw else st.st_nlink - 1
        except ValueError:
            current = st.st_nlink - 1
        setxattr_at(self.index_fd, key, self.nlink_xattr, str(max(current + delta, 0)).encode())

    def override_of(self, node: Node, st: os.stat_result) -> ondisk.OwnerOverride | None:
        if stat.S_ISLNK(st.st_mode):
            return None
        return self._visible_override(self.stored_override(node))

    def stored_override(self, node: Node) -> ondisk.OwnerOverride | None:
        """The owner override xattr of the node's backing object, read once per node: attributes
        are answered several times per created file (create, chown, chmod, utimens), and each read
        is a system call."""
        cached = node.owner_override
        if cached is OVERRIDE_UNKNOWN:
            layer, path = self.backing(node)
            raw = getxattr_at(layer.fd, path, ondisk.OWNER_OVERRIDE_XATTR)
            cached = node.owner_override = ondisk.OwnerOverride.decode(raw) if raw is not None else None
        return cached

    def _visible_override(self, override: ondisk.OwnerOverride | None) -> ondisk.OwnerOverride | None:
        if override is None or self.single_ids is None:
            return override
        uids, gids = self.single_ids
        uid = override.uid if override.uid in uids else 0
        gid = override.gid if override.gid in gids else 0
        if (uid, gid) == (override.uid, override.gid):
            return override
        return ondisk.OwnerOverride(uid, gid, override.mode)

    def statfs(self) -> os.statvfs_result:
        layer = self.upper if self.upper is not None else self.lowers[0]
        return os.statvfs(f"/proc/self/fd/{layer.fd}")

    def is_empty_dir(self, node: Node) -> bool:
        return not self.list_dir(node)

    # --- xattrs ----------------------------------------------------------------------------------

    def getxattr(self, node: Node, name: str) -> bytes:
        if name == LAYER_XATTR and self.layer_xattr:
            return self.backing(node)[0].label.encode()
        if ondisk.is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        layer, path = self.backing(node)
        value = getxattr_at(layer.fd, path, name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, node: Node) -> list[str]:
        layer, path = self.backing(node)
        names = [n for n in listxattr_at(layer.fd, path) if not ondisk.is_private_xattr(n)]
        if self.layer_xattr:
            names.append(LAYER_XATTR)
        return names

    def upper_path_fd(self) -> int:
        if self.upper is None:
            raise OSError(errno.EROFS, "read-only union")
        return self.upper.fd


def _fgetxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def ensure_writable(tree: UnionTree) -> None:
    if tree.readonly:
        raise OSError(errno.EROFS, "read-only union (no upperdir)")
