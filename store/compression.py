"""Detect and undo the compressions found on layer tars and image archives (gzip, zstd, xz, bzip2)."""

from __future__ import annotations

import bz2
import gzip
import lzma
from typing import Any, BinaryIO

import zstandard

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
