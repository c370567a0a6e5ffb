"""Reading input whose size someone else controls: always with a limit, and streamed.

Every file, member or response that a user, an image, an archive or a registry can make as large
as it likes goes through these helpers, so that ``/dev/zero`` or a sparse 512 MiB ``/etc/passwd``
costs at most the limit in memory and time, and the user sees one line naming the input and the
limit (exit 125). The limits follow what docker and containers/image accept:

* ``LINE_LIMIT`` (64 KiB): docker reads env files and Dockerfiles with Go's ``bufio.Scanner``,
  whose longest line is 64 KiB (``bufio.MaxScanTokenSize``);
* ``JSON_LIMIT`` (4 MiB): containers/image's ``iolimits.MaxManifestBodySize`` and
  ``MaxConfigBodySize``; ``ARCHIVE_MANIFEST_LIMIT`` (1 MiB) its ``MaxTarFileManifestSize`` for a
  ``docker save`` manifest.json;
* ``TEXT_LIMIT`` (16 MiB): Dockerfiles, ``.dockerignore``, env files and an image's user and group
  databases, far beyond any real one (BuildKit passes the Dockerfile in one 16 MiB gRPC message).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from lamina.errors import LaminaError

LINE_LIMIT = 64 << 10
JSON_LIMIT = 4 << 20
ARCHIVE_MANIFEST_LIMIT = 1 << 20
TEXT_LIMIT = 16 << 20


def describe_size(limit: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if limit >= 1 << shift and limit % (1 << shift) == 0:
            return f"{limit >> shift} {unit}"
    return f"{limit} bytes"


class InputTooLarge(LaminaError):
    """An input is larger than lamina accepts; the message names it and the limit."""

    def __init__(self, what: str, limit: int, unit: str = "") -> None:
        super().__init__(f"{what}: {unit or 'input'} larger than the limit of {describe_size(limit)}")
        self.limit = limit


def read_at_most(stream: IO[bytes], limit: int, what: str) -> bytes:
    """All of ``stream`` if it holds at most ``limit`` bytes; else InputTooLarge naming ``what``."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(1 << 20, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise InputTooLarge(what, limit)


def read_file_at_most(path: str, limit: int, what: str | None = None) -> bytes:
    """The content of the file ``path``, refused beyond ``limit`` bytes. OSError as open raises it."""
    with open(path, "rb") as f:
        return read_at_most(f, limit, what or path)


def bounded_lines(stream: IO[bytes], what: str, line_limit: int = LINE_LIMIT,
                  total_limit: int = TEXT_LIMIT) -> Iterator[bytes]:
    """The lines of ``stream`` (without their end of line), one at a time, each at most ``line_limit``
    bytes and all together at most ``total_limit``: memory stays at one line whatever the input."""
    total = 0
    number = 0
    while True:
        line = stream.readline(line_limit + 1)
        if not line:
            return
        number += 1
        total += len(line)
        if total > total_limit:
            raise InputTooLarge(what, total_limit)
        if len(line) > line_limit and not (len(line) == line_limit + 1 and line.endswith(b"\n")):
            raise InputTooLarge(f"{what}:{number}", line_limit, "line")
        yield line.rstrip(b"\n").removesuffix(b"\r")
