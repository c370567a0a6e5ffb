"""A container's output log: ``container-json.log`` in its directory.

It is docker's json-file format: one JSON object a line,
``{"log": "...", "stream": "stdout", "time": "2024-05-01T12:00:00.123456789Z"}``, one line per chunk
as the monitor read it from the container's pipes (or its pty: one stream, logged as stdout), so
``logs`` can replay each stream on its own descriptor, in the order it arrived, and filter by time.
The bytes are decoded with ``surrogateescape`` and written with ASCII escapes, so output that is not
UTF-8 comes back byte for byte. A record is appended with one ``write`` on an ``O_APPEND``
descriptor; a reader that finds a last line without its newline leaves it for its next read. Older
lamina versions wrote plain bytes to ``container.log``; that file is not read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lamina.errors import ContainerError

log = logging.getLogger(__name__)


STDOUT = "stdout"
STDERR = "stderr"
_STREAMS = (STDOUT, STDERR)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)"
                      r"(?:T(\d\d)(?::(\d\d)(?::(\d\d)(?:\.(\d{1,9}))?)?)?)?"
                      r"(Z|[+-]\d\d:\d\d)?")
_LINE_PIECE = re.compile(rb"[^\n]*\n|[^\n]+")


def format_timestamp(time_ns: int) -> str:
    """RFC 3339 in UTC with nine fraction digits (docker's ``RFC3339NanoFixed``): the log's
    ``time`` field and the prefix ``logs --timestamps`` prints."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def timestamp_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 date or time (``2006-01-02``, ``2006-01-02T15:04``,
    ``...:05.999999999Z``, ``...+02:00``): the forms ``logs --since`` takes, as docker. Without a zone
    the time is local, as docker reads it. ValueError when ``text`` is none of these."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    when = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    if zone is None:
        when = when.astimezone()  # a naive datetime is taken as local time
    elif zone == "Z":
        when = when.replace(tzinfo=dt.UTC)
    else:
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
        when = when.replace(tzinfo=dt.timezone(offset))
    # Whole seconds through datetime, the fraction apart: datetime keeps microseconds only.
    return (when - _EPOCH) // dt.timedelta(seconds=1) * 1_000_000_000 + int((fraction or "0").ljust(9, "0"))


@dataclass(frozen=True)
class LogRecord:
    """One chunk of a container's output as its monitor read it."""

    stream: str  # STDOUT or STDERR
    time_ns: int  # when it was read, nanoseconds since the epoch
    data: bytes


def encode_record(record: LogRecord) -> bytes:
    """One line of the log (ASCII only, so a newline in it can only be its end)."""
    entry = {"log": record.data.decode("utf-8", "surrogateescape"), "stream": record.stream,
             "time": format_timestamp(record.time_ns)}
    return json.dumps(entry).encode("ascii") + b"\n"


def decode_records(data: bytes) -> tuple[list[LogRecord], int]:
    """The records in ``data`` and how many of its bytes they took. A last line without its newline
    is still being written: it is left for the next read. A line that is not a record (a write torn
    by a crash) is skipped."""
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].split(b"\n")[:-1]:
        try:
            entry = json.loads(line)
            stream = entry["stream"]
            if stream not in _STREAMS:
                raise ValueError(f"unknown stream {stream!r}")
            records.append(LogRecord(stream, timestamp_ns(entry["time"]),
                                     entry["log"].encode("utf-8", "surrogateescape")))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.debug("container log: skipping a line that is not a record (%s): %.80r", e, line)
    return records, end


class LogWriter:
    """Appends the records of one container's output to its log.

    Resource handling: owns one descriptor, opened close-on-exec (the sandbox never inherits it),
    closed by :meth:`close` (use ``contextlib.closing``).

    Error handling: the constructor raises ContainerError when the log cannot be opened. A record
    that cannot be written (disk full) is dropped with one warning: the monitor must keep draining
    the container's pipes, or the container would block on its own output.
    """

    def __init__(self, path: Path, max_size: int = 0, max_files: int = 1) -> None:
        """``max_size`` (bytes, 0 for no limit) and ``max_files``: docker's ``--log-opt max-size``
        and ``max-file``. A record that would take the log past ``max_size`` first rotates it:
        ``LOG`` becomes ``LOG.1`` (``LOG.1`` becomes ``LOG.2``..., the oldest beyond ``max_files``
        dropped), or, with one file, the log starts again empty."""
        self._path = path
        self._max_size = max_size
        self._max_files = max(1, max_files)
        self._warned = False
        self._open()

    def _open(self) -> None:
        path = self._path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ContainerError(f"cannot open the container's log {path}: {e.strerror}") from e
        # A record torn by a crash (or a full disk) would swallow the next one into its line: the
        # next write ends it first. (Hence O_RDWR: pread needs a readable descriptor.)
        self._size = os.fstat(self._fd).st_size
        self._torn = bool(self._size) and os.pread(self._fd, 1, self._size - 1) != b"\n"

    def _rotate(self) -> None:
        if self._max_files == 1:
            os.ftruncate(self._fd, 0)
            self._size, self._torn = 0, False
            return
        for index in range(self._max_files - 1, 0, -1):
            older = rotated_path(self._path, index)
            if index == 1:
                os.replace(self._path, older)
            elif rotated_path(self._path, index - 1).exists():
                os.replace(rotated_path(self._path, index - 1), older)
        os.close(self._fd)
        self._open()

    def write(self, stream: str, data: bytes) -> None:
        if self._max_size and data.count(b"\n") > 1:
            # A rotated log is cut between records: one a line, as docker's, so that a chunk of many
            # lines rotates line by line rather than as one record larger than max-size.
            when = time.time_ns()
            for piece in _LINE_PIECE.findall(data):
                self._write_record(LogRecord(stream, when, piece))
        elif data:
            self._write_record(LogRecord(stream, time.time_ns(), data))

    def _write_record(self, record: LogRecord) -> None:
        line = encode_record(record)
        if self._max_size and self._size and self._size + len(line) > self._max_size:
            try:
                self._rotate()
            except (OSError, ContainerError) as e:
                self._warn(f"cannot rotate it: {e}")
        if self._torn:
            line = b"\n" + line
        # One write, so a concurrent reader sees whole records (or a prefix it leaves for later).
        try:
            written = os.write(self._fd, line)
        except OSError as e:
            self._warn(e.strerror or str(e))
            return
        self._size += written
        self._torn = written < len(line)
        if self._torn:
            self._warn(f"short write, {written} of {len(line)} bytes")

    def _warn(self, reason: str) -> None:
        if not self._warned:
            log.warning("cannot write to the container's log %s (%s): output is dropped", self._path, reason)
            self._warned = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rotated_path(path: Path, index: int) -> Path:
    """docker's name for the ``index``-th older file of a rotated log (``container-json.log.1``)."""
    return path.with_name(f"{path.name}.{index}")


# How much of the log one read takes in: a container decides how big its log grows, so the log is
# read a slice at a time, never whole.
READ_CHUNK_BYTES = 1 << 20
# The longest line the monitor writes (a pipe read of 64 KiB, each byte escaped as up to 12 ASCII
# characters by json.dumps, plus the fields): a longer unfinished line is not a record.
MAX_RECORD_BYTES = 1 << 20


class LogReader:
    """Reads a container's log as it grows: each :meth:`read` returns records appended since the
    previous one (a log that does not exist yet has none), at most about :data:`READ_CHUNK_BYTES`
    of them, so memory stays bounded whatever the container wrote; :meth:`read_all` iterates over
    slices until the end of what is there now.

    Resource handling: owns the open file, closed by :meth:`close` (use ``contextlib.closing``).
    It stays readable when the container is removed meanwhile (``--rm``).
    """

    def __init__(self, path: Path, chunk_bytes: int = READ_CHUNK_BYTES) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._pending = b""
        self._chunk_bytes = chunk_bytes
        self.at_end = False  # the last read reached what the log held then
        # A rotated log (--log-opt max-file): its older files first, oldest first.
        self._reading_older = False
        self._older = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
                             key=lambda p: -int(p.suffix[1:]))

    def _open_next(self) -> bool:
        while self._older:
            try:
                self._file = open(self._older.pop(0), "rb")
                self._reading_older = True
                return True
            except FileNotFoundError:  # rotated away meanwhile
                continue
        try:
            self._file = open(self._path, "rb")
        except FileNotFoundError:
            return False
        self._reading_older = False
        return True

    def _rotated_under_us(self) -> bool:
        """The file read so far is no longer the log (the writer rotated it): move to the new one."""
        assert self._file is not None
        try:
            current = os.stat(self._path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._file.fileno())
        if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino) and not self._reading_older:
            if mine.st_size < self._file.tell():  # a one-file log started again (max-file=1)
                self._file.seek(0)
                self._pending = b""
                return True
            return False
        self._file.close()
        self._file = None
        return self._open_next()

    def read(self) -> list[LogRecord]:
        if self._file is None and not self._open_next():
            self.at_end = True
            return []
        assert self._file is not None
        data = self._file.read(self._chunk_bytes)
        # At the end of a file that is no longer the log (rotated): the next read goes on in the next.
        self.at_end = len(data) < self._chunk_bytes and not self._rotated_under_us()
        self._pending += data
        records, used = decode_records(self._pending)
        self._pending = self._pending[used:]
        if len(self._pending) > MAX_RECORD_BYTES:
            # Not something the monitor wrote: drop it up to the next line end.
            log.debug("container log: skipping an unfinished line of over %d bytes", MAX_RECORD_BYTES)
            self._pending = b""
            self._skip_to_line_end()
        return records

    def read_all(self) -> Iterator[list[LogRecord]]:
        """Slices of records until the end of what the log holds now."""
        while True:
            records = self.read()
            if records:
                yield records
            if self.at_end:
                return

    def _skip_to_line_end(self) -> None:
        assert self._file is not None
        while data := self._file.read(self._chunk_bytes):
            newline = data.find(b"\n")
            if newline >= 0:
                self._pending = data[newline + 1:]
                return

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class LogLine:
    """A line of one stream, or the piece of it that one record holds: docker's log entry, which
    ``--tail`` counts and ``--timestamps`` prefixes."""

    stream: str
    time_ns: int  # when the line began: a line's pieces share its time
    data: bytes
    continues: bool  # an earlier piece began this line


def split_lines(records: Iterable[LogRecord], open_lines: dict[str, int] | None = None) -> list[LogLine]:
    """Cut records at line ends, keeping their order across streams.

    ``open_lines`` maps a stream to the start time of its line not yet ended; it is updated in place,
    so that a follower reading the log in several calls continues lines across them.
    """
    open_lines = {} if open_lines is None else open_lines
    lines = []
    for record in records:
        for piece in _LINE_PIECE.findall(record.data):
            started = open_lines.pop(record.stream, None)
            time_ns = record.time_ns if started is None else started
            if not piece.endswith(b"\n"):
                open_lines[record.stream] = time_ns
            lines.append(LogLine(record.stream, time_ns, piece, continues=started is not None))
    return lines


def last_lines(lines: Sequence[LogLine], count: int) -> list[LogLine]:
    """The pieces of the last ``count`` lines (``logs --tail``), whichever stream they are on. Lines
    count where they begin: the rest of a line begun before the cut goes with its beginning."""
    starts = [i for i, line in enumerate(lines) if not line.continues]
    if count >= len(starts):
        return list(lines)
    if count <= 0:
        return []
    cut = starts[-count]
    last_before_cut = {line.stream: line.data for line in lines[:cut]}
    cut_off = {stream for stream, data in last_before_cut.items() if not data.endswith(b"\n")}
    kept = []
    for line in lines[cut:]:
        if line.continues and line.stream in cut_off:
            if line.data.endswith(b"\n"):
                cut_off.discard(line.stream)
            continue
        kept.append(line)
    return kept
