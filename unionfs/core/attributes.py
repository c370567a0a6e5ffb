"""What callers see of an object: its attributes, owner overrides, link count, xattrs, access.

Owner overrides: where the upper's filesystem refuses a chown (rootless, without subordinate ids),
the intended owner and mode are kept in an xattr (unionfs.core.ondisk) and shown instead of the
backing object's. In a namespace that maps one id only, an override naming an unmapped id would show
as the overflow id, which even the namespace's root may not enter; such owners are shown as that
root instead (as podman's ignore_chown_errors does), while the override itself keeps the intended
owner for export.

Policies that the kernel's overlayfs applies to what it shows live here, so the core's tests cover
them: the link count of merged directories and removed files (``visible_nlink``) and the permission
check answering access(2) (``access_allowed``).
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs.core import fsat, ondisk
from unionfs.core.backing import getxattr_at, listxattr_at, lstat_at
from unionfs.core.nodes import OVERRIDE_UNKNOWN, Node
from unionfs.core.tree import LAYER_XATTR, Caller, UnionTree


def single_id_namespace() -> tuple[set[int], set[int]] | None:
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


def access_allowed(want: int, caller: Caller, mode: int, uid: int, gid: int) -> bool:
    """Whether ``caller`` may access an object with ``mode``/``uid``/``gid`` (as shown, overrides
    applied) for ``want`` (R_OK | W_OK | X_OK bits): owner, then group, then other bits; root
    passes everything but execution of a file with no execute bit at all."""
    if caller.uid == 0:
        return not (want & os.X_OK) or bool(mode & 0o111) or stat.S_ISDIR(mode)
    if caller.uid == uid:
        bits = (mode >> 6) & 7
    elif caller.gid == gid:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return (want & 7) & ~bits == 0


class AttributeReader:
    """Reads attributes and xattrs of the merged tree's objects (never changes anything)."""

    def __init__(self, tree: UnionTree) -> None:
        self.tree = tree
        self.single_ids = single_id_namespace()

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
        layer, path = self.tree.backing(node)
        st = lstat_at(layer.fd, path)
        if st is None:
            raise OSError(errno.ENOENT, "backing object vanished", path)
        return st, self.override_of(node, st)

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
            layer, path = self.tree.backing(node)
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

    def visible_nlink(self, node: Node, st: os.stat_result) -> int:
        """The link count to show for ``node`` whose backing object's stat is ``st``."""
        if node.deleted:
            # Open after its last name we know went: the kernel (ovl_getattr) shows what the file
            # still has, other names of a hardlink included (found through the index, maybe never
            # looked up). One removed but merely held (O_PATH) has no descriptor to ask: 0.
            return self.tree.index.nlink(node, st, removed=True) if node.fds else 0
        if node.is_dir and (len(node.lowers) > 1 or (node.in_upper and node.lowers and not node.opaque)):
            # A merged directory's subdirectories are not counted (the kernel's overlayfs says 1 too):
            # a wrong count would make find(1) skip subdirectories; 1 tells it to look.
            return 1
        return self.tree.index.nlink(node, st)

    def lower_nlink(self, node: Node) -> int:
        """The link count of a lower-only node's lower object (lower layers never change)."""
        known = node.lower_st if node.lower_st is not None else node.st_hint
        if known is not None:
            return int(known.st_nlink)
        layer, path = self.tree.backing(node)
        st = lstat_at(layer.fd, path)
        return st.st_nlink if st is not None else 1

    def readlink(self, node: Node) -> str:
        layer, path = self.tree.backing(node)
        return fsat.readlink(path, dir_fd=layer.fd)

    def statfs(self) -> os.statvfs_result:
        tree = self.tree
        layer = tree.upper if tree.upper is not None else tree.lowers[0]
        return os.statvfs(f"/proc/self/fd/{layer.fd}")

    def getxattr(self, node: Node, name: str) -> bytes:
        if name == LAYER_XATTR and self.tree.layer_xattr:
            return self.tree.backing(node)[0].label.encode()
        if ondisk.is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        layer, path = self.tree.backing(node)
        value = getxattr_at(layer.fd, path, name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, node: Node) -> list[str]:
        layer, path = self.tree.backing(node)
        names = [n for n in listxattr_at(layer.fd, path) if not ondisk.is_private_xattr(n)]
        if self.tree.layer_xattr:
            names.append(LAYER_XATTR)
        return names


def _fgetxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None
