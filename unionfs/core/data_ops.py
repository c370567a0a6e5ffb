"""Operations that change an object's data and attributes: setattr, xattrs, open, release.

Every change copies the object up first (a writer, or O_TRUNC whatever the access mode, gets the
upper copy). Where the upper's filesystem refuses a chown (rootless, without subordinate ids), the
owner and mode the caller asked for go into the owner override xattr (unionfs.core.ondisk) and the
object keeps a mode we can still use.
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs.core import fsat, ondisk
from unionfs.core.attributes import AttributeReader
from unionfs.core.backing import removexattr_at, setxattr_at
from unionfs.core.copyup import copy_up
from unionfs.core.nodes import OVERRIDE_UNKNOWN, Node
from unionfs.core.tree import LAYER_XATTR, UnionTree, ensure_writable


class DataOps:
    """Changes to the data and attributes of objects of the merged tree."""

    def __init__(self, tree: UnionTree, attributes: AttributeReader) -> None:
        self.tree = tree
        self.attributes = attributes

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fd: int | None = None) -> None:
        ensure_writable(self.tree)
        if not node.deleted:
            copy_up(self.tree, node, truncate=size == 0)
        self.tree.touch(node)
        ufd = self.tree.upper_fd()
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
            _truncate(ufd, path, fd if fd is not None else live_fd, size)
        override = None
        owner_or_mode = not is_link and (uid is not None or gid is not None or mode is not None)
        if owner_or_mode and not target:
            override = self.attributes.stored_override(node)
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
        ensure_writable(self.tree)
        if name == LAYER_XATTR or ondisk.is_private_xattr(name):
            raise OSError(errno.EPERM, "private attribute", name)
        copy_up(self.tree, node)
        self.tree.touch(node)
        setxattr_at(self.tree.upper_fd(), node.path(), name, value, flags)

    def removexattr(self, node: Node, name: str) -> None:
        ensure_writable(self.tree)
        if name == LAYER_XATTR or ondisk.is_private_xattr(name):
            raise OSError(errno.EPERM, "private attribute", name)
        self.attributes.getxattr(node, name)  # ENODATA before any copy-up
        copy_up(self.tree, node)
        self.tree.touch(node)
        removexattr_at(self.tree.upper_fd(), node.path(), name)

    # --- files -----------------------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> tuple[int, bool]:
        """Open the node's backing file; writers (and O_TRUNC, whatever the access mode) get the
        upper copy. Returns (fd, in_upper)."""
        truncate = bool(flags & os.O_TRUNC)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or truncate:
            ensure_writable(self.tree)
            copy_up(self.tree, node, truncate=truncate)
            self.tree.touch(node)
        layer, path = self.tree.backing(node)
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
        self.tree.table.maybe_drop(node)

    def fsyncdir(self, node: Node) -> None:
        if not node.in_upper or self.tree.upper is None:
            return
        fd = fsat.open(node.path() or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.tree.upper.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _truncate(ufd: int, path: str, fd: int | None, size: int) -> None:
    """Truncate through ``fd`` when the file is open, else the upper object at ``path``."""
    if fd is not None:
        os.ftruncate(fd, size)
        return
    wfd = fsat.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
    try:
        os.ftruncate(wfd, size)
    finally:
        os.close(wfd)
