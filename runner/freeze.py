"""Holding a running container still: while lamina reads its files (``commit``'s ``--pause``), and
from ``pause`` to ``unpause``.

docker pauses a container during ``commit`` by default, so the layer is one consistent snapshot and
the processes inside cannot rearrange the upper directory under the reader. Here: when the
container's processes are alone in a cgroup v2 that the user may freeze (a delegated cgroup), that
cgroup is frozen, as docker and podman do; otherwise, since lamina's containers share their
monitor's cgroup, every process of the container gets SIGSTOP, and SIGCONT afterwards.

Which processes are the container's: those in the container's PID namespace (the namespace of its
init, ``lamina exec`` processes included) and their descendants. Processes that were already
stopped are left stopped. Pausing is not the security boundary (the reader never follows a symlink,
see :mod:`store.fdtree`); it makes the snapshot consistent and the race unwinnable anyway.

Resource handling: :func:`paused` resumes everything it stopped when the block ends, on errors
too. Error handling: a process that does not stop in time is logged and the block still runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from runner.state import proc_stat_fields

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 2.0
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _state_and_ppid(pid: int) -> tuple[str, int] | None:
    fields = proc_stat_fields(pid)
    return (fields[0], int(fields[1])) if fields is not None else None


def _pid_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def container_pids(init_pid: int) -> set[int]:
    """The live processes of the container whose init is ``init_pid`` (a host pid)."""
    namespace = _pid_ns(init_pid)
    if namespace == _pid_ns(os.getpid()):
        namespace = None  # not a PID namespace of its own: its descendants only, never the host's
    parents: dict[int, int] = {}
    members: set[int] = {init_pid}
    for pid in _all_pids():
        info = _state_and_ppid(pid)
        if info is None or info[0] in "ZX":
            continue
        parents[pid] = info[1]
        if namespace is not None and pid != os.getpid() and _pid_ns(pid) == namespace:
            members.add(pid)
    grown = True
    while grown:  # descendants (nested PID namespaces included)
        before = len(members)
        members |= {pid for pid, ppid in parents.items() if ppid in members}
        grown = len(members) != before
    return {pid for pid in members if pid in parents}


def _cgroup_of(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def dedicated_cgroup(init_pid: int, pids: set[int]) -> Path | None:
    """The container's cgroup v2 directory when it holds only the container and we may freeze it."""
    group = _cgroup_of(init_pid)
    if group is None or group in ("/", _cgroup_of(os.getpid())):
        return None
    directory = _CGROUP_ROOT / group.lstrip("/")
    freeze = directory / "cgroup.freeze"
    if not os.access(freeze, os.W_OK):
        return None
    try:
        procs = {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return None
    return directory if procs and procs <= pids else None


def _freeze(directory: Path) -> None:
    (directory / "cgroup.freeze").write_text("1")
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while "frozen 1" not in (directory / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            log.warning("the container's cgroup %s did not freeze in %.0f s", directory, STOP_TIMEOUT_S)
            break
        time.sleep(0.005)


@contextlib.contextmanager
def _frozen(directory: Path) -> Iterator[None]:
    try:
        _freeze(directory)
        yield
    finally:
        (directory / "cgroup.freeze").write_text("0")


def _wait_stopped(pids: set[int]) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    waiting = set(pids)
    while waiting:
        waiting = {pid for pid in waiting if (info := _state_and_ppid(pid)) is not None and info[0] not in "TtZX"}
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.warning("container processes %s did not stop in %.0f s", sorted(waiting), STOP_TIMEOUT_S)
            return
        time.sleep(0.002)


def _stop_all(init_pid: int, stopped: set[int]) -> None:
    """SIGSTOP every running process of the container, adding each to ``stopped`` as it is sent."""
    # Until nothing new appears: a process may fork between the listing and its SIGSTOP.
    for _ in range(20):
        fresh = set()
        for pid in container_pids(init_pid) - stopped:
            info = _state_and_ppid(pid)
            if info is None or info[0] in "Tt":
                continue  # gone, or stopped by someone else: theirs to continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                fresh.add(pid)
                stopped.add(pid)
        if not fresh:
            break
        _wait_stopped(fresh)
    log.debug("paused container processes %s", sorted(stopped))


@contextlib.contextmanager
def _stopped(init_pid: int) -> Iterator[None]:
    stopped: set[int] = set()
    try:
        _stop_all(init_pid, stopped)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def pause(init_pid: int) -> str:
    """``lamina pause``: freeze the container's cgroup when it has one of its own that may be frozen,
    else stop its processes (SIGSTOP); say which ("cgroup" or "signals")."""
    cgroup = dedicated_cgroup(init_pid, container_pids(init_pid))
    if cgroup is not None:
        _freeze(cgroup)
        return "cgroup"
    _stop_all(init_pid, set())
    return "signals"


def resume(init_pid: int, how: str) -> None:
    """``lamina unpause``: undo :func:`pause` (``how`` is what it answered)."""
    if how == "cgroup":
        cgroup = dedicated_cgroup(init_pid, container_pids(init_pid))
        if cgroup is not None:
            (cgroup / "cgroup.freeze").write_text("0")
            return
    for pid in container_pids(init_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def paused(init_pid: int) -> Iterator[None]:
    """Hold the container whose init is ``init_pid`` still for the duration of the block."""
    if init_pid <= 0 or _state_and_ppid(init_pid) is None:
        yield
        return
    cgroup = dedicated_cgroup(init_pid, container_pids(init_pid))
    with _frozen(cgroup) if cgroup is not None else _stopped(init_pid):
        yield
