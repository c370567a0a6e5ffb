"""Tar streams of a directory tree and back, one descriptor at a time (``cp``, ``export``).

Both directions work relative to directory descriptors and never follow a symlink below the
directory they start from: an archive is written by opening each entry with ``O_NOFOLLOW`` under
its parent's descriptor (what an entry *is* comes from the ``fstat`` of what was opened), and on
the host an archive is extracted by walking each member's parents the same way, so a symlink in
the tree (put there beforehand, by an earlier member, or by a process racing us) fails the walk
with ELOOP instead of leading elsewhere. Member names with ``..`` or a leading ``/`` are refused.
(Inside a container's root, where the kernel keeps every resolution in that root, symlinked
parent directories are followed, as docker does.)

Owner and group names are never looked up (no NSS call: inside a container that would load the
container's libraries into this process); entries carry numeric ids only.

Which ids extracted entries get is the caller's choice (:class:`Ownership`). On the host side
(``cp CONTAINER:SRC DEST``) nothing is chowned, set-id bits are dropped and device nodes are
skipped: the archive comes from a container and must not hand the host user a set-id or device
file. Error handling: :class:`ArchiveError` for a member that cannot be extracted, OSError as is.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lamina.errors import LaminaError
from lamina.store.fdtree import DIR_FLAGS, ExactReader, list_names, lstat_in, open_dir_in, open_file_in

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ArchiveError(LaminaError):
    exit_code = 1  # docker's client exit code for a failed copy


# --- writing ------------------------------------------------------------------------------------------


@dataclass
class ArchiveWriter:
    """Writes entries into ``tar``; ``descend(st)`` says whether to enter a directory on another
    device (a mount point) or to leave it out with its contents."""

    tar: tarfile.TarFile
    descend: Callable[[os.stat_result], bool]

    def __post_init__(self) -> None:
        self._links: dict[tuple[int, int], str] = {}

    def add(self, parent_fd: int, name: str, arcname: str) -> None:
        """Add entry ``name`` of the directory ``parent_fd`` (``.``: the directory itself) as
        ``arcname``, with everything below it."""
        st = lstat_in(parent_fd, name)
        if stat.S_ISDIR(st.st_mode):
            dir_fd = open_dir_in(parent_fd, name) if name != "." else os.dup(parent_fd)
            try:
                self._add_dir(dir_fd, arcname, os.fstat(dir_fd), top=True)
            finally:
                os.close(dir_fd)
            return
        self._add_leaf(parent_fd, name, arcname, st)

    def _add_dir(self, dir_fd: int, arcname: str, st: os.stat_result, top: bool = False) -> None:
        self.tar.addfile(header(arcname, st, tarfile.DIRTYPE))
        if not top and not self.descend(st):
            return
        for child in list_names(dir_fd):
            child_arcname = f"{arcname}/{child}" if arcname else child
            try:
                child_st = lstat_in(dir_fd, child)
                if stat.S_ISDIR(child_st.st_mode):
                    child_fd = open_dir_in(dir_fd, child)
                    try:
                        own = os.fstat(child_fd)
                        if own.st_dev != st.st_dev and not self.descend(own):
                            self.tar.addfile(header(child_arcname, own, tarfile.DIRTYPE))
                            continue
                        self._add_dir(child_fd, child_arcname, own)
                    finally:
                        os.close(child_fd)
                else:
                    self._add_leaf(dir_fd, child, child_arcname, child_st)
            except FileNotFoundError:
                continue  # removed while we read (a running container)

    def _add_leaf(self, dir_fd: int, name: str, arcname: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            fd, st = open_file_in(dir_fd, name)
            try:
                if not stat.S_ISREG(st.st_mode):
                    return  # swapped for something else since the listing
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in self._links:
                    info = header(arcname, st, tarfile.LNKTYPE)
                    info.linkname = self._links[key]
                    self.tar.addfile(info)
                    return
                if st.st_nlink > 1:
                    self._links[key] = arcname
                info = header(arcname, st, tarfile.REGTYPE)
                info.size = st.st_size
                self.tar.addfile(info, ExactReader(fd, st.st_size))
            finally:
                os.close(fd)
        elif stat.S_ISLNK(mode):
            info = header(arcname, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(name, dir_fd=dir_fd)
            self.tar.addfile(info)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info = header(arcname, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tar.addfile(info)
        elif stat.S_ISFIFO(mode):
            self.tar.addfile(header(arcname, st, tarfile.FIFOTYPE))
        # sockets are left out, as by docker


def header(arcname: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    return info


def open_writer(out: IO[bytes] | io.BufferedIOBase) -> tarfile.TarFile:
    return tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)


# --- reading ------------------------------------------------------------------------------------------


@dataclass
class Ownership:
    """Who extracted entries belong to: ``keep`` the archive's ids, or ``uid``/``gid`` for every
    entry; ``chown`` False leaves them to the extracting process (the host side)."""

    chown: bool = True
    keep: bool = False
    uid: int = 0
    gid: int = 0
    host_side: bool = False


def member_parts(name: str) -> list[str]:
    """The components of a member name; ArchiveError for an absolute name or a ``..``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise ArchiveError(f"invalid archive member {name!r}: it leaves the destination")
    return parts


class Extractor:
    """Extracts members under the directory ``root_fd`` (see the module docstring)."""

    def __init__(self, root_fd: int, ownership: Ownership) -> None:
        self.root_fd = root_fd
        self.ownership = ownership
        self._dir_times: list[tuple[list[str], int]] = []

    def _open_parent(self, parts: list[str], create: bool = True) -> int:
        """The directory ``parts`` under the root, walked without following a symlink (missing
        directories made when ``create``)."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts:
                child = self._open_child(fd, part, parts, create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child(self, fd: int, part: str, parts: list[str], create: bool) -> int:
        # Inside a container's root (the worker's), a symlinked parent such as /lib -> usr/lib is
        # followed, as docker does: the kernel resolves it inside that root. On the host, never.
        flags = DIR_FLAGS if self.ownership.host_side else DIR_FLAGS & ~os.O_NOFOLLOW
        try:
            return os.open(part, flags, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(part, 0o755, dir_fd=fd)
            self._own(fd, part, None)
            return os.open(part, flags, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ArchiveError(f"cannot extract below {'/'.join(parts)}: {part} is not a directory") from None
            raise

    def extract_all(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            self.extract(tar, member)
        self.finish()

    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = member_parts(member.name)
        if not parts:
            return  # "." is the destination itself, as docker's Untar
        parent = self._open_parent(parts[:-1])
        try:
            self._extract_in(tar, member, parent, parts)
        finally:
            os.close(parent)

    def _extract_in(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int, parts: list[str]) -> None:
        name = parts[-1]
        try:
            existing: os.stat_result | None = lstat_in(parent, name)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                if not member.isdir():
                    raise ArchiveError(f"cannot overwrite directory {'/'.join(parts)} with non-directory")
            else:
                if member.isdir():
                    raise ArchiveError(f"cannot overwrite non-directory {'/'.join(parts)} with directory")
                os.unlink(name, dir_fd=parent)
        mode = member.mode & (0o777 if self.ownership.host_side else 0o7777)
        if member.isdir():
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
        elif member.isreg():
            self._write_file(tar, member, parent, name)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            self._link(member, parent, name)
            return  # the link shares its target's inode: nothing of its own to set
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        elif member.ischr() or member.isblk():
            if self.ownership.host_side:
                log.warning("%s: a device node, not copied to the host", member.name)
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
        else:
            log.warning("%s: unsupported archive entry type, skipped", member.name)
            return
        self._own(parent, name, member)
        if not member.issym():
            os.chmod(name, mode, dir_fd=parent)
        if member.isdir():
            self._dir_times.append((parts, int(member.mtime)))
        else:
            os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int, name: str) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        try:
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _link(self, member: tarfile.TarInfo, parent: int, name: str) -> None:
        target = member_parts(member.linkname)
        if not target:
            raise ArchiveError(f"invalid hard link {member.name!r} -> {member.linkname!r}")
        source_dir = self._open_parent(target[:-1], create=False)
        try:
            os.link(target[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(source_dir)

    def _own(self, parent: int, name: str, member: tarfile.TarInfo | None) -> None:
        own = self.ownership
        if not own.chown:
            return
        uid, gid = (member.uid, member.gid) if own.keep and member is not None else (own.uid, own.gid)
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Set the directories' times, deepest first (creating entries in them changed them)."""
        for parts, mtime in sorted(self._dir_times, key=lambda item: -len(item[0])):
            try:
                fd = self._open_parent(parts, create=False)
            except OSError:
                continue
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
        self._dir_times = []


def open_reader(source: IO[bytes] | io.BufferedIOBase) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=source, mode="r|*")
    except tarfile.TarError as e:
        raise ArchiveError(f"not a tar archive: {e}") from None


def rebase_name(name: str, old_base: str, new_base: str) -> str:
    """docker's RebaseArchiveEntries: a member ``old_base[/rest]`` becomes ``new_base[/rest]``."""
    if old_base in ("", "."):
        stripped = name[2:] if name.startswith("./") else ("" if name in (".", "./") else name)
        return f"{new_base}/{stripped}".rstrip("/") if stripped else new_base
    if name == old_base or name == old_base + "/":
        return new_base
    if name.startswith(old_base + "/"):
        return new_base + name[len(old_base):]
    return name
