"""Detect and undo the compressions found on layer tars and image archives (gzip, zstd, xz, bzip2)."""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from lamina.bounded import describe_size
from lamina.errors import FormatError, StoreError
from lamina.store.blobs import CHUNK

_MAGIC = [
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
]


def detect(head: bytes) -> str | None:
    """The compression whose magic number starts ``head``; None for anything else (plain tar)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


class _Prefixed:
    """A read-only stream that first returns ``head`` (already read for sniffing), then ``rest``."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._rest.read(n - len(data))
            return data
        return self._rest.read(n)

    def readable(self) -> bool:
        return True


def open_decompressed(stream: BinaryIO) -> tuple[Any, str | None]:
    """Wrap ``stream`` so reads return the uncompressed bytes; also return the compression found.

    Resource handling: the caller keeps owning ``stream``; the wrapper holds no other resource.
    """
    head = stream.read(6)
    kind = detect(head)
    src: Any = _Prefixed(head, stream)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=src, mode="rb"), kind
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True), kind
    if kind == "xz":
        return lzma.LZMAFile(src), kind
    if kind == "bzip2":
        return bz2.BZ2File(src), kind
    return src, None


# --- decompressing into the store, within a size limit and the free space -----------------------


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (named in "no space left" messages)."""
    path = path.absolute()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_reserve(path: Path) -> int:
    """Free space a decompression leaves to others: 2% of the filesystem, at most 256 MiB."""
    st = os.statvfs(path)
    return min(256 << 20, st.f_blocks * st.f_frsize // 50)


def gzip_size_hint(f: BinaryIO) -> int:
    """The uncompressed size a gzip stream records in its last 4 bytes (modulo 4 GiB): a hint only."""
    here = f.tell()
    try:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")
    except OSError:
        return 0
    finally:
        f.seek(here)


class UnbufferedOutput:
    """A new file written straight to its descriptor. A failed write (ENOSPC) raises there, once,
    and closing cannot fail: a buffered file's close() flushes again, raises again, and may keep
    the descriptor (and the space of a file already unlinked) until the process exits."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> UnbufferedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoSpace(StoreError):
    """The filesystem of the store is (nearly) full; the message names it and what was loading."""

    def __init__(self, directory: Path, what: str, doing: str = "loading") -> None:
        super().__init__(f"no space left on {mount_point(directory)} while {doing} {what}")


def decompress_file(source: BinaryIO, out_path: Path, limit: int, what: str,
                    progress: Callable[[int], None] | None = None) -> int:
    """Write the decompressed bytes of ``source`` to the new file ``out_path``; return their count.

    Refused (FormatError) beyond ``limit`` bytes or when the data is corrupt; :class:`NoSpace` when
    the free space of ``out_path``'s filesystem would fall below its reserve (checked before, from
    gzip's size hint, and every 16 MiB) or a write fails with ENOSPC. The caller removes
    ``out_path`` on failure.
    """
    directory = out_path.parent
    reserve = space_reserve(directory)
    stream, kind = open_decompressed(source)
    hint = gzip_size_hint(source) if kind == "gzip" else 0
    if hint and hint + reserve > free_bytes(directory):
        raise NoSpace(directory, what)
    written = 0
    next_check = 16 << 20
    with UnbufferedOutput(out_path) as out:
        while True:
            try:
                chunk = stream.read(CHUNK)
            except (OSError, EOFError, ValueError, zstandard.ZstdError) as e:
                raise FormatError(f"{what}: corrupt {kind} data: {e}") from None
            if not chunk:
                return written
            written += len(chunk)
            if written > limit:
                raise FormatError(f"{what}: decompresses to more than {describe_size(limit)} "
                                  "(set LAMINA_MAX_LAYER_BYTES to allow more)")
            if written >= next_check:
                next_check += 16 << 20
                if free_bytes(directory) < reserve + CHUNK:
                    raise NoSpace(directory, what)
            try:
                out.write(chunk)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(directory, what) from None
                raise
            if progress is not None:
                progress(len(chunk))
