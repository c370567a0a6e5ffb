"""The one on-disk format of union layers: whiteouts, opaque directories, redirects, owner overrides.

Every part of lamina that reads or writes a layer directory (the filesystem, the layer differ that
turns an upper directory into a tar, the layer applier that turns a tar into a directory) goes through
this module, so that there is exactly one definition of what a whiteout looks like.

Reading is liberal, because layers come from everywhere:

* a whiteout is a character device 0/0 (the kernel's overlayfs format) *or* an empty regular file
  named ``.wh.NAME`` (the OCI tar format, and what fuse-overlayfs writes where mknod is refused);
* a directory is opaque when it carries ``trusted.overlay.opaque=y`` or ``user.overlay.opaque=y`` or
  contains a ``.wh..wh..opq`` file;
* names starting with ``.wh.`` are markers and never appear in a merged view, and private
  ``trusted.overlay.*`` / ``user.overlay.*`` xattrs are never shown.

Writing is strict, because the kernel's overlayfs must accept what we leave behind:

* a whiteout is a character device 0/0 where mknod is allowed (root, or any user inside a user
  namespace since Linux 5.8) and falls back to ``.wh.NAME`` only where it is not;
* an opaque marker is the ``trusted.`` xattr when we are root and the ``user.`` xattr otherwise (the
  kernel reads the latter with ``-o userxattr``).

Owner overrides: an unprivileged user without subordinate ids cannot chown. The intended uid, gid and
permission bits are then kept in ``user.containers.override_stat`` as ``"UID:GID:0MODE"`` (the same
attribute fuse-overlayfs and containers/storage use), reported by stat and written into exported tars.
A device node an unprivileged user cannot create is kept as containers/storage keeps it in rootless
storage: an empty regular file whose override carries the type, ``"UID:GID:0MODE:char-1-7"`` (or
``block-MAJOR-MINOR``); exported tars hold the real node again (:func:`device_placeholder`). The
layer's root lists its placeholders in ``user.lamina.device_placeholders`` (NUL-separated relative
paths), so the union can leave them out of the merged view cheaply, as rootless podman, whose
storage skips such nodes, shows nothing there.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from unionfs.core import fsat, merge
from unionfs.core.backing import (
    exists_at,
    getxattr_at,
    listxattr_at,
    lstat_at,
    removexattr_at,
    setxattr_at,
    split,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

TRUSTED_OPAQUE = "trusted.overlay.opaque"
USER_OPAQUE = "user.overlay.opaque"
TRUSTED_REDIRECT = "trusted.overlay.redirect"
USER_REDIRECT = "user.overlay.redirect"
OWNER_OVERRIDE_XATTR = "user.containers.override_stat"
PLACEHOLDERS_XATTR = "user.lamina.device_placeholders"
# An xattr value holds at most 64 KiB; a layer with more placeholder paths than fit shows them all.
MAX_PLACEHOLDER_LIST = 60_000

# xattr namespaces that belong to the union machinery and must never be shown to, or set by, users.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


class XattrNamespace(Enum):
    """Which namespace opaque and redirect markers are written in."""

    TRUSTED = "trusted"
    USER = "user"

    @classmethod
    def for_current_user(cls) -> XattrNamespace:
        """``trusted.`` needs CAP_SYS_ADMIN in the initial namespace; everybody else uses ``user.``."""
        return cls.TRUSTED if os.geteuid() == 0 and _in_initial_user_namespace() else cls.USER

    @property
    def opaque_xattr(self) -> str:
        return TRUSTED_OPAQUE if self is XattrNamespace.TRUSTED else USER_OPAQUE

    @property
    def redirect_xattr(self) -> str:
        return TRUSTED_REDIRECT if self is XattrNamespace.TRUSTED else USER_REDIRECT


def _in_initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return True
    # The initial namespace maps the whole 32-bit range starting at 0.
    return fields[:3] == ["0", "0", "4294967295"]


# --- reading -------------------------------------------------------------------------------------


def is_marker_name(name: str) -> bool:
    """True for names that are union markers (``.wh.*``) and never appear in a merged view."""
    return name.startswith(WHITEOUT_PREFIX)


def whiteout_file_name(name: str) -> str:
    """The name of the ``.wh.`` file that hides ``name`` in the same directory."""
    return WHITEOUT_PREFIX + name


def whited_out_name(name: str) -> str | None:
    """For a ``.wh.NAME`` file, the NAME it hides; None for other names and for the opaque marker."""
    if name.startswith(WHITEOUT_PREFIX) and name != OPAQUE_MARKER:
        return name[len(WHITEOUT_PREFIX):]
    return None


def is_whiteout_stat(st: os.stat_result) -> bool:
    """True for the kernel's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES) or name in (OWNER_OVERRIDE_XATTR, PLACEHOLDERS_XATTR)


def _getxattr(path: str | int, name: str, dir_fd_name: str | None = None) -> bytes | None:
    try:
        if dir_fd_name is not None:
            # os.getxattr has no dir_fd; go through /proc/self/fd so paths stay fd-relative.
            return os.getxattr(f"/proc/self/fd/{path}/{dir_fd_name}", name, follow_symlinks=False)
        return os.getxattr(path, name, follow_symlinks=isinstance(path, int))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def has_opaque_xattr(path: str | int) -> bool:
    """True when the directory at ``path`` (or open directory fd) carries an opaque xattr."""
    for name in (TRUSTED_OPAQUE, USER_OPAQUE):
        if _getxattr(path, name) == b"y":
            return True
    return False


def is_opaque_dir(path: str | int, entry_names: set[str] | None = None) -> bool:
    """True when the directory is opaque in any of the formats we read.

    ``entry_names``, when the caller has listed the directory already, saves a second lookup for the
    ``.wh..wh..opq`` file.
    """
    if has_opaque_xattr(path):
        return True
    if entry_names is not None:
        return OPAQUE_MARKER in entry_names
    try:
        if isinstance(path, int):
            os.stat(OPAQUE_MARKER, dir_fd=path, follow_symlinks=False)
        else:
            os.lstat(os.path.join(path, OPAQUE_MARKER))
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    return True


def read_redirect(path: str | int) -> str | None:
    """The overlay redirect of a directory (absolute ``/a/b`` or a sibling name), if any."""
    for name in (TRUSTED_REDIRECT, USER_REDIRECT):
        value = _getxattr(path, name)
        if value:
            return os.fsdecode(value)
    return None


# --- reading at a directory descriptor ----------------------------------------------------------
#
# ``path`` is relative to the layer (or directory) descriptor ``dir_fd`` and never follows a final
# symlink; '' is the directory ``dir_fd`` itself.


def whiteout_file_at(dir_fd: int, path: str) -> bool:
    """True when a ``.wh.NAME`` file beside ``path`` hides it (the OCI form of a whiteout)."""
    head, tail = split(path)
    return exists_at(dir_fd, f"{head}/{whiteout_file_name(tail)}" if head else whiteout_file_name(tail))


def dir_markers_at(dir_fd: int, path: str) -> tuple[bool, str | None]:
    """(opaque, redirect) of the directory at ``path``; one listxattr in the common case."""
    names = listxattr_at(dir_fd, path)
    opaque = False
    redirect = None
    if names:
        for xname in (TRUSTED_OPAQUE, USER_OPAQUE):
            if xname in names and getxattr_at(dir_fd, path, xname) == b"y":
                opaque = True
        if not opaque:
            for xname in (TRUSTED_REDIRECT, USER_REDIRECT):
                if xname in names:
                    value = getxattr_at(dir_fd, path, xname)
                    if value:
                        redirect = os.fsdecode(value)
                        break
    if not opaque:
        try:
            opaque = exists_at(dir_fd, f"{path}/{OPAQUE_MARKER}" if path else OPAQUE_MARKER)
        except PermissionError:
            # A directory we may not search cannot hold a marker we could honour; what matters
            # is that its parent stays listable (the kernel needs only the xattrs here).
            opaque = False
    return opaque, redirect


def is_opaque_at(dir_fd: int, path: str) -> bool:
    """True when the directory at ``path`` is opaque in any of the formats we read."""
    return dir_markers_at(dir_fd, path)[0]


def redirect_at(dir_fd: int, path: str) -> str | None:
    """The overlay redirect of the directory at ``path``, if any."""
    for xname in (TRUSTED_REDIRECT, USER_REDIRECT):
        value = getxattr_at(dir_fd, path, xname)
        if value:
            return os.fsdecode(value)
    return None


def held_at(dir_fd: int, path: str) -> tuple[merge.Held, os.stat_result | None]:
    """What one layer holds at ``path`` for merging (:mod:`unionfs.core.merge`), and its lstat."""
    # Every lookup in every layer comes here: whiteout_file_at and is_whiteout_stat are inlined.
    st = lstat_at(dir_fd, path)
    if st is None:
        head, _, tail = path.rpartition("/")
        marker = f"{head}/{WHITEOUT_PREFIX}{tail}" if head else WHITEOUT_PREFIX + tail
        return (merge.WHITEOUT if lstat_at(dir_fd, marker) is not None else merge.ABSENT), None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        opaque, redirect = dir_markers_at(dir_fd, path)
        return merge.directory(opaque, redirect), st
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        return merge.WHITEOUT, st
    return merge.OTHER, st


def held_ancestors_at(dir_fd: int, path: str) -> Iterator[merge.Held]:
    """What the layer holds at each directory above ``path``, outermost first (lazily: for
    :func:`unionfs.core.merge.reach`, which stops at the first that answers)."""
    prefix = ""
    for part in path.split("/")[:-1]:
        prefix = f"{prefix}/{part}" if prefix else part
        yield held_at(dir_fd, prefix)[0]


def owner_override_at(dir_fd: int, path: str) -> OwnerOverride | None:
    raw = getxattr_at(dir_fd, path, OWNER_OVERRIDE_XATTR)
    return OwnerOverride.decode(raw) if raw is not None else None


# --- owner overrides -----------------------------------------------------------------------------


_DEVICE_KIND_RE = re.compile(r"(char|block)-([0-9]{1,10})-([0-9]{1,10})")


@dataclass(frozen=True)
class OwnerOverride:
    """The owner and permission bits a file is meant to have when we could not chown it for real;
    ``kind`` is containers/storage's type field, kept only for device nodes (``char-1-7``)."""

    uid: int
    gid: int
    mode: int  # permission bits only (07777)
    kind: str | None = None

    def encode(self) -> bytes:
        text = f"{self.uid}:{self.gid}:0{self.mode & 0o7777:o}"
        return (text + f":{self.kind}" if self.kind else text).encode()

    @classmethod
    def decode(cls, raw: bytes) -> OwnerOverride | None:
        """Parse ``UID:GID:MODE[:TYPE]``; None when the value is malformed (never trusted blindly)."""
        parts = raw.decode("ascii", "replace").split(":")
        if len(parts) < 3:
            return None
        kind = parts[3] if len(parts) > 3 and _DEVICE_KIND_RE.fullmatch(parts[3]) else None
        try:
            return cls(int(parts[0]), int(parts[1]), int(parts[2], 8) & 0o7777, kind)
        except ValueError:
            return None

    @classmethod
    def for_device(cls, uid: int, gid: int, mode: int, major: int, minor: int) -> OwnerOverride:
        kind = "char" if stat.S_ISCHR(mode) else "block"
        return cls(uid, gid, mode & 0o7777, f"{kind}-{major}-{minor}")

    def device(self) -> tuple[int, int] | None:
        """(file type bits, rdev) of the device node this override stands for, if any."""
        found = _DEVICE_KIND_RE.fullmatch(self.kind or "")
        if found is None:
            return None
        kind = stat.S_IFCHR if found.group(1) == "char" else stat.S_IFBLK
        major, minor = int(found.group(2)), int(found.group(3))
        if major > 0xFFFFFFF or minor > 0xFFFFFFF:
            return None
        return kind, os.makedev(major, minor)


def read_owner_override(path: str | int) -> OwnerOverride | None:
    raw = _getxattr(path, OWNER_OVERRIDE_XATTR)
    return OwnerOverride.decode(raw) if raw is not None else None


def write_owner_override(path: str | int, override: OwnerOverride) -> None:
    os.setxattr(path, OWNER_OVERRIDE_XATTR, override.encode(), follow_symlinks=isinstance(path, int))


def effective_owner(path: str, st: os.stat_result) -> tuple[int, int, int]:
    """(uid, gid, full st_mode) as an image should record them: the override wins over the real owner,
    and a device placeholder is the device it stands for."""
    override = read_owner_override(path) if not stat.S_ISLNK(st.st_mode) else None
    if override is None:
        return st.st_uid, st.st_gid, st.st_mode
    device = override.device() if _may_be_placeholder(st) else None
    file_type = device[0] if device is not None else stat.S_IFMT(st.st_mode)
    return override.uid, override.gid, file_type | override.mode


def _may_be_placeholder(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def device_placeholder(path: str | int, st: os.stat_result) -> tuple[int, int] | None:
    """(file type bits, rdev) when ``path`` is an empty regular file standing for a device node an
    unprivileged user could not create (its override carries the type); None otherwise."""
    if not _may_be_placeholder(st):
        return None
    override = read_owner_override(path)
    return override.device() if override is not None else None


def read_placeholder_list(layer_root: str | int) -> frozenset[str]:
    """The relative paths of the device placeholders a layer holds (see the module docstring)."""
    raw = _getxattr(layer_root, PLACEHOLDERS_XATTR)
    if not raw:
        return frozenset()
    return frozenset(os.fsdecode(p) for p in raw.split(b"\0") if p)


def write_placeholder_list(layer_root: str, paths: list[str]) -> bool:
    """Record ``paths`` on the layer's root; False (nothing written) when they do not fit."""
    raw = b"\0".join(sorted(os.fsencode(p) for p in paths))
    if not raw or len(raw) > MAX_PLACEHOLDER_LIST:
        return False
    os.setxattr(layer_root, PLACEHOLDERS_XATTR, raw)
    return True


def write_device_placeholder(dir_fd: int, name: str, override: OwnerOverride) -> int:
    """Create the empty regular file standing for the device ``override`` describes; return its fd
    (the caller closes it). Its real mode stays readable by us: the override is what counts."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.setxattr(fd, OWNER_OVERRIDE_XATTR, override.encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- writing -------------------------------------------------------------------------------------


class WhiteoutStyle(Enum):
    CHAR_DEVICE = "chardev"
    WH_FILE = "whfile"


def make_whiteout(dir_fd: int, name: str, prefer: WhiteoutStyle = WhiteoutStyle.CHAR_DEVICE) -> WhiteoutStyle:
    """Create a whiteout for ``name`` in the directory ``dir_fd``; return the style that was written.

    A char 0/0 device is tried first (kernel format); where mknod is refused (EPERM: an unprivileged
    user outside a user namespace) an empty ``.wh.NAME`` file is written instead.
    """
    if prefer is WhiteoutStyle.CHAR_DEVICE:
        try:
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
            return WhiteoutStyle.CHAR_DEVICE
        except PermissionError:
            pass
    fd = os.open(WHITEOUT_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000, dir_fd=dir_fd)
    os.close(fd)
    return WhiteoutStyle.WH_FILE


def remove_whiteout(dir_fd: int, name: str) -> bool:
    """Remove a whiteout for ``name`` in either format; True when one was there."""
    removed = False
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if is_whiteout_stat(st):
            os.unlink(name, dir_fd=dir_fd)
            removed = True
    except FileNotFoundError:
        pass
    try:
        os.unlink(WHITEOUT_PREFIX + name, dir_fd=dir_fd)
        removed = True
    except FileNotFoundError:
        pass
    return removed


def mark_opaque(path: str | int, namespace: XattrNamespace | None = None) -> None:
    """Mark a directory opaque with the xattrs the kernel reads.

    ``trusted.overlay.opaque`` when we may write it (root in the initial namespace), and always
    ``user.overlay.opaque`` too: a filesystem server inside a user namespace cannot read trusted.*
    xattrs, and the kernel reads the user.* name with ``-o userxattr``.
    """
    ns = namespace or XattrNamespace.for_current_user()
    follow = isinstance(path, int)
    if ns is XattrNamespace.TRUSTED:
        try:
            os.setxattr(path, TRUSTED_OPAQUE, b"y", follow_symlinks=follow)
        except PermissionError:
            pass
    os.setxattr(path, USER_OPAQUE, b"y", follow_symlinks=follow)


def remove_whiteout_file_at(dir_fd: int, path: str) -> bool:
    """Remove the ``.wh.NAME`` file beside ``path``; True when there was one."""
    head, tail = split(path)
    try:
        fsat.unlink(f"{head}/{WHITEOUT_PREFIX}{tail}" if head else WHITEOUT_PREFIX + tail, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # NAME too long to have one (as lstat_at reads it)
            return False
        raise
    return True


def set_marker_at(dir_fd: int, path: str, namespace: XattrNamespace, *, opaque: bool = False,
                  redirect: str | None = None) -> None:
    """Mark the directory at ``path`` opaque, or give it a redirect, in the one namespace a mount
    uses (probed at start): the kernel shows user.overlay.* as ordinary xattrs unless mounted with
    userxattr."""
    if opaque:
        setxattr_at(dir_fd, path, namespace.opaque_xattr, b"y")
    if redirect is not None:
        setxattr_at(dir_fd, path, namespace.redirect_xattr, os.fsencode(redirect))


def clear_redirect_at(dir_fd: int, path: str) -> None:
    """Remove the redirect of the directory at ``path`` in both namespaces (where there is one)."""
    for name in (TRUSTED_REDIRECT, USER_REDIRECT):
        try:
            removexattr_at(dir_fd, path, name)
        except OSError:
            pass


def clear_opaque(path: str | int) -> None:
    for name in (TRUSTED_OPAQUE, USER_OPAQUE):
        try:
            os.removexattr(path, name, follow_symlinks=isinstance(path, int))
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
