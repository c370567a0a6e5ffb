"""Containers on disk: ``ROOT/containers/<64-hex id>/container.json`` plus the container's files.

A container directory holds ``container.json`` (the record below, rewritten atomically), ``upper/``
and ``work/`` (its writable layer), ``init/`` (the bottom layer with mount points), ``hosts``,
``hostname``, ``resolv.conf``, ``merged/`` (the mount point, used only inside the container's mount
namespace), ``container-json.log`` (the container's output, below) and ``monitor.log`` (what a
daemonised monitor itself has to say: lamina's diagnostics, never the container's output).

The output log is docker's json-file format: one JSON object a line,
``{"log": "...", "stream": "stdout", "time": "2024-05-01T12:00:00.123456789Z"}``, one line per chunk
as the monitor read it from the container's pipes (or its pty: one stream, logged as stdout), so
``logs`` can replay each stream on its own descriptor, in the order it arrived, and filter by time.
The bytes are decoded with ``surrogateescape`` and written with ASCII escapes, so output that is not
UTF-8 comes back byte for byte. A record is appended with one ``write`` on an ``O_APPEND``
descriptor; a reader that finds a last line without its newline leaves it for its next read. Older
lamina versions wrote plain bytes to ``container.log``; that file is not read.

A running container is served by one *monitor* process (the foreground ``lamina run``, or the
daemonised one of ``run -d``/``start``), whose pid and start time are recorded. When the monitor is
gone but the record still says running, lamina crashed or was killed: :func:`refresh` marks such a
container exited (code 255) the next time any command looks at it. Its namespaces, and with them
its union mount, died with the monitor (parent-death signals), so nothing stays mounted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lamina.errors import ContainerError, ContainerNotFound, UsageError

log = logging.getLogger(__name__)

STATUS_CREATED = "created"
STATUS_RUNNING = "running"
STATUS_EXITED = "exited"
CRASH_EXIT_CODE = 255

_ADJECTIVES = ("brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry",
               "nifty", "proud", "quirky", "sharp", "tender", "upbeat", "vivid", "witty", "zealous", "bold")
_NAMES = ("curie", "darwin", "euler", "fermi", "gauss", "hopper", "kepler", "lovelace", "noether",
          "pascal", "ritchie", "shannon", "thompson", "turing", "wozniak", "yalow", "knuth", "lamport")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a live monitor from a recycled pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return fields[19]


@dataclass
class ContainerState:
    status: str = STATUS_CREATED
    pid: int = 0  # the container's init, as seen on the host
    monitor_pid: int = 0
    monitor_start: str = ""
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    error: str = ""


@dataclass
class Container:
    id: str
    name: str
    image: str
    image_id: str
    created: str
    argv: list[str]
    env: dict[str, str]
    workdir: str = "/"
    user: str = "0"
    hostname: str = ""
    network: str = "slirp"
    ports: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    anonymous_volumes: list[str] = field(default_factory=list)
    tty: bool = False
    interactive: bool = False
    init: bool = False
    readonly: bool = False
    auto_remove: bool = False
    stop_signal: int = 15
    seccomp: bool = True
    state: ContainerState = field(default_factory=ContainerState)
    directory: Path = field(default=Path("."), compare=False)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def upper(self) -> Path:
        return self.directory / "upper"

    @property
    def work(self) -> Path:
        return self.directory / "work"

    @property
    def log_path(self) -> Path:
        return self.directory / "container-json.log"

    @property
    def monitor_log_path(self) -> Path:
        return self.directory / "monitor.log"

    @property
    def running(self) -> bool:
        return self.state.status == STATUS_RUNNING

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> Container:
        state = ContainerState(**data.pop("state", {}))
        known = {f for f in cls.__dataclass_fields__ if f not in ("state", "directory")}
        return cls(**{k: v for k, v in data.items() if k in known}, state=state, directory=directory)

    def save(self) -> None:
        path = self.directory / "container.json"
        tmp = self.directory / f".container.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    def monitor_alive(self) -> bool:
        if not self.state.monitor_pid:
            return False
        return process_start_time(self.state.monitor_pid) == self.state.monitor_start


class ContainerStore:
    """The containers under ``ROOT/containers``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "containers"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load(self, directory: Path) -> Container | None:
        try:
            data = json.loads((directory / "container.json").read_text())
            return Container.from_json(data, directory)
        except (OSError, ValueError, TypeError) as e:
            log.debug("skipping %s: %s", directory, e)
            return None

    def all(self) -> list[Container]:
        if not self.dir.is_dir():
            return []
        containers = []
        for entry in sorted(self.dir.iterdir()):
            if entry.is_dir() and len(entry.name) == 64:
                c = self._load(entry)
                if c is not None:
                    containers.append(refresh(c))
        containers.sort(key=lambda c: c.created, reverse=True)
        return containers

    def get(self, name_or_id: str) -> Container:
        """By exact name, full id, or unique id prefix; ContainerNotFound otherwise."""
        if not name_or_id:
            raise ContainerNotFound(name_or_id)
        containers = self.all()
        for c in containers:
            if c.name == name_or_id or c.id == name_or_id:
                return c
        matches = [c for c in containers if c.id.startswith(name_or_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"container id prefix {name_or_id!r} is ambiguous")
        raise ContainerNotFound(name_or_id)

    def create(self, container: Container) -> Container:
        """Give ``container`` an id (and a name when it has none) and its directory."""
        with self.lock():
            names = {c.name for c in self.all()}
            if container.name:
                if container.name in names:
                    raise UsageError(f'--name: the container name "{container.name}" is already in use')
            else:
                while True:
                    container.name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}"
                    if container.name not in names:
                        break
            container.id = secrets.token_hex(32)
            container.directory = self.dir / container.id
            container.directory.mkdir(parents=True)
            for sub in ("upper", "work", "merged"):
                (container.directory / sub).mkdir()
            container.hostname = container.hostname or container.id[:12]
            container.save()
        return container

    def remove_directory(self, container: Container) -> None:
        from runner.sandbox import call_in_userns

        try:
            shutil.rmtree(container.directory)
        except OSError:
            # Files the container made may belong to subordinate ids: delete them as namespace root.
            call_in_userns(shutil.rmtree, container.directory, True)
            if container.directory.exists():
                shutil.rmtree(container.directory, ignore_errors=True)


def _unmount_stale(mountpoint: Path) -> None:
    """The union is mounted inside the container's namespaces and dies with them; a mount visible
    here was left by something else (an older lamina, ``lamina mount`` of the container): drop it."""
    if os.path.ismount(mountpoint):
        import subprocess

        log.info("unmounting stale %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def refresh(container: Container) -> Container:
    """Mark a container whose monitor died as exited (see the module docstring)."""
    if container.state.status == STATUS_RUNNING and not container.monitor_alive():
        fresh = None
        try:
            data = json.loads((container.directory / "container.json").read_text())
            fresh = Container.from_json(data, container.directory)
        except (OSError, ValueError, TypeError):
            pass
        if fresh is not None and fresh.state.status != STATUS_RUNNING:
            return fresh
        log.info("container %s: its monitor is gone, marking it exited", container.short_id)
        _unmount_stale(container.directory / "merged")
        container.state.status = STATUS_EXITED
        container.state.exit_code = CRASH_EXIT_CODE
        container.state.finished_at = now()
        container.state.pid = 0
        with contextlib.suppress(OSError):
            container.save()
    return container


def inspect_container(root: Path, name: str) -> dict[str, Any]:
    """``lamina inspect CONTAINER``: docker's field names for the record (``{{.State.Pid}}`` etc.)."""
    c = ContainerStore(root).get(name)
    return {
        "Id": c.id,
        "Name": "/" + c.name,
        "Created": c.created,
        "Image": "sha256:" + c.image_id,
        "Path": c.argv[0] if c.argv else "",
        "Args": c.argv[1:],
        "State": {"Status": c.state.status, "Running": c.running, "Pid": c.state.pid,
                  "ExitCode": c.state.exit_code if c.state.exit_code is not None else 0,
                  "Error": c.state.error, "StartedAt": c.state.started_at, "FinishedAt": c.state.finished_at},
        "Config": {"Hostname": c.hostname, "User": c.user, "Env": [f"{k}={v}" for k, v in c.env.items()],
                   "Cmd": c.argv, "Image": c.image, "WorkingDir": c.workdir, "Tty": c.tty,
                   "OpenStdin": c.interactive, "StopSignal": c.stop_signal},
        "HostConfig": {"NetworkMode": c.network, "ReadonlyRootfs": c.readonly, "AutoRemove": c.auto_remove,
                       "Init": c.init,
                       "PortBindings": {f"{p['container_port']}/{p['proto']}":
                                        [{"HostIp": p["host_ip"], "HostPort": str(p["host_port"])}]
                                        for p in c.ports}},
        "Mounts": [{"Type": m.get("kind", "bind"), "Source": m.get("source"), "Destination": m["target"],
                    "RW": not m.get("readonly")} for m in c.mounts],
        "GraphDriver": {"Name": "lamina-unionfs", "Data": {"UpperDir": str(c.upper), "WorkDir": str(c.work)}},
    }


# --- the container's output log (docker's json-file format, see the module docstring) -----------------

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

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ContainerError(f"cannot open the container's log {path}: {e.strerror}") from e
        self._path = path
        self._warned = False
        # A record torn by a crash (or a full disk) would swallow the next one into its line: the
        # next write ends it first. (Hence O_RDWR: pread needs a readable descriptor.)
        size = os.fstat(self._fd).st_size
        self._torn = bool(size) and os.pread(self._fd, 1, size - 1) != b"\n"

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        line = encode_record(LogRecord(stream, time.time_ns(), data))
        if self._torn:
            line = b"\n" + line
        # One write, so a concurrent reader sees whole records (or a prefix it leaves for later).
        try:
            written = os.write(self._fd, line)
        except OSError as e:
            self._warn(e.strerror or str(e))
            return
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


class LogReader:
    """Reads a container's log as it grows: each :meth:`read` returns the records appended since the
    previous one (a log that does not exist yet has none).

    Resource handling: owns the open file, closed by :meth:`close` (use ``contextlib.closing``).
    It stays readable when the container is removed meanwhile (``--rm``).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._pending = b""

    def read(self) -> list[LogRecord]:
        if self._file is None:
            try:
                self._file = open(self._path, "rb")
            except FileNotFoundError:
                return []
        self._pending += self._file.read()
        records, used = decode_records(self._pending)
        self._pending = self._pending[used:]
        return records

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
