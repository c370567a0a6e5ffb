"""Layer directory (unionfs on-disk format) to an OCI layer tar, deterministically.

The same directory content always gives the same bytes: entries are sorted by their byte names,
every header field is fixed (no user or group names, no access times, integer mtimes, devices 0/0
except for device nodes), PAX extended headers appear only where the plain ustar header cannot hold a
value (long names, xattrs, big numbers), and the gzip wrapper carries no file name and mtime 0.

Translations from the on-disk format to the OCI one:

* a whiteout in either on-disk form (char 0/0, or an empty ``.wh.NAME``) becomes ``.wh.NAME``;
* an opaque directory (either xattr, or a ``.wh..wh..opq`` file) gets a ``DIR/.wh..wh..opq`` entry;
* the owner recorded in the owner-override xattr wins over the real owner (``ondisk.effective_owner``),
  and a device placeholder (``ondisk.device_placeholder``) is written as the device node it stands for;
  an unprivileged user's own uid/gid and subordinate ranges are mapped back to container ids the way
  rootless containers map them (own id = 0, subordinate range = 1..N);
* union-private xattrs are never exported; other xattrs travel as ``SCHILY.xattr.*``;
* hardlinked files (same inode) become one file and ``LNKTYPE`` entries pointing at the first name.

A directory with overlay redirects cannot be expressed as a tar without its lower layers, so it is
refused with :class:`LayerError`.

The directory may be a running container's upper, changed by untrusted processes while it is read
(``lamina commit --pause=false``, or anything they race the pause with): it is walked by directory
descriptors only, never following a symlink (:mod:`store.fdtree`), so nothing outside it can get
into the layer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lamina.errors import LayerError
from lamina.store import fdtree
from lamina.store.blobs import HashingWriter
from lamina.store.layer_settle import Entry, Settler
from lamina.store.outbound import gzip_writer
from unionfs.core import ondisk

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class IdMap:
    """Maps on-disk ids back to container ids: ``[(host_start, container_start, count), ...]``."""

    uid_ranges: tuple[tuple[int, int, int], ...] = ()
    gid_ranges: tuple[tuple[int, int, int], ...] = ()

    @staticmethod
    def _map(ranges: tuple[tuple[int, int, int], ...], host_id: int) -> int:
        for host_start, container_start, count in ranges:
            if host_start <= host_id < host_start + count:
                return container_start + host_id - host_start
        return host_id if not ranges else 65534

    def uid(self, host_uid: int) -> int:
        return self._map(self.uid_ranges, host_uid)

    def gid(self, host_gid: int) -> int:
        return self._map(self.gid_ranges, host_gid)

    @classmethod
    def for_current_user(cls) -> IdMap:
        """Identity for root; the rootless mapping (own id = 0, subordinate ids = 1..N) otherwise."""
        if os.geteuid() == 0:
            return cls()
        uid, gid = os.getuid(), os.getgid()
        return cls(((uid, 0, 1),) + _subids("/etc/subuid", uid), ((gid, 0, 1),) + _subids("/etc/subgid", uid))


def _subids(path: str, uid: int) -> tuple[tuple[int, int, int], ...]:
    try:
        import pwd
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    return ((int(parts[1]), 1, int(parts[2])),)
    except (OSError, ValueError):
        pass
    return ()


@dataclass
class PackResult:
    diff_id: str
    tar_size: int
    digest: str | None  # of the compressed stream, when one was written
    compressed_size: int | None
    content_size: int = 0  # bytes of regular-file content


_OPAQUE_ENTRY_MODE = 0o644



class _EntryChanged(Exception):
    """The entry is no longer what its ``lstat`` said (a running container changed it): look again."""


# How often one entry is looked at again when it keeps changing under the reader.
_ENTRY_ATTEMPTS = 3

XattrHandle = str | int  # an open descriptor, or a path whose last component is not followed
_COPY_CHUNK = 1 << 20
# Deepest directory nesting packed; one descriptor is open per level while packing.
MAX_DEPTH = 512


@dataclass
class _Level:
    """One open directory of the walk: what is left to emit of it."""

    fd: int
    rel: str  # its path in the tar, "" or ending in "/"
    names: Iterator[str]
    owned: bool  # closed by the walk (the root's descriptor belongs to the caller)
    whiteouts: set[str] = field(default_factory=set)
    settle: Callable[[], None] | None = None  # a directory is settled after its entries


_OCTAL_LIMITS = {8: 8 ** 7, 12: 8 ** 11}
_NO_DEVICE = bytes(16)


def _plain_ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """The header ``TarInfo.tobuf`` (PAX format) writes, for the common entry that needs no PAX
    record (ASCII names that fit, small integers, no xattrs, not a device); None for any other.

    tobuf costs tens of microseconds an entry, much of a many-file layer's packing time; this
    builds the same 512 bytes directly (checked against tarfile in the tests).
    """
    name, linkname, kind = info.name, info.linkname, info.type
    if info.pax_headers or kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) or info.uname or info.gname:
        return None
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if len(name) > 100 or len(linkname) > 100 or not name.isascii() or not linkname.isascii():
        return None
    uid, gid, size, mtime = info.uid, info.gid, info.size, info.mtime
    if not (type(uid) is type(gid) is type(size) is type(mtime) is int):
        return None
    if not (0 <= uid < _OCTAL_LIMITS[8] and 0 <= gid < _OCTAL_LIMITS[8] and 0 <= size < _OCTAL_LIMITS[12]
            and 0 <= mtime < _OCTAL_LIMITS[12]):
        return None
    head = b"".join((
        name.encode().ljust(100, b"\0"),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (info.mode & 0o7777, uid, gid, size, mtime),
        b"        ", kind, linkname.encode().ljust(100, b"\0"), tarfile.POSIX_MAGIC,
        bytes(64), _NO_DEVICE, bytes(155 + 12)))
    checksum = sum(head)
    return head[:148] + b"%06o\0" % checksum + head[155:]


class _TarStream:
    """What the packer needs of ``tarfile.TarFile`` in write mode, writing the same bytes.

    Headers come from ``TarInfo.tobuf`` (PAX format, as TarFile writes them); file data goes to
    the sink in _COPY_CHUNK pieces (TarFile's stream mode hands it 10 KiB at a time, a hash update
    and a write call each); and no member is remembered (TarFile keeps a TarInfo per entry, which a
    100,000-entry layer would hold in memory until the end).
    """

    def __init__(self, sink: HashingWriter) -> None:
        self.sink = sink
        self.offset = 0

    def addfile(self, info: tarfile.TarInfo, data: fdtree.ExactReader | None = None) -> None:
        header = _plain_ustar_header(info) or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.sink.write(header)
        self.offset += len(header)
        if data is None:
            return
        left = info.size
        while left:
            chunk = data.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{info.name}: unexpected end of data")
            self.sink.write(chunk)
            left -= len(chunk)
        padding = -info.size % tarfile.BLOCKSIZE
        if padding:
            self.sink.write(bytes(padding))
        self.offset += info.size + padding

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as TarFile pads it."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.offset + end) % tarfile.RECORDSIZE
        self.sink.write(bytes(end))
        self.offset += end


class _Packer:
    """Walks a layer directory by descriptors only (see :mod:`store.fdtree`) and writes tar entries.

    The directory may be a running container's upper: nothing here follows a symlink or uses a
    path that an entry could be swapped under, so what is packed comes from inside the tree.
    """

    def __init__(self, tar: _TarStream, idmap: IdMap, progress: Progress | None,
                 settler: Settler | None = None) -> None:
        self.tar = tar
        self.idmap = idmap
        self.progress = progress
        self.settler = settler  # makes each entry what unpacking it would (lamina.store.layer_settle)
        self.links: dict[tuple[int, int], str] = {}
        self.content_size = 0
        self._pending_dir: Callable[[], None] | None = None

    def _header(self, name: str, kind: bytes, st: os.stat_result | None,
                handle: XattrHandle | None, xattrs: list[str] | None = None) -> tarfile.TarInfo:
        """The entry's header; ``xattrs``: the names ``listxattr`` gave for ``handle``, if read."""
        info = tarfile.TarInfo(name)
        info.type = kind
        info.uname = info.gname = ""
        if st is None:
            info.mode, info.uid, info.gid, info.mtime = _OPAQUE_ENTRY_MODE, 0, 0, 0
            return info
        assert handle is not None
        if not stat.S_ISLNK(st.st_mode) and xattrs is None:
            xattrs = _xattr_names(handle)
        override = None
        if xattrs is None or ondisk.OWNER_OVERRIDE_XATTR in xattrs:
            override = None if stat.S_ISLNK(st.st_mode) else ondisk.read_owner_override(handle)
        if override is None:
            # A real on-disk owner is a host id: map it back to the container's. An override
            # already holds container ids.
            info.uid, info.gid, mode = self.idmap.uid(st.st_uid), self.idmap.gid(st.st_gid), st.st_mode
        else:
            info.uid, info.gid, mode = override.uid, override.gid, override.mode
        info.mode = stat.S_IMODE(mode)
        info.mtime = int(st.st_mtime)
        if not stat.S_ISLNK(st.st_mode):
            public = _public_xattrs(handle, xattrs)
            if public:
                pax: dict[str, str] = {}
                binary = False
                for key, value in public:
                    try:
                        text = value.decode("utf-8")
                    except UnicodeDecodeError:
                        binary = True
                        text = value.decode("utf-8", "surrogateescape")
                    pax["SCHILY.xattr." + key] = text
                if binary:
                    pax["hdrcharset"] = "BINARY"
                info.pax_headers = pax
        return info

    def _whiteout(self, rel_dir: str, hidden: str) -> None:
        info = tarfile.TarInfo(rel_dir + ondisk.WHITEOUT_PREFIX + hidden)
        info.type = tarfile.REGTYPE
        info.uname = info.gname = ""
        info.mode, info.uid, info.gid, info.mtime, info.size = 0o644, 0, 0, 0, 0
        self.tar.addfile(info)

    def pack_tree(self, root_fd: int) -> None:
        """Emit every entry below the open directory ``root_fd``, depth first, sorted by byte name.

        Iterative, holding one descriptor per level: a hostile tree's depth meets
        :data:`MAX_DEPTH` (one line), never the interpreter's recursion limit.
        """
        stack = [_Level(root_fd, "", iter(fdtree.list_names(root_fd)), owned=False)]
        try:
            while stack:
                level = stack[-1]
                name = next(level.names, None)
                if name is None:
                    stack.pop()
                    if level.settle is not None:
                        level.settle()
                    if level.owned:
                        os.close(level.fd)
                    continue
                child = self._visit(level, name)
                if child is not None:
                    rel = level.rel + name + "/"
                    stack.append(_Level(child, rel, iter(()), owned=True, settle=self._pending_dir))
                    self._pending_dir = None
                    if len(stack) > MAX_DEPTH:
                        raise LayerError(f"{rel}: directories nested deeper than {MAX_DEPTH} levels")
                    stack[-1].names = iter(fdtree.list_names(child))
        finally:
            for level in stack:
                if level.owned:
                    os.close(level.fd)

    def _visit(self, level: _Level, name: str) -> int | None:
        """Emit one entry of ``level``; an open descriptor when it is a directory to descend into."""
        if name == ondisk.OPAQUE_MARKER:
            if self.settler is not None:
                self.settler.remove(level.fd, name)
            return None  # exported with its directory, from either opaque format
        try:
            st = fdtree.lstat_in(level.fd, name)
        except FileNotFoundError:
            return None  # removed since the listing
        hidden = ondisk.whited_out_name(name)
        if hidden is None and ondisk.is_whiteout_stat(st):
            hidden = name
        if hidden is not None:
            if hidden not in level.whiteouts:  # both on-disk formats for one name give one entry
                self._whiteout(level.rel, hidden)
                level.whiteouts.add(hidden)
            if self.settler is not None and hidden != name:
                self.settler.whiteout_file(level.fd, name, hidden)
            return None
        return self._entry(level.fd, name, level.rel + name, st)

    def _entry(self, dir_fd: int, name: str, rel: str, st: os.stat_result) -> int | None:
        for _ in range(_ENTRY_ATTEMPTS):
            try:
                return self._entry_once(dir_fd, name, rel, st)
            except _EntryChanged:
                pass
            except OSError as e:
                # ELOOP: a symlink now where a file or directory was; ENOTDIR: a file where a
                # directory was; EINVAL: readlink of what is no longer a symlink.
                if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL, errno.ENOENT):
                    raise
            try:
                st = fdtree.lstat_in(dir_fd, name)
            except FileNotFoundError:
                return None  # removed while we read it: absent from the layer, as it is now
        raise LayerError(f"{rel}: kept changing while the layer was read (commit with --pause)")

    def _entry_once(self, dir_fd: int, name: str, rel: str, st: os.stat_result) -> int | None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            fd = fdtree.open_dir_in(dir_fd, name)
            try:
                self._directory(fd, rel)
            except BaseException:
                os.close(fd)
                raise
            return fd
        if stat.S_ISREG(mode):
            fd, st = fdtree.open_file_in(dir_fd, name)
            with fdtree.opened(fd):
                if not stat.S_ISREG(st.st_mode):
                    raise _EntryChanged
                device = ondisk.device_placeholder(fd, st)
                if device is not None:
                    # A device node kept by an unprivileged user: the tar holds the real node again.
                    kind = tarfile.CHRTYPE if device[0] == stat.S_IFCHR else tarfile.BLKTYPE
                    xattrs = _xattr_names(fd)
                    info = self._header(rel, kind, st, fd, xattrs)
                    info.devmajor, info.devminor = os.major(device[1]), os.minor(device[1])
                    self.tar.addfile(info)
                    if self.settler is not None:
                        self.settler.placeholder(rel)
                        self.settler.settle(Entry(fd), st, xattrs or [], _logical(info), placeholder=True)
                else:
                    self._file(fd, rel, st)
        elif stat.S_ISLNK(mode):
            info = self._header(rel, tarfile.SYMTYPE, st, fdtree.entry_path(dir_fd, name))
            info.linkname = os.readlink(name, dir_fd=dir_fd)
            self.tar.addfile(info)
            if self.settler is not None:
                self.settler.settle_symlink(dir_fd, name, st)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = tarfile.FIFOTYPE if stat.S_ISFIFO(mode) else \
                tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            path = fdtree.entry_path(dir_fd, name)
            xattrs = _xattr_names(path)
            info = self._header(rel, kind, st, path, xattrs)
            if kind != tarfile.FIFOTYPE:
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tar.addfile(info)
            if self.settler is not None:
                self.settler.settle(Entry(dir_fd=dir_fd, name=name), st, xattrs or [], _logical(info))
        else:
            log.debug("skipping socket %s: sockets are not part of images", rel)
            if self.settler is not None:
                self.settler.remove(dir_fd, name)
        return None

    def _directory(self, fd: int, rel: str) -> None:
        """The header of an open directory (and its opaque marker); its entries come after."""
        st = os.fstat(fd)
        if ondisk.read_redirect(fd) is not None:
            raise LayerError(f"{rel}: directory has an overlay redirect, which a layer tar cannot "
                             "express")
        xattrs = _xattr_names(fd)
        info = self._header(rel, tarfile.DIRTYPE, st, fd, xattrs)
        self.tar.addfile(info)
        opaque = ondisk.is_opaque_dir(fd)
        if opaque:
            self.tar.addfile(self._header(rel + "/" + ondisk.OPAQUE_MARKER, tarfile.REGTYPE, None, None))
        settler = self.settler
        if settler is not None:
            if opaque:
                settler.mark_opaque(fd, xattrs or [])
            logical = _logical(info)
            self._pending_dir = lambda: settler.settle(Entry(fd), st, xattrs or [], logical, is_dir=True)

    def _file(self, fd: int, rel: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            info = self._header(rel, tarfile.LNKTYPE, st, fd)
            info.linkname = self.links[key]
            self.tar.addfile(info)
            return
        if st.st_nlink > 1:
            self.links[key] = rel
        xattrs = _xattr_names(fd)
        info = self._header(rel, tarfile.REGTYPE, st, fd, xattrs)
        info.size = st.st_size
        self.content_size += st.st_size
        self.tar.addfile(info, fdtree.ExactReader(fd, st.st_size))
        if self.settler is not None:
            self.settler.settle(Entry(fd), st, xattrs or [], _logical(info), read=st.st_size > 0)
        if self.progress is not None:
            self.progress(st.st_size)


def _logical(info: tarfile.TarInfo) -> tuple[int, int, int]:
    """The owner and permission bits a header holds."""
    return info.uid, info.gid, info.mode


def _xattr_names(handle: XattrHandle) -> list[str] | None:
    """The entry's xattr names; None when they cannot be listed."""
    # A descriptor is used as itself; a path's last component is never followed.
    try:
        return os.listxattr(handle, follow_symlinks=isinstance(handle, int))
    except OSError:
        return None


def _public_xattrs(handle: XattrHandle, names: list[str] | None = None) -> list[tuple[str, bytes]]:
    follow = isinstance(handle, int)
    if names is None:
        names = _xattr_names(handle)
    if not names:
        return []
    result = []
    for name in sorted(names):
        if ondisk.is_private_xattr(name) or name.startswith("trusted.") or name == "security.selinux":
            continue
        try:
            result.append((name, os.getxattr(handle, name, follow_symlinks=follow)))
        except OSError:
            continue
    return result


def pack_layer(src_dir: Path, out: BinaryIO | HashingWriter | None, compress: bool = True,
               idmap: IdMap | None = None, progress: Progress | None = None,
               settle: bool = False) -> PackResult:
    """Write the layer directory ``src_dir`` as a tar (gzip-compressed when ``compress``) to ``out``.

    Returns the diff_id (sha256 of the plain tar) and, when compressing, the digest and size of the
    compressed stream. ``out`` may be None to compute the diff_id only.
    ``settle``: also make ``src_dir`` what unpacking the tar would give, entry by entry, so that it
    can become the stored layer's directory (:mod:`lamina.store.layer_settle`); only for a
    directory nothing else writes any more.
    Error handling: a redirected directory raises :class:`LayerError`; I/O errors propagate (a
    directory being settled is then half settled: the caller discards it).
    """
    if not src_dir.is_dir():
        raise LayerError(f"layer directory {src_dir} does not exist")
    idmap = idmap or IdMap.for_current_user()
    # Each HashingWriter hashes every byte again: a fresh one handed in (a blob writer) is reused,
    # and an uncompressed tar is hashed once, as both the blob and the diff_id.
    blob = out if isinstance(out, HashingWriter) and out.size == 0 else HashingWriter(out)
    gz: BinaryIO | None = None
    if compress:
        gz = gzip_writer(blob)
        plain = HashingWriter(gz)
    else:
        plain = blob
    try:
        tar = _TarStream(plain)
        try:
            settler = Settler() if settle else None
            packer = _Packer(tar, idmap, progress, settler)
            with fdtree.opened(fdtree.open_root(src_dir)) as root_fd:
                opaque = ondisk.is_opaque_dir(root_fd)
                if opaque:
                    tar.addfile(packer._header(ondisk.OPAQUE_MARKER, tarfile.REGTYPE, None, None))
                packer.pack_tree(root_fd)
                if settler is not None:
                    settler.finish_root(root_fd, opaque)
        finally:
            tar.close()
    finally:
        if gz is not None:
            gz.close()
    return PackResult(diff_id=plain.digest, tar_size=plain.size,
                      digest=blob.digest if compress else None,
                      compressed_size=blob.size if compress else None, content_size=packer.content_size)
