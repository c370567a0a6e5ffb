"""Making a RUN step's upper directory the stored layer's directory, without unpacking its tar.

A committed upper used to be packed into a tar and the tar unpacked again into ``layers/``: for a
step that made 10,000 small files, 10,000 creates, writes and metadata calls to make a copy of a
directory that already existed, and as many unlinks to remove the original. The store now renames
the upper into place instead, and this module makes that safe: while the packer walks the upper to
write its tar (:mod:`lamina.store.layer_pack`), each entry is *settled*, changed in place into
exactly what :func:`lamina.store.layer_unpack.unpack_layer` would have made of its tar entry:

* owners and modes: root of the initial namespace keeps real owners (the unpacker chowns there
  too). Anyone else (root of lamina's user namespace, where RUN steps are committed) gives every
  entry to itself and records the owner and mode the tar holds in the owner-override xattr, with
  ``u+rw`` (``u+rwx`` for directories) kept on disk, as the unpacker does: a layer holding files of
  subordinate ids could not be read or removed by its user outside that namespace. ``chown`` drops
  setuid bits and file capabilities, so the mode is set again afterwards and
  ``security.capability`` rewritten;
* times: the tar holds whole seconds, and the unpacker sets access and modification time to them;
  a directory's are set after its children, whose changes (a socket removed) would move them;
* extended attributes the tar leaves out (union-private ones, ``trusted.*``, ``security.selinux``)
  are removed; an opaque directory carries ``user.overlay.opaque`` (and the ``trusted.`` one as
  root), as the unpacker writes both;
* sockets and ``.wh..wh..opq`` files, which the tar leaves out (the latter as an entry of its
  own: its directory carries the xattrs), are removed; a ``.wh.NAME`` whiteout file becomes the
  character device 0/0 the unpacker makes, where mknod is allowed; hard links stay links, settled
  once through their first name;
* the root is 0755 and lists its device placeholders (:func:`unionfs.core.ondisk.write_placeholder_list`).

Symlinks keep no owner in an unprivileged layer (the unpacker cannot chown them either). What the
tar says is what was read before the entry was settled, so the layer's diff_id is unchanged, and
packing the settled directory again gives the same tar (the tests check both, and compare the
directory with the unpacked one).

Only a directory nothing else is writing may be settled: a finished RUN step's upper, never a
running container's (``lamina commit`` packs those without touching them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from lamina.store.layer_unpack import is_host_root
from unionfs.core import ondisk

_CAPABILITY_XATTR = "security.capability"
# Public xattrs the packer leaves out of the tar (layer_pack._public_xattrs).
_DROPPED_PUBLIC = ("security.selinux",)
_SECOND = 1_000_000_000


def _dropped(name: str) -> bool:
    """True for an xattr the unpacked layer would not carry."""
    if name in (ondisk.OWNER_OVERRIDE_XATTR, ondisk.USER_OPAQUE, ondisk.TRUSTED_OPAQUE):
        return False
    return ondisk.is_private_xattr(name) or name.startswith("trusted.") or name in _DROPPED_PUBLIC


class Entry:
    """One entry to settle, reached through an open descriptor (files, directories) or, for what
    cannot be opened safely (FIFOs, devices), by name below its directory's descriptor: nothing
    writes the tree any more, so the name stays what its ``lstat`` described."""

    def __init__(self, fd: int | None = None, dir_fd: int | None = None, name: str = "") -> None:
        self.fd, self.dir_fd, self.name = fd, dir_fd, name
        self.path = f"/proc/self/fd/{dir_fd}/{name}"

    def chown(self, uid: int, gid: int) -> None:
        if self.fd is not None:
            os.fchown(self.fd, uid, gid)
        else:
            os.chown(self.name, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        if self.fd is not None:
            os.fchmod(self.fd, mode)
        else:
            os.chmod(self.name, mode, dir_fd=self.dir_fd)

    def getxattr(self, name: str) -> bytes | None:
        try:
            if self.fd is not None:
                return os.getxattr(self.fd, name)
            return os.getxattr(self.path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    def setxattr(self, name: str, value: bytes) -> None:
        if self.fd is not None:
            os.setxattr(self.fd, name, value)
        else:
            os.setxattr(self.path, name, value, follow_symlinks=False)

    def removexattr(self, name: str) -> None:
        with contextlib.suppress(OSError):
            if self.fd is not None:
                os.removexattr(self.fd, name)
            else:
                os.removexattr(self.path, name, follow_symlinks=False)

    def utime(self, ns: int) -> None:
        if self.fd is not None:
            os.utime(self.fd, ns=(ns, ns))
        else:
            os.utime(self.name, ns=(ns, ns), dir_fd=self.dir_fd, follow_symlinks=False)


class Settler:
    """Settles the entries of one upper directory as its packer reads them (see the module)."""

    def __init__(self) -> None:
        self.privileged = is_host_root()
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.opaque_namespaces = ([ondisk.XattrNamespace.TRUSTED] if self.privileged else []) + \
            [ondisk.XattrNamespace.USER]
        self.placeholders: list[str] = []

    def settle(self, entry: Entry, st: os.stat_result, xattrs: list[str], logical: tuple[int, int, int],
               is_dir: bool = False, read: bool = False, placeholder: bool = False) -> None:
        """Settle a file, directory, FIFO or device (``st``: its stat before packing; ``logical``:
        the uid, gid and permission bits its tar header holds; ``read``: its content was read,
        which moved its atime). Directories: call after their children, as the times come last."""
        caps = entry.getxattr(_CAPABILITY_XATTR) if _CAPABILITY_XATTR in xattrs else None
        if self._owner_mode(entry, st, logical, is_dir, ondisk.OWNER_OVERRIDE_XATTR in xattrs, placeholder) \
                and caps is not None:
            entry.setxattr(_CAPABILITY_XATTR, caps)  # chown dropped it
        for name in xattrs:
            if _dropped(name):
                entry.removexattr(name)
        whole = int(st.st_mtime) * _SECOND
        if read or st.st_mtime_ns != whole or st.st_atime_ns != whole:
            entry.utime(whole)

    def settle_symlink(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        if not self.privileged and (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.chown(name, self.uid, self.gid, dir_fd=dir_fd, follow_symlinks=False)
        whole = int(st.st_mtime) * _SECOND
        if st.st_mtime_ns != whole or st.st_atime_ns != whole:
            os.utime(name, ns=(whole, whole), dir_fd=dir_fd, follow_symlinks=False)

    def mark_opaque(self, fd: int, xattrs: list[str]) -> None:
        """The directory ``fd`` is opaque (in any on-disk form): give it the unpacker's xattrs."""
        for namespace in self.opaque_namespaces:
            if namespace.opaque_xattr not in xattrs:
                os.setxattr(fd, namespace.opaque_xattr, b"y")

    def placeholder(self, rel: str) -> None:
        self.placeholders.append(rel)

    def remove(self, dir_fd: int, name: str) -> None:
        """Remove a socket or an opaque marker file (the tar has no entry for either)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)

    def whiteout_file(self, dir_fd: int, name: str, hidden: str) -> None:
        """The ``.wh.`` file ``name`` hides ``hidden``: make it the device 0/0 the unpacker makes,
        unless mknod is refused or something is already there."""
        try:
            os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        except OSError:
            return
        os.unlink(name, dir_fd=dir_fd)

    def finish_root(self, root_fd: int, opaque: bool) -> None:
        """The layer root as the unpacker leaves it: its own, 0755, no override, opaque markers and
        the list of its device placeholders."""
        xattrs = os.listxattr(root_fd)
        for name in xattrs:
            if _dropped(name) or name in (ondisk.OWNER_OVERRIDE_XATTR, ondisk.PLACEHOLDERS_XATTR):
                Entry(root_fd).removexattr(name)
        if opaque:
            self.mark_opaque(root_fd, xattrs)
        if self.placeholders:
            ondisk.write_placeholder_list(f"/proc/self/fd/{root_fd}", self.placeholders)
        st = os.fstat(root_fd)
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.fchown(root_fd, self.uid, self.gid)
        os.fchmod(root_fd, 0o755)

    def _owner_mode(self, entry: Entry, st: os.stat_result, logical: tuple[int, int, int], is_dir: bool,
                    has_override: bool, placeholder: bool) -> bool:
        """Owner, mode and override as the unpacker leaves them; True when the entry was chowned."""
        uid, gid, perms = logical
        on_disk = stat.S_IMODE(st.st_mode)
        if self.privileged:
            if not has_override:
                return False
            # Root unpacks a tar's owner for real; an override here holds what the tar says.
            entry.chown(uid, gid)
            entry.chmod(perms)
            entry.removexattr(ondisk.OWNER_OVERRIDE_XATTR)
            return True
        chowned = (st.st_uid, st.st_gid) != (self.uid, self.gid)
        if chowned:
            entry.chown(self.uid, self.gid)
        if placeholder:
            disk = 0o600  # its override names the device (ondisk.write_device_placeholder)
        else:
            # ``logical`` came from the override where there is one: it already says that.
            disk = perms | (0o700 if is_dir else 0o600)
            wanted = (uid, gid) != (0, 0) or disk != perms
            if wanted and not has_override:
                entry.setxattr(ondisk.OWNER_OVERRIDE_XATTR, ondisk.OwnerOverride(uid, gid, perms).encode())
            elif has_override and not wanted:
                entry.removexattr(ondisk.OWNER_OVERRIDE_XATTR)
        if chowned or on_disk != disk:
            entry.chmod(disk)
        return chowned
