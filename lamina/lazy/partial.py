"""A layer blob being filled piece by piece: a sparse file and a log of the byte ranges it holds.

``DIR/HEX.partial`` has the blob's bytes at their offsets (holes where nothing came yet);
``DIR/HEX.ranges`` is an append-only log of ``START END`` lines, each appended (one ``write`` with
``O_APPEND``, atomic between processes) only after its bytes were written. Several processes may
fill the same blob at once (two containers of one lazy image): they write the same bytes at the
same offsets, and the log only ever grows.

Trust: nothing here is trusted. The pieces come from verified chunks and TOCs, but the blob enters
the store only once the store has hashed the whole file against the blob's digest
(:func:`lamina.lazy.fill.finish`); a blob that does not match (a crash lost bytes the log names, a disk that lied) is
discarded and filled again from scratch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# The log of a blob is a few lines per fetched range; a bigger one is not ours.
MAX_LOG_BYTES = 64 << 20


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering the same bytes as ``ranges`` (adjacent ones joined)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def gaps(present: list[tuple[int, int]], size: int, piece: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, size)`` not in ``present`` (merged), cut into pieces of at most ``piece``."""
    missing: list[tuple[int, int]] = []
    position = 0
    for start, end in [*present, (size, size)]:
        start = min(start, size)
        while position < start:
            missing.append((position, min(start, position + piece)))
            position = missing[-1][1]
        position = max(position, end)
    return missing


class PartialBlob:
    """The partial copy of blob ``digest`` in ``directory``."""

    def __init__(self, directory: Path, digest: str) -> None:
        hex_digest = digest.removeprefix("sha256:")
        self.digest = digest
        self.directory = directory
        self.data_path = directory / f"{hex_digest}.partial"
        self.log_path = directory / f"{hex_digest}.ranges"

    def write(self, start: int, data: bytes) -> None:
        """Keep ``data`` at ``start``; a full disk only costs the fill its head start."""
        if not data:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{start} {start + len(data)}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:
            log.info("cannot keep bytes %d+%d of blob %s: %s", start, len(data), self.digest[7:19], e)

    def present(self) -> list[tuple[int, int]]:
        """The ranges the log names, merged (none when there is no log, or it is not ours)."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read(MAX_LOG_BYTES + 1)
        except FileNotFoundError:
            return []
        if len(text) > MAX_LOG_BYTES:
            log.warning("%s is more than %d bytes: ignored", self.log_path, MAX_LOG_BYTES)
            return []
        ranges = []
        for line in text.decode("ascii", "replace").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[0]) < int(fields[1]):
                ranges.append((int(fields[0]), int(fields[1])))
        return merge(ranges)

    def present_bytes(self) -> int:
        return sum(end - start for start, end in self.present())

    def missing(self, size: int, piece: int) -> list[tuple[int, int]]:
        return gaps(self.present(), size, piece)

    def take(self, size: int, destination: Path) -> bool:
        """Move the blob's file to ``destination`` when every byte is here (False otherwise); the
        log goes. The caller verifies the digest (the store does, as it adopts the file)."""
        if self.missing(size, size or 1):
            return False
        try:
            if os.stat(self.data_path).st_size != size:
                self.discard()
                return False
            os.replace(self.data_path, destination)
        except FileNotFoundError:
            self.discard()
            return False
        self.discard()
        return True

    def discard(self) -> None:
        for path in (self.log_path, self.data_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
