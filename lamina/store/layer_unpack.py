"""Layer tar (plain, gzip, zstd, xz, bzip2) to a layer directory in unionfs's on-disk format.

The tar is hostile until proven otherwise. It is unpacked in three steps:

1. **Decompress** into a temporary plain tar under the store's ``tmp`` directory, hashing it on the
   way (that hash is the layer's diff_id) and stopping at a size limit (a decompression bomb never
   fills the disk).
2. **Validate** every member in a pure pass, before anything is created: names are normalised and
   refused when absolute, when they contain ``..``, or when an ancestor is a symlink or a
   non-directory made earlier in the same tar; hardlinks must name an earlier, non-directory member;
   sizes and counts are bounded. The result is
   a plan of operations.
3. **Execute** the plan into a fresh directory. Every path is walked component by component from a
   directory fd with ``O_NOFOLLOW``, so even a plan the validator got wrong cannot write outside.
   Directory metadata (modes, owners, mtimes) is applied last, deepest first, so a read-only
   directory in the tar does not stop us filling it.

OCI whiteouts become on-disk whiteouts (``ondisk.make_whiteout``: char 0/0 where mknod is allowed),
``.wh..wh..opq`` becomes ``ondisk.mark_opaque``. Ownership is applied with chown when permitted; an
unprivileged user instead records the intended owner and mode in the owner-override xattr and keeps
the real mode readable for itself (``u+r`` on files, ``u+rwx`` on directories). A device node it
cannot create becomes a placeholder whose override carries the device (``ondisk.device_placeholder``,
containers/storage's rootless format), so the layer tar lamina writes holds the real node again.

The caller unpacks into a temporary directory and renames it into place; on any error the directory
is removed here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from lamina.errors import LayerError
from lamina.store.blobs import CHUNK, HashingWriter, remove_tree, temp_name
from lamina.store.compression import UnbufferedOutput, detect, open_decompressed
from unionfs.core import ondisk

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

_ZERO_CHUNK = bytes(CHUNK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """Bounds beyond which a layer is refused as absurd (env ``LAMINA_MAX_LAYER_BYTES`` overrides)."""

    max_total_bytes: int = int(os.environ.get("LAMINA_MAX_LAYER_BYTES", str(64 << 30)))
    max_entries: int = 2_000_000
    max_path_bytes: int = 4096
    max_name_bytes: int = 255


@dataclass
class UnpackResult:
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int  # bytes of the uncompressed tar
    compression: str | None
    entries: int
    content_size: int = 0  # bytes of regular-file content (what docker shows as a layer's SIZE)


@dataclass
class _Op:
    kind: str  # dir file symlink hardlink fifo chr blk
    path: tuple[str, ...]
    member: tarfile.TarInfo
    target: tuple[str, ...] = ()
    fresh: bool = False  # nothing was at the path before (no need to look there first)


@dataclass
class _Plan:
    ops: list[_Op] = field(default_factory=list)
    whiteouts: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    opaque: list[tuple[str, ...]] = field(default_factory=list)
    content_size: int = 0


def is_host_root() -> bool:
    """Root of the initial user namespace: may chown to any id and create device nodes."""
    return os.geteuid() == 0 and ondisk.XattrNamespace.for_current_user() is ondisk.XattrNamespace.TRUSTED



# --- step 1: decompress --------------------------------------------------------------------------


def decompress_to(source: BinaryIO, out_path: Path, limits: Limits,
                  progress: Progress | None = None) -> tuple[str, int, str | None]:
    """Write the uncompressed bytes of ``source`` to ``out_path``; return (diff_id, size, compression)."""
    stream, kind = open_decompressed(source)
    with UnbufferedOutput(out_path) as out:
        w = HashingWriter(out)  # type: ignore[arg-type]  # a write-only file is all it uses
        try:
            while chunk := stream.read(CHUNK):
                w.write(chunk)
                if progress is not None:
                    progress(len(chunk))
                if w.size > limits.max_total_bytes + (1 << 20):
                    raise LayerError(f"layer is larger than the limit of {limits.max_total_bytes} bytes "
                                     "uncompressed (set LAMINA_MAX_LAYER_BYTES to allow it)")
        except (OSError, EOFError, ValueError) as e:
            if isinstance(e, LayerError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk is not a corrupt layer: the caller names the filesystem
            raise LayerError(f"corrupt {kind or 'tar'} layer stream: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("zstandard") or "Zstd" in type(e).__name__:
                raise LayerError(f"corrupt zstd layer stream: {e}") from None
            raise
    return w.digest, w.size, kind


# --- step 2: validate (pure) ---------------------------------------------------------------------


def _components(name: str, member_name: str, limits: Limits, what: str = "entry") -> tuple[str, ...]:
    if "\x00" in name:
        raise LayerError(f"{what} {member_name!r}: NUL byte in path")
    if name.startswith("/"):
        raise LayerError(f"{what} {member_name!r}: absolute path {name!r} refused")
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise LayerError(f"{what} {member_name!r}: path longer than {limits.max_path_bytes} bytes")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise LayerError(f"{what} {member_name!r}: '..' component in {name!r} refused")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
            raise LayerError(f"{what} {member_name!r}: name component longer than {limits.max_name_bytes} bytes")
    return parts


def _stored_size(member: tarfile.TarInfo) -> int:
    if member.sparse:
        sparse: list[tuple[int, int]] = member.sparse  # type: ignore[assignment]
        return sum(length for _offset, length in sparse)
    return member.size


def validate(members: list[tarfile.TarInfo], archive_size: int, limits: Limits | None = None) -> _Plan:
    """Check every member of a layer tar and return what to do; raise LayerError on the first problem.

    Pure: reads only the member list. ``archive_size`` is the size of the plain tar, to catch members
    whose data would lie beyond its end.
    """
    limits = limits or Limits()
    if len(members) > limits.max_entries:
        raise LayerError(f"layer has {len(members)} entries, more than the limit of {limits.max_entries}")
    kinds: dict[tuple[str, ...], str] = {}
    plan = _Plan()
    total = 0
    whiteouts: dict[tuple[tuple[str, ...], str], None] = {}
    for m in members:
        path = _components(m.name, m.name, limits)
        if not path:
            if m.isdir():
                continue  # the layer's root ("./"): its metadata is not part of the image
            raise LayerError(f"entry {m.name!r}: a non-directory at the layer's root")
        _check_ancestors(m, path, kinds)
        base = path[-1]
        if base == ondisk.OPAQUE_MARKER:
            plan.opaque.append(path[:-1])
            continue
        hidden = ondisk.whited_out_name(base)
        if hidden is not None:
            if hidden in ("", ".", "..") or "/" in hidden:
                raise LayerError(f"entry {m.name!r}: malformed whiteout")
            whiteouts[(path[:-1], hidden)] = None
            continue
        if m.isdir():
            kind = "dir"
        elif m.isreg():
            kind = "file"
            total = _check_regular(m, total, archive_size, limits)
        elif m.issym():
            kind = "symlink"
            if not m.linkname or "\x00" in m.linkname:
                raise LayerError(f"entry {m.name!r}: empty or malformed symlink target")
        elif m.islnk():
            kind = "hardlink"
            plan.ops.append(_Op("hardlink", path, m, _hardlink_target(m, path, kinds, limits),
                                fresh=path not in kinds))
            _replace(kinds, path, "file")
            continue
        elif m.isfifo():
            kind = "fifo"
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            whiteouts[(path[:-1], base)] = None  # an overlayfs whiteout carried in a tar
            continue
        elif m.ischr() or m.isblk():
            kind = "chr" if m.ischr() else "blk"
        else:
            raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
        plan.ops.append(_Op(kind, path, m, fresh=path not in kinds))
        if kind == "dir" and kinds.get(path) == "dir":
            continue
        _replace(kinds, path, kind)
    for (parent, name) in whiteouts:
        existing = kinds.get(parent + (name,))
        if existing == "dir":
            # A whiteout and a directory of the same name in one layer: the directory replaces the
            # lower one entirely, which on disk is an opaque directory.
            plan.opaque.append(parent + (name,))
        elif existing is None:
            plan.whiteouts.append((parent, name))
    plan.content_size = total
    return plan


def _check_ancestors(m: tarfile.TarInfo, path: tuple[str, ...], kinds: dict[tuple[str, ...], str]) -> None:
    """Every ancestor of ``path`` is a directory (an unseen one becomes an implied 0755 parent)."""
    for i in range(1, len(path)):
        ancestor = path[:i]
        kind = kinds.get(ancestor)
        if kind is None:
            kinds[ancestor] = "dir"  # implied parent, created 0755
        elif kind == "symlink":
            raise LayerError(f"entry {m.name!r} is written through the symlink {'/'.join(ancestor)!r}")
        elif kind != "dir":
            raise LayerError(f"entry {m.name!r} lies below the non-directory {'/'.join(ancestor)!r}")


def _check_regular(m: tarfile.TarInfo, total: int, archive_size: int, limits: Limits) -> int:
    """A regular file's size is sane and its data lies in the tar; return the new running total."""
    if m.size < 0 or m.size > limits.max_total_bytes:
        raise LayerError(f"entry {m.name!r}: absurd size {m.size}")
    total += m.size
    if total > limits.max_total_bytes:
        raise LayerError(f"layer unpacks to more than the limit of {limits.max_total_bytes} bytes")
    if m.offset_data + _stored_size(m) > archive_size:
        raise LayerError(f"entry {m.name!r}: data runs past the end of the tar (truncated or "
                         f"a lying size of {m.size})")
    return total


def _hardlink_target(m: tarfile.TarInfo, path: tuple[str, ...], kinds: dict[tuple[str, ...], str],
                     limits: Limits) -> tuple[str, ...]:
    """The hard link's target: an earlier non-directory of this layer, reached through directories."""
    if m.linkname.startswith("/"):
        raise LayerError(f"entry {m.name!r}: hardlink to absolute path {m.linkname!r} points "
                         "outside the layer")
    target = _components(m.linkname, m.name, limits, "hardlink")
    target_kind = kinds.get(target)
    if not target:
        raise LayerError(f"entry {m.name!r}: hardlink to the layer's root")
    if target_kind is None:
        raise LayerError(f"entry {m.name!r}: hardlink to missing target {m.linkname!r}")
    if target_kind in ("dir", "whiteout"):
        raise LayerError(f"entry {m.name!r}: hardlink to a {target_kind} {m.linkname!r}")
    for i in range(1, len(target)):
        if kinds.get(target[:i]) != "dir":
            raise LayerError(f"entry {m.name!r}: hardlink target {m.linkname!r} is reached "
                             "through a non-directory")
    if target == path:
        raise LayerError(f"entry {m.name!r}: hardlink to itself")
    return target


def _replace(kinds: dict[tuple[str, ...], str], path: tuple[str, ...], kind: str) -> None:
    if path in kinds and kinds[path] == "dir":
        n = len(path)
        for key in [k for k in kinds if len(k) > n and k[:n] == path]:
            del kinds[key]
    kinds[path] = kind


# --- step 3: execute -----------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


class _Slice:
    """``size`` bytes of a file descriptor from ``offset``, read with pread (no shared position)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.left = fd, offset, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.pread(self.fd, n, self.offset) if n else b""
        self.offset += len(data)
        self.left -= len(data)
        return data


class _Extractor:
    """Executes a validated plan below ``root_fd``; every path walk refuses symlinks."""

    def __init__(self, root_fd: int, root_path: str, tar: tarfile.TarFile, data_fd: int | None = None) -> None:
        self.root_fd = root_fd
        self.root_path = root_path
        self.tar = tar
        self.data_fd = data_fd  # the plain tar, open, for reading members' data in place
        # chown only as root of the initial user namespace. Root of a user namespace (the runner
        # commits there) could chown to subordinate ids, but the layer would then hold files the
        # user cannot remove or read outside that namespace; overrides keep it manageable.
        self.privileged = is_host_root()
        self.deferred_dirs: dict[tuple[str, ...], tarfile.TarInfo | None] = {}
        self.placeholders: list[tuple[str, ...]] = []
        self._cache: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _open_dir(self, path: tuple[str, ...], create: bool = True) -> int:
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(path):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    self.deferred_dirs.setdefault(path[:i + 1], None)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent_fd(self, path: tuple[str, ...]) -> int:
        """An fd of the parent directory of ``path`` (cached; do not close it)."""
        parent = path[:-1]
        if self._cache is not None and self._cache[0] == parent:
            return self._cache[1]
        self.close()
        fd = self._open_dir(parent)
        self._cache = (parent, fd)
        return fd

    def _clear_existing(self, pfd: int, path: tuple[str, ...]) -> None:
        name = path[-1]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=pfd)
            n = len(path)
            for key in [k for k in self.deferred_dirs if k[:n] == path]:
                del self.deferred_dirs[key]
            self.close()
        else:
            os.unlink(name, dir_fd=pfd)

    def run(self, plan: _Plan) -> None:
        for op in plan.ops:
            pfd = self.parent_fd(op.path)
            name = op.path[-1]
            if op.kind == "dir":
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(name, dir_fd=pfd)
                        raise FileNotFoundError
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                self.deferred_dirs[op.path] = op.member
                continue
            if not op.fresh:
                self._clear_existing(pfd, op.path)
                pfd = self.parent_fd(op.path)
            if op.kind == "file":
                self._write_file(pfd, name, op.member)
            elif op.kind == "symlink":
                os.symlink(op.member.linkname, name, dir_fd=pfd)
                self._finish_symlink(pfd, name, op.member)
            elif op.kind == "hardlink":
                tfd = self._open_dir(op.target[:-1], create=False)
                try:
                    os.link(op.target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(tfd)
            elif op.kind == "fifo":
                os.mkfifo(name, 0o600, dir_fd=pfd)
                self._finish_special(pfd, name, op.member)
            else:
                self._make_device(pfd, name, op)
        self.close()
        for parent, name in plan.whiteouts:
            fd = self._open_dir(parent)
            try:
                ondisk.make_whiteout(fd, name)
            finally:
                os.close(fd)
        for path in plan.opaque:
            if not path:
                _mark_opaque(self.root_path)
                continue
            fd = self._open_dir(path[:-1])
            try:
                os.stat(path[-1], dir_fd=fd, follow_symlinks=False)
                # By name below an fd we walked without following symlinks: ondisk's xattr calls
                # use follow_symlinks=False, which os.setxattr refuses for a bare fd.
                _mark_opaque(f"/proc/self/fd/{fd}/{path[-1]}")
            except FileNotFoundError:
                os.mkdir(path[-1], 0o700, dir_fd=fd)
                self.deferred_dirs.setdefault(path, None)
                _mark_opaque(f"/proc/self/fd/{fd}/{path[-1]}")
            finally:
                os.close(fd)
        # Deepest first, so a directory made read-only does not stop us finishing its children.
        for path in sorted(self.deferred_dirs, key=len, reverse=True):
            member = self.deferred_dirs[path]
            fd = self._open_dir(path, create=False)
            try:
                if member is None:
                    self._apply_owner_mode(fd, 0, 0, stat.S_IFDIR | 0o755, is_dir=True)
                else:
                    self._apply_owner_mode(fd, member.uid, member.gid, stat.S_IFDIR | member.mode, is_dir=True)
                    self._apply_xattrs(fd, member)
                    os.utime(fd, ns=(_ns(member.mtime), _ns(member.mtime)))
            finally:
                os.close(fd)
        if self.placeholders:
            self._record_placeholders()

    def _record_placeholders(self) -> None:
        """List the device placeholders still there (a later entry may have replaced one) on the
        layer's root, for the union to leave out (see :mod:`unionfs.core.ondisk`)."""
        kept = []
        for path in self.placeholders:
            try:
                fd = self._open_dir(path[:-1], create=False)
            except OSError:
                continue  # its directory was replaced (by a file or a symlink): gone
            try:
                st = os.stat(path[-1], dir_fd=fd, follow_symlinks=False)
                if ondisk.device_placeholder(f"/proc/self/fd/{fd}/{path[-1]}", st) is not None:
                    kept.append("/".join(path))
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        if kept and not ondisk.write_placeholder_list(self.root_path, kept):
            log.info("%d device placeholders are too many to list: containers will show them as "
                     "empty files", len(kept))

    def _write_file(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=pfd)
        try:
            src = self._member_data(member)
            written = 0
            hole_at_end = False
            while chunk := src.read(CHUNK):
                # Runs of zeros become holes, so sparse files stay sparse on disk.
                hole_at_end = len(chunk) == CHUNK and chunk == _ZERO_CHUNK
                if hole_at_end:
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                else:
                    os.write(fd, chunk)
                written += len(chunk)
            if written != member.size:
                raise LayerError(f"entry {member.name!r}: truncated data ({written} of {member.size} bytes)")
            if hole_at_end:  # a seek past the end does not make the file longer
                os.ftruncate(fd, member.size)
            # Owner before xattrs: chown clears security.capability (and setuid bits, hence chmod
            # after chown inside _apply_owner_mode).
            self._apply_owner_mode(fd, member.uid, member.gid, stat.S_IFREG | member.mode, is_dir=False)
            self._apply_xattrs(fd, member)
            os.utime(fd, ns=(_ns(member.mtime), _ns(member.mtime)))
        finally:
            os.close(fd)

    def _member_data(self, member: tarfile.TarInfo) -> _Readable:
        """A reader of the member's data: straight from the tar file at its offset (the validator
        checked it lies inside), or through tarfile for a sparse member."""
        if member.sparse or self.data_fd is None:
            src = self.tar.extractfile(member)
            if src is None:
                raise LayerError(f"entry {member.name!r}: no data")
            return src
        return _Slice(self.data_fd, member.offset_data, member.size)

    def _make_device(self, pfd: int, name: str, op: _Op) -> None:
        m = op.member
        kind = stat.S_IFCHR if op.kind == "chr" else stat.S_IFBLK
        if self.privileged:
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                pass  # root without CAP_MKNOD (in a container): keep a placeholder, as below
            else:
                self._finish_special(pfd, name, m)
                return
        # As containers/storage in rootless storage: an empty file whose override names the device.
        override = ondisk.OwnerOverride.for_device(m.uid, m.gid, kind | m.mode, m.devmajor, m.devminor)
        fd = ondisk.write_device_placeholder(pfd, name, override)
        self.placeholders.append(op.path)
        try:
            self._apply_xattrs(fd, m)
            os.utime(fd, ns=(_ns(m.mtime), _ns(m.mtime)))
        finally:
            os.close(fd)

    def _finish_symlink(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        if self.privileged:
            with contextlib.suppress(PermissionError, OSError):
                os.chown(name, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=(_ns(member.mtime), _ns(member.mtime)), dir_fd=pfd, follow_symlinks=False)

    def _finish_special(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        # FIFOs and devices cannot be opened safely (open blocks or has side effects): use paths
        # relative to the parent fd, which we just created the entry in.
        proc_path = f"/proc/self/fd/{pfd}/{name}"
        kind = stat.S_IFIFO if member.isfifo() else (stat.S_IFCHR if member.ischr() else stat.S_IFBLK)
        self._apply_owner_mode(proc_path, member.uid, member.gid, kind | member.mode, is_dir=False,
                               chmod=lambda m: os.chmod(name, m, dir_fd=pfd),
                               chown=lambda u, g: os.chown(name, u, g, dir_fd=pfd, follow_symlinks=False))
        self._apply_xattrs(proc_path, member)
        os.utime(name, ns=(_ns(member.mtime), _ns(member.mtime)), dir_fd=pfd, follow_symlinks=False)

    def _apply_owner_mode(self, target: int | str, uid: int, gid: int, mode: int, is_dir: bool,
                          chmod: Callable[[int], None] | None = None,
                          chown: Callable[[int, int], None] | None = None) -> None:
        perms = mode & 0o7777
        chmod = chmod or (lambda m: os.chmod(target, m))
        chown = chown or (lambda u, g: os.chown(target, u, g))
        chowned = False
        if self.privileged:
            try:
                chown(uid, gid)
                chowned = True
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL):
                    raise
        if chowned:
            chmod(perms)
            return
        # Unprivileged: keep what we need to read (and remove) the layer ourselves; record the rest.
        disk = perms | (0o700 if is_dir else 0o600)
        if (uid, gid) != (0, 0) or disk != perms:
            override = ondisk.OwnerOverride(uid, gid, perms)
            if isinstance(target, int):
                # os.setxattr refuses an fd together with follow_symlinks=False; an fd never follows.
                os.setxattr(target, ondisk.OWNER_OVERRIDE_XATTR, override.encode())
            else:
                ondisk.write_owner_override(target, override)
        chmod(disk)

    def _apply_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if ondisk.is_private_xattr(name):
                log.debug("ignoring union-private xattr %s on %s", name, member.name)
                continue
            try:
                os.setxattr(target, name, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=not isinstance(target, str))
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                    raise
                log.info("cannot keep xattr %s on %s: %s", name, member.name, e.strerror)


def _mark_opaque(path: str) -> None:
    """Opaque in the namespace the kernel reads here, and always also in ``user.``.

    Root writes ``trusted.overlay.opaque``, which is invisible inside a user namespace, where the
    runner serves these layers; ``user.overlay.opaque`` is readable there (and by kernel overlayfs
    with ``-o userxattr``).
    """
    ondisk.mark_opaque(path)
    ondisk.mark_opaque(path, ondisk.XattrNamespace.USER)


def _ns(mtime: float) -> int:
    return int(mtime * 1_000_000_000)


# --- entry point ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _plain_tar(source: BinaryIO | Path, tmp_dir: Path, limits: Limits, progress: Progress | None,
               known_digest: str | None = None) -> Iterator[tuple[Path, str, int, str | None]]:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        with open(source, "rb") as f:
            if detect(f.read(6)) is None:
                if known_digest is not None:
                    # A content-addressed blob, verified when it entered the store: no second hash.
                    size = os.fstat(f.fileno()).st_size
                    if size > limits.max_total_bytes:
                        raise LayerError(f"layer is larger than the limit of {limits.max_total_bytes} bytes")
                    yield source, known_digest, size, None
                    return
                # Already a plain tar on disk (a stored blob, an uncompressed archive member):
                # hash it in place instead of copying it.
                f.seek(0)
                w = HashingWriter(None)
                while chunk := f.read(CHUNK):
                    w.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                yield source, w.digest, w.size, None
                return
    plain = temp_name(tmp_dir, "tar")
    try:
        if isinstance(source, Path):
            with open(source, "rb") as f:
                digest, size, kind = decompress_to(f, plain, limits, progress)
        else:
            digest, size, kind = decompress_to(source, plain, limits, progress)
        yield plain, digest, size, kind
    finally:
        with contextlib.suppress(FileNotFoundError):
            plain.unlink()


def unpack_layer(source: BinaryIO | Path, dest: Path, tmp_dir: Path, limits: Limits | None = None,
                 expected_diff_id: str | None = None, progress: Progress | None = None,
                 source_digest: str | None = None) -> UnpackResult:
    """Unpack a layer tar into the new directory ``dest`` (which must not exist).

    Resource handling: creates ``dest`` and a temporary plain tar in ``tmp_dir``; the temporary file
    is always removed, and ``dest`` is removed when anything fails.
    ``source_digest``: the known sha256 of ``source`` when it is a verified store blob (a plain
    tar's digest is its diff_id, so it need not be hashed again).
    Error handling: a hostile or malformed tar raises :class:`LayerError` naming the entry; a
    diff_id other than ``expected_diff_id`` raises :class:`LayerError` before anything is created.
    """
    limits = limits or Limits()
    with _plain_tar(source, tmp_dir, limits, progress, source_digest) as (plain, diff_id, size, kind):
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise LayerError(f"layer content does not match its diff_id: expected {expected_diff_id}, "
                             f"got {diff_id}")
        with open(plain, "rb") as data:
            entries, content_size = _unpack_plain(data.fileno(), 0, size, dest, limits)
    return UnpackResult(diff_id=diff_id, tar_size=size, compression=kind, entries=entries,
                        content_size=content_size)


def unpack_plain_in_place(fd: int, offset: int, size: int, dest: Path, diff_id: str,
                          limits: Limits | None = None) -> UnpackResult:
    """Unpack the plain layer tar stored at ``offset`` in the open file ``fd`` (a docker-archive's
    member) into the new directory ``dest``, reading it in place.

    Nothing here hashes the tar: ``diff_id`` is what the caller expects, and the caller must check
    the tar's digest against it (a blob ingested at the same time, :mod:`lamina.store.load_in_place`)
    before the directory is used. Resource handling and errors as :func:`unpack_layer`.
    """
    limits = limits or Limits()
    if size > limits.max_total_bytes:
        raise LayerError(f"layer is larger than the limit of {limits.max_total_bytes} bytes")
    entries, content_size = _unpack_plain(fd, offset, offset + size, dest, limits)
    return UnpackResult(diff_id=diff_id, tar_size=size, compression=None, entries=entries,
                        content_size=content_size)


class FileRegion(io.RawIOBase):
    """Bytes ``[start, end)`` of an open file, read with ``pread`` (so threads may share the
    descriptor) and addressed by their offsets in the whole file: tarfile takes the position it
    starts at as the archive's start, so its members' ``offset_data`` stay offsets in the file."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__()
        self.fd, self.start, self.end, self.position = fd, start, end, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.end - self.position)
        if wanted <= 0:
            return 0
        data = os.pread(self.fd, wanted, self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.end}[whence]
        if not self.start <= base + offset <= self.end:
            # What a member whose size runs past the end makes tarfile do.
            raise OSError(errno.EINVAL, "seek outside the layer's bytes")
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position


def _unpack_plain(data_fd: int, start: int, end: int, dest: Path, limits: Limits) -> tuple[int, int]:
    """Validate and extract the plain tar at ``[start, end)`` of ``data_fd``; (entries, content bytes)."""
    region = io.BufferedReader(FileRegion(data_fd, start, end))
    region.seek(start)
    try:
        tar = tarfile.open(fileobj=region, mode="r:", errorlevel=2)
    except tarfile.TarError as e:
        raise LayerError(f"not a tar archive: {e}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, UnicodeError) as e:
            raise LayerError(f"malformed tar: {e}") from None
        except OSError as e:
            # tarfile seeks to the next header: a size beyond the end makes that seek fail.
            raise LayerError(f"malformed tar: a member's size runs past the end of the archive ({e})") from None
        plan = validate(members, end, limits)
        os.mkdir(dest, 0o700)
        try:
            root_fd = os.open(dest, _DIR_FLAGS)
            extractor = _Extractor(root_fd, str(dest), tar, data_fd)
            try:
                extractor.run(plan)
            finally:
                extractor.close()
                os.close(root_fd)
            os.chmod(dest, 0o755)
        except BaseException as e:
            remove_tree(dest)
            if isinstance(e, (tarfile.TarError, OSError)) and not isinstance(e, LayerError):
                raise LayerError(f"cannot unpack layer: {e}") from None
            raise
    return len(members), plan.content_size
