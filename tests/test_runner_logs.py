"""``lamina logs``: the container's log format (docker's json-file), and the verb through the CLI.

The first half is pure: records written and read back on ``tmp_path``, line cutting, ``--tail`` and
the time forms of ``--since``. The second half runs real containers, as root on the union mount:
each stream replayed on its own descriptor, their order, binary output, ``--tail``, ``-t``,
``--since``, ``-f`` ending when the container exits, and a ``-t`` (pty) container.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT, fuse_mounts_under
from lamina.errors import UsageError
from lamina.commands.containers import log_time_ns
from runner.containerlog import (
    STDERR,
    STDOUT,
    LogReader,
    LogRecord,
    LogWriter,
    decode_records,
    encode_record,
    format_timestamp,
    last_lines,
    split_lines,
    timestamp_ns,
)
from runner_support import on_pty

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND + 123_456_789  # 2023-11-14T22:13:20.123456789Z


# --- the log format ------------------------------------------------------------------------------


def test_record_is_docker_json_file_line() -> None:
    line = encode_record(LogRecord(STDERR, T0, b"err\n"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"log": "err\n", "stream": "stderr", "time": "2023-11-14T22:13:20.123456789Z"}


def test_binary_output_round_trips_byte_exact() -> None:
    every_byte = bytes(range(256))
    text = "é😀\n".encode()
    # A read may cut a UTF-8 sequence in two: each half is escaped on its own and comes back whole.
    chunks = [every_byte, text[:2], text[2:4], text[4:], b"\xed\xa0\x80 surrogate\r\n", b"\n\n"]
    data = b"".join(encode_record(LogRecord(STDOUT, T0 + i, chunk)) for i, chunk in enumerate(chunks))
    assert data.isascii()
    records, used = decode_records(data)
    assert used == len(data)
    assert [r.data for r in records] == chunks
    assert b"".join(r.data for r in records) == b"".join(chunks)


def test_decode_leaves_an_unfinished_line_and_skips_what_is_not_a_record() -> None:
    first = encode_record(LogRecord(STDOUT, T0, b"a\n"))
    second = encode_record(LogRecord(STDERR, T0 + 1, b"b\n"))
    garbage = b'{"log": "x", "stream": "stdin", "time": "2023-11-14T22:13:20Z"}\n[1]\nnot json\n{"log": 1}\n'
    records, used = decode_records(first + garbage + second + second[:10])
    assert [(r.stream, r.data) for r in records] == [(STDOUT, b"a\n"), (STDERR, b"b\n")]
    assert used == len(first + garbage + second)


def test_writer_and_reader_follow_a_growing_log(tmp_path: Path) -> None:
    path = tmp_path / "container-json.log"
    reader = LogReader(path)
    try:
        assert reader.read() == []  # not there yet
        writer = LogWriter(path)
        writer.write(STDOUT, b"one\n")
        writer.write(STDERR, b"")  # nothing to record
        writer.write(STDERR, b"two")
        first = reader.read()
        assert [(r.stream, r.data) for r in first] == [(STDOUT, b"one\n"), (STDERR, b"two")]
        assert first[0].time_ns <= first[1].time_ns
        # Half a record on disk (a write in progress) is left for the next read.
        line = encode_record(LogRecord(STDOUT, T0, b"three\n"))
        with open(path, "ab") as f:
            f.write(line[:7])
            f.flush()
            assert reader.read() == []
            f.write(line[7:])
        assert [r.data for r in reader.read()] == [b"three\n"]
        writer.close()
        writer.close()  # idempotent
    finally:
        reader.close()


def test_reader_takes_a_long_log_a_slice_at_a_time(tmp_path: Path) -> None:
    """A container decides how big its log grows: no read holds more than a slice of it, and a line
    longer than any record the monitor writes is skipped, not accumulated."""
    path = tmp_path / "container-json.log"
    records = [encode_record(LogRecord(STDOUT, T0 + i, b"line %d\n" % i)) for i in range(500)]
    with open(path, "wb") as f:
        f.write(b"".join(records[:250]))
        f.write(b"x" * (3 << 20) + b"\n")  # not a record, and longer than any record
        f.write(b"".join(records[250:]))
    chunk = 4096
    reader = LogReader(path, chunk_bytes=chunk)
    try:
        slices = list(reader.read_all())
    finally:
        reader.close()
    assert [r.data for s in slices for r in s] == [b"line %d\n" % i for i in range(500)]
    assert max(sum(len(encode_record(r)) for r in s) for s in slices) <= 2 * chunk


def test_log_writer_leaves_no_descriptor_open(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    writer = LogWriter(tmp_path / "log")
    writer.write(STDOUT, b"x")
    writer.close()
    reader = LogReader(tmp_path / "log")
    assert [r.data for r in reader.read()] == [b"x"]
    reader.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_writer_ends_a_record_torn_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "container-json.log"
    path.write_bytes(encode_record(LogRecord(STDOUT, T0, b"kept\n")) + b'{"log": "cut sho')
    writer = LogWriter(path)
    writer.write(STDOUT, b"after\n")
    writer.close()
    records, _ = decode_records(path.read_bytes())
    assert [r.data for r in records] == [b"kept\n", b"after\n"]


@pytest.mark.allow_log("cannot write to the container's log /dev/full")
def test_writer_drops_what_it_cannot_write_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    # The monitor must keep draining the container's pipes when the disk is full.
    writer = LogWriter(Path("/dev/full"))
    for _ in range(3):
        writer.write(STDOUT, b"lost\n")
    writer.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()


def test_writer_open_failure_is_one_readable_error(tmp_path: Path) -> None:
    from lamina.errors import ContainerError

    with pytest.raises(ContainerError, match="cannot open the container's log"):
        LogWriter(tmp_path / "no-such-dir" / "container-json.log")


def test_timestamps_are_docker_rfc3339_nano_fixed() -> None:
    assert format_timestamp(T0) == "2023-11-14T22:13:20.123456789Z"
    assert format_timestamp(1_700_000_000 * SECOND) == "2023-11-14T22:13:20.000000000Z"
    assert timestamp_ns(format_timestamp(T0)) == T0
    assert timestamp_ns("2023-11-14T22:13:20.5Z") == 1_700_000_000 * SECOND + SECOND // 2
    assert timestamp_ns("2023-11-15T00:13:20+02:00") == 1_700_000_000 * SECOND
    assert timestamp_ns("2023-11-14T22:13:20-01:30") == (1_700_000_000 + 5400) * SECOND
    assert timestamp_ns("2023-11-14") == int(dt.datetime(2023, 11, 14).timestamp()) * SECOND  # local time
    assert timestamp_ns("2023-11-14T22:13") == int(dt.datetime(2023, 11, 14, 22, 13).timestamp()) * SECOND
    for bad in ("2023-11-14T22:13:20.1234567891Z", "yesterday", "2023-11-14 22:13:20", ""):
        with pytest.raises(ValueError):
            timestamp_ns(bad)


def test_since_and_until_take_docker_time_forms() -> None:
    now = T0
    assert log_time_ns("--since", "10m", now) == now - 600 * SECOND
    assert log_time_ns("--since", "1h30m", now) == now - 5400 * SECOND
    assert log_time_ns("--since", "1.5s", now) == now - 3 * SECOND // 2
    assert log_time_ns("--since", "250ms", now) == now - SECOND // 4
    assert log_time_ns("--until", "-5s", now) == now + 5 * SECOND  # a negative duration is ahead
    assert log_time_ns("--since", "1700000000", now) == 1_700_000_000 * SECOND
    assert log_time_ns("--since", "1700000000.25", now) == 1_700_000_000 * SECOND + SECOND // 4
    assert log_time_ns("--since", "0", now) == 0  # docker: "0" is the epoch, not a zero duration
    assert log_time_ns("--since", "2023-11-14T22:13:20.123456789Z", now) == T0
    for bad in ("soon", "10x", "1.2.3", "-1700000000", "10 m"):
        with pytest.raises(UsageError, match="--since"):
            log_time_ns("--since", bad, now)


def _records(*chunks: tuple[str, bytes]) -> list[LogRecord]:
    return [LogRecord(stream, T0 + i * SECOND, data) for i, (stream, data) in enumerate(chunks)]


def test_split_lines_keeps_order_and_continues_lines_per_stream() -> None:
    records = _records((STDOUT, b"a1\na2"), (STDERR, b"e1\n"), (STDOUT, b" more\na3\n"))
    lines = split_lines(records)
    assert [(line.stream, line.data, line.continues) for line in lines] == [
        (STDOUT, b"a1\n", False), (STDOUT, b"a2", False), (STDERR, b"e1\n", False),
        (STDOUT, b" more\n", True), (STDOUT, b"a3\n", False)]
    # A line's pieces share the time it began (docker's entry time, printed by -t).
    assert lines[3].time_ns == lines[1].time_ns == T0
    assert lines[4].time_ns == T0 + 2 * SECOND


def test_split_lines_carries_open_lines_across_calls() -> None:
    open_lines: dict[str, int] = {}
    first = split_lines(_records((STDOUT, b"par")), open_lines)
    assert open_lines == {STDOUT: T0}
    later = split_lines([LogRecord(STDOUT, T0 + SECOND, b"tial\n")], open_lines)
    assert [(line.data, line.continues, line.time_ns) for line in first + later] == [
        (b"par", False, T0), (b"tial\n", True, T0)]
    assert open_lines == {}


def test_last_lines_counts_lines_across_streams() -> None:
    lines = split_lines(_records((STDOUT, b"1\n2\n"), (STDERR, b"e\n"), (STDOUT, b"3\n")))
    assert [line.data for line in last_lines(lines, 2)] == [b"e\n", b"3\n"]
    assert [line.data for line in last_lines(lines, 1)] == [b"3\n"]
    assert last_lines(lines, 0) == []
    assert last_lines(lines, 4) == lines == last_lines(lines, 100)
    assert last_lines([], 3) == []


def test_last_lines_drops_the_rest_of_a_line_begun_before_the_cut() -> None:
    lines = split_lines(_records((STDOUT, b"out\nbin"), (STDERR, b"err\n"), (STDOUT, b"late\n"), (STDOUT, b"x\n")))
    # Lines by where they begin: out, binlate, err, x. The last two are err and x.
    assert [(line.stream, line.data) for line in last_lines(lines, 2)] == [(STDERR, b"err\n"), (STDOUT, b"x\n")]
    assert [line.data for line in last_lines(lines, 3)] == [b"bin", b"err\n", b"late\n", b"x\n"]


# --- through the command line ----------------------------------------------------------------------

Lamina = Callable[..., "subprocess.CompletedProcess[bytes]"]
IMAGE = "lamina/busybox"
TIMESTAMP = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z "


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner-logs") / "root"


def _argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


@pytest.fixture
def lamina(module_root: Path) -> Iterator[Lamina]:
    """``lamina(*args)`` on the module's store, output as bytes (binary output must survive);
    ``merged=True`` sends stderr into stdout, to see the order across streams. Removes containers."""

    def run(*args: str, merged: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(_argv(module_root, *args), stdout=subprocess.PIPE, timeout=timeout,
                                stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                                stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        assert b"Traceback" not in (result.stderr or b"") + result.stdout, result
        return result

    yield run
    ids = run("ps", "-aq").stdout.decode().split()
    if ids:
        run("rm", "-f", *ids)
    assert fuse_mounts_under(module_root) == []


def _run_to_end(lamina: Lamina, name: str, *command: str, flags: tuple[str, ...] = ()) -> None:
    assert lamina("run", "-d", "--name", name, *flags, IMAGE, *command).returncode == 0
    assert lamina("wait", name).stdout == b"0\n"


def _container_dir(root: Path, name: str) -> Path:
    for path in (root / "containers").glob("*/container.json"):
        if json.loads(path.read_text())["name"] == name:
            return path.parent
    raise AssertionError(f"no container {name}")


@pytest.mark.root
@pytest.mark.fuse
def test_detached_streams_on_their_own_fds_in_order_byte_exact(lamina: Lamina, module_root: Path) -> None:
    # The sleeps let the monitor read each write before the next one: that is the order it records.
    script = ("echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; printf '\\377\\000bin\\n'; sleep 0.3;"
              "printf 'no newline' >&2")
    _run_to_end(lamina, "streams", "sh", "-c", script)
    logs = lamina("logs", "streams")
    assert logs.returncode == 0
    assert logs.stdout == b"out1\n\xff\x00bin\n"
    assert logs.stderr == b"err1\nno newline"
    merged = lamina("logs", "streams", merged=True)
    assert merged.stdout == b"out1\nerr1\n\xff\x00bin\nno newline"
    # The log is docker's json-file format, and the container never had the file itself.
    directory = _container_dir(module_root, "streams")
    entries = [json.loads(line) for line in (directory / "container-json.log").read_bytes().splitlines()]
    assert [e["stream"] for e in entries] == ["stdout", "stderr", "stdout", "stderr"]
    assert not (directory / "container.log").exists()


@pytest.mark.root
@pytest.mark.fuse
def test_foreground_run_prints_live_and_keeps_both_streams(lamina: Lamina) -> None:
    r = lamina("run", "--name", "fg", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    logs = lamina("logs", "fg")
    assert (logs.stdout, logs.stderr) == (b"out\n", b"err\n")


@pytest.mark.root
@pytest.mark.fuse
def test_tail_timestamps_since_until(lamina: Lamina) -> None:
    _run_to_end(lamina, "lines", "sh", "-c", "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.3; done")
    assert lamina("logs", "--tail", "3", "lines", merged=True).stdout == b"e2\no3\ne3\n"
    tail = lamina("logs", "-n", "2", "lines")
    assert (tail.stdout, tail.stderr) == (b"o3\n", b"e3\n")
    assert lamina("logs", "--tail", "0", "lines", merged=True).stdout == b""
    everything = b"o1\ne1\no2\ne2\no3\ne3\n"
    for tail_all in ("all", "-1"):  # docker: "all" or a negative number means all
        assert lamina("logs", f"--tail={tail_all}", "lines", merged=True).stdout == everything
    # docker's daemon shows everything for a non-number too; lamina refuses it, as podman does (issue 13)
    junk = lamina("logs", "--tail=junk", "lines")
    assert (junk.returncode, junk.stdout) == (1, b"") and b"--tail 'junk'" in junk.stderr
    stamped = lamina("logs", "-t", "lines", merged=True).stdout.splitlines(keepends=True)
    assert [re.sub(TIMESTAMP, b"", line) for line in stamped] == everything.splitlines(keepends=True)
    assert all(re.match(TIMESTAMP, line) for line in stamped)
    times = [line.split(b" ")[0].decode() for line in stamped]
    assert times == sorted(times)
    # --since the time of o2 starts there; --until the time of e2 ends there.
    assert lamina("logs", "--since", times[2], "lines", merged=True).stdout == b"o2\ne2\no3\ne3\n"
    assert lamina("logs", "--until", times[3], "lines", merged=True).stdout == b"o1\ne1\no2\ne2\n"
    assert lamina("logs", "--since=-1h", "lines", merged=True).stdout == b""  # an hour from now
    assert lamina("logs", "--since", "1h", "--tail", "1", "-t", "lines", merged=True).stdout.endswith(b"Z e3\n")
    bad = lamina("logs", "--since", "whenever", "lines")
    assert bad.returncode == 1 and bad.stderr.startswith(b"lamina: error: --since whenever")


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.slow
def test_follow_streams_live_and_ends_when_the_container_exits(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "-d", "--name", "live", IMAGE, "sh", "-c",
                  "echo first; sleep 2; echo second >&2; sleep 2; echo third").returncode == 0
    follow = subprocess.Popen(_argv(module_root, "logs", "-f", "-t", "live"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()  # printed while the container still runs
        assert first.endswith(b" first\n")
        assert lamina("ps", "-q", "-f", "name=live").stdout.strip() != b""
        out, err = follow.communicate(timeout=30)  # returns once it exited
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0
    assert re.fullmatch(TIMESTAMP + b"third\n", out) and re.fullmatch(TIMESTAMP + b"second\n", err)
    assert b"Exited (0)" in lamina("ps", "-a", "-f", "name=live").stdout
    # Following a container that has exited prints its log and returns; so does one removed by --rm.
    assert lamina("logs", "-f", "live", timeout=20).stdout == b"first\nthird\n"
    assert lamina("run", "-d", "--rm", "--name", "gone", IMAGE, "sh", "-c", "sleep 2; echo bye").returncode == 0
    assert lamina("logs", "-f", "gone", timeout=30).stdout == b"bye\n"


@pytest.mark.root
@pytest.mark.fuse
def test_monitor_outlives_the_command_line_and_its_terminal(lamina: Lamina, module_root: Path) -> None:
    # run -d on a terminal that then hangs up: the monitor has its own session and keeps logging.
    argv = _argv(module_root, "run", "-d", "--name", "orphaned", IMAGE, "sh", "-c", "sleep 1; echo late; echo e >&2")
    with on_pty(argv, cwd=REPO_ROOT) as (proc, _master):
        assert proc.wait(timeout=60) == 0
    logs = lamina("logs", "-f", "orphaned", timeout=30)
    assert (logs.stdout, logs.stderr) == (b"late\n", b"e\n")
    assert lamina("wait", "orphaned").stdout == b"0\n"


@pytest.mark.root
@pytest.mark.fuse
def test_tty_container_has_one_stream_on_stdout(lamina: Lamina) -> None:
    _run_to_end(lamina, "tty", "sh", "-c", "echo out; echo err >&2", flags=("-t",))
    logs = lamina("logs", "tty")
    assert (logs.stdout, logs.stderr) == (b"out\r\nerr\r\n", b"")  # the pty's line discipline adds \r
    stamped = lamina("logs", "-t", "--tail", "1", "tty").stdout
    assert re.fullmatch(TIMESTAMP + b"err\r\n", stamped)
