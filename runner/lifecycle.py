"""Starting, attaching to, stopping and removing containers (the monitor process lives here).

``run`` without ``-d`` makes the lamina process itself the monitor: it starts the sandbox, records
the container as running, relays a pty when ``-t``, forwards signals, and records the exit code.
``run -d`` and ``start`` fork a daemonised monitor (double fork, new session); the command line
waits until the monitor reports that the command has started (or why it could not) and then
returns. Either way the container's stdout and stderr are pipes (or one pty with ``-t``) that the
monitor reads and appends, chunk by chunk and stream by stream, to the container's log (see
:mod:`runner.containerlog`), so ``logs`` can replay each stream on its own descriptor as docker
does. The container never holds the log file itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import ContainerError, ContainerNotFound, LaminaError
from lamina.layout import Layout
from runner import attach, linux, tty, unionserver
from runner.containerlog import STDERR, STDOUT, LogWriter
from runner.health import health_checks
from runner.network import PortMapping
from runner.runflags import should_restart
from runner.sandbox import Mount, Sandbox, SandboxSpec, forward_signals, start_sandbox
from runner.state import (
    STATUS_EXITED,
    STATUS_RUNNING,
    Container,
    ContainerStore,
    claim,
    now,
    process_start_time,
    remove_anonymous_volumes,
)

log = logging.getLogger(__name__)


def _sandbox_mount(m: dict[str, Any]) -> Mount:
    """A mount record as the sandbox makes it. A volume mounted with nocopy is a plain bind, never
    filled from the image; a volume made with driver options mounts what they say."""
    kind = "bind" if m.get("kind") == "volume" and m.get("copy") is False else m.get("kind", "bind")
    source = Path(m["source"]) if m.get("source") else None
    readonly, options = bool(m.get("readonly")), m.get("options", "")
    if m.get("kind") == "volume" and m.get("volume_options"):
        from runner.volume_options import driver_mount

        driven = driver_mount(m["volume_options"])
        kind = {"tmpfs": "tmpfs-volume", "bind": kind}[driven.kind]
        source = Path(driven.source) if driven.source else None
        readonly, options = readonly or driven.readonly, driven.data
    return Mount(target=m["target"], kind=kind, source=source, readonly=readonly, options=options)


def build_spec(layout: Layout, container: Container) -> SandboxSpec:
    from lamina.lazy.lower import image_lowers
    from runner.runflags import rlimits

    lowers = image_lowers(layout, container.image_id)
    mounts = [_sandbox_mount(m) for m in container.mounts]
    return SandboxSpec(
        argv=list(container.argv), lowers=lowers, upper=container.upper, work=container.work,
        env=_environment(container), cwd=container.workdir, user=container.user, network=container.network,
        mounts=mounts, hostname=container.hostname, ports=publish_ports(container),
        readonly_rootfs=container.readonly, init=container.init, state_dir=container.directory,
        seccomp=container.seccomp, union_log=container.directory / "unionfs.log",
        capabilities=container.capabilities, no_new_privileges=container.no_new_privileges,
        unmask_proc=container.unmask_proc,
        ulimits=rlimits(container.ulimits),
        shm_size=container.shm_size, extra_hosts=[(h, a) for h, a in container.extra_hosts],
        dns=list(container.dns), dns_search=list(container.dns_search), dns_options=list(container.dns_options),
        cgroup=_limits_cgroup(container), join_network_of=_network_owner(layout, container),
        pid_host=container.pid_mode == "host",
        ipc="" if container.ipc_mode.startswith("container:") else container.ipc_mode,
        join_ipc_of=_ipc_owner(layout, container),
    )


def _environment(container: Container) -> dict[str, str]:
    env = dict(container.env)
    if container.tty:
        env.setdefault("TERM", "xterm")  # as docker: not the caller's
    return env


def _network_owner(layout: Layout, container: Container) -> int | None:
    """``--network container:ID``: the pid of that container's init, which must be running; its
    /etc/hosts and /etc/resolv.conf become this container's too, as in docker."""
    if not container.network.startswith("container:"):
        return None
    other_id = container.network.removeprefix("container:")
    other = _running_container(layout, other_id,
                               f"cannot join network of container {other_id[:12]}: it no longer exists",
                               "cannot join network of a non running container: {id}")
    for name in ("hosts", "resolv.conf"):
        with contextlib.suppress(OSError):
            shutil.copyfile(other.directory / name, container.directory / name)
    return other.state.pid


def _running_container(layout: Layout, container_id: str, missing: str, stopped: str) -> Container:
    """The container ``container_id``, which must exist (else ``missing``) and run (else
    ``stopped``, with ``{id}`` its id), with its init's pid known."""
    try:
        other = ContainerStore(layout).get(container_id)
    except ContainerNotFound:
        raise ContainerError(missing) from None
    if not other.running or not other.state.pid:
        raise ContainerError(stopped.format(id=other.id))
    return other


def _ipc_owner(layout: Layout, container: Container) -> int | None:
    """``--ipc container:ID``: the pid of that container's init; as docker, it must be running
    and made with ``--ipc shareable``."""
    if not container.ipc_mode.startswith("container:"):
        return None
    other_id = container.ipc_mode.removeprefix("container:")
    refused = f"can't join IPC of container {other_id}"
    other = _running_container(layout, other_id, f"{refused}: no such container",
                               refused + ": container {id} is not running")
    if other.ipc_mode != "shareable":
        raise ContainerError(f"{refused}: non-shareable IPC (hint: use IpcMode:shareable for the donor container)")
    return other.state.pid


def _limits_cgroup(container: Container) -> Path | None:
    """The container's cgroup with its ``--memory``/``--cpus``/``--pids-limit`` written, when a
    delegated cgroup v2 subtree allows it (``run`` warned otherwise, see runner.cgroups)."""
    from runner import cgroups

    if not container.resources:
        return None
    delegation = cgroups.find_delegation()
    if delegation is None or cgroups.plan_limits(container.resources, delegation) is not None:
        return None
    try:
        return cgroups.make_cgroup(delegation, f"lamina-{container.short_id}", container.resources).directory
    except OSError as e:
        raise ContainerError(f"cannot apply the resource limits in {delegation}: {e.strerror}") from e


def publish_ports(container: Container) -> list[PortMapping]:
    """The container's ports for this start: ``-p CTR`` (host port 0) gets a free host port, as
    docker gives a random one; the ports as published are kept in the container's state."""
    from runner.network import free_host_port

    ports = []
    for p in container.ports:
        port = PortMapping.from_json(p)
        if port.host_port == 0:
            port = PortMapping(port.host_ip, free_host_port(port.host_ip, port.proto), port.container_port,
                               port.proto)
        ports.append(port)
    container.state.ports = [p.to_json() for p in ports]
    return ports


def open_log(container: Container) -> LogWriter:
    """The container's log writer, rotated as its ``--log-opt max-size``/``max-file`` say."""
    from runner.mountflags import parse_bytes

    options = container.log_options
    size = options.get("max-size", "-1")
    max_size = 0 if size == "-1" else parse_bytes("--log-opt max-size", size)
    return LogWriter(container.log_path, max_size, int(options.get("max-file", "1")))


def _mark_running(container: Container, sandbox: Sandbox) -> None:
    container.state.status = STATUS_RUNNING
    container.state.pid = sandbox.container_pid
    container.state.monitor_pid = os.getpid()
    container.state.monitor_start = process_start_time(os.getpid()) or ""
    container.state.started_at = now()
    container.state.exit_code = None
    container.state.finished_at = ""
    container.state.error = ""
    container.state.paused = ""
    container.save_state()


def _mark_exited(container: Container, code: int, error: str = "") -> None:
    container.state.status = STATUS_EXITED
    container.state.exit_code = code
    container.state.finished_at = now()
    container.state.pid = 0
    container.state.monitor_pid = 0
    container.state.error = error
    container.state.paused = ""
    with contextlib.suppress(OSError):
        container.save_state()


def _finish(layout: Layout, container: Container, code: int) -> None:
    _mark_exited(container, code)
    if container.auto_remove:
        remove(layout, container, volumes=True)  # --rm: its anonymous volumes go too, as docker's


@dataclass
class _OutputEnds:
    """This side of the container's output: a pty's master (``-t``: one stream, which docker logs as
    stdout) or one pipe per stream, and the ends the sandbox gets (closed here once it started)."""

    master: int | None = None
    pipes: dict[int, str] = field(default_factory=dict)  # read end -> STDOUT or STDERR
    child_ends: list[int] = field(default_factory=list)
    console: socket.socket | None = None  # where the container's init sends its pty's master

    def close(self) -> None:
        for fd in [*self.pipes, *([self.master] if self.master is not None else [])]:
            os.close(fd)
        self.pipes, self.master = {}, None
        if self.console is not None:
            self.console.close()
            self.console = None


def _plumb_output(spec: SandboxSpec, use_tty: bool) -> _OutputEnds:
    ends = _OutputEnds()
    if use_tty:
        # The pty is made inside the container, of its own devpts (the terminal is /dev/pts/0
        # there, as with docker), and its master comes back on this socket.
        ends.console, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec.console_socket = theirs.detach()
        ends.child_ends.append(spec.console_socket)
        return ends
    for stream in (STDOUT, STDERR):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        ends.pipes[read_end] = stream
        ends.child_ends.append(write_end)
    spec.stdout, spec.stderr = ends.child_ends
    return ends


def _start(spec: SandboxSpec, ends: _OutputEnds) -> Sandbox:
    """Start the sandbox, then close this side's copies of its ends (or the pipes would never reach
    end of file)."""
    try:
        sandbox = start_sandbox(spec)
    finally:
        for fd in ends.child_ends:
            os.close(fd)
        ends.child_ends = []
    if ends.console is not None:
        try:
            ends.master = tty.receive_terminal(ends.console)
        except LaminaError:
            sandbox.send_signal(signal.SIGKILL)
            sandbox.wait()
            raise
        finally:
            ends.console.close()
            ends.console = None
    return sandbox


def _record_failure(layout: Layout, container: Container, error: LaminaError) -> None:
    """The container could not start: say why (docker's ``State.Error``) and honour ``--rm``."""
    _mark_exited(container, error.exit_code, str(error))
    if container.auto_remove:
        remove(layout, container, background=False, volumes=True)


def _log_output(container_log: LogWriter, stream: str, live_fd: int | None) -> Callable[[bytes], None]:
    """What to do with a chunk of the container's output: show it on ``live_fd`` (None: nobody
    watches, ``run -d``), then keep it in the log."""
    def consume(data: bytes) -> None:
        if live_fd is not None:
            with contextlib.suppress(BrokenPipeError):  # `lamina run ... | head`: keep logging
                tty.write_all(live_fd, data)
        container_log.write(stream, data)

    return consume


def _copy_output(ends: _OutputEnds, container_log: LogWriter, sandbox: Sandbox, live: bool,
                 stdin_fd: int | None = None, attach: tuple[str, ...] = (STDOUT, STDERR)) -> None:
    """Copy the container's output to the log (and, when ``live``, the ``attach``ed streams to this
    process's stdout and stderr) until the container is gone."""
    if ends.master is not None:
        shown = sys.stdout.fileno() if live and STDOUT in attach else None
        tty.relay(ends.master, stdin_fd, shown, lambda: _exited(sandbox),
                  copy_to=_log_output(container_log, STDOUT, None))
        return
    live_fds = {stream: fd for stream, fd in ((STDOUT, sys.stdout.fileno()), (STDERR, sys.stderr.fileno()))
                if live and stream in attach}
    consumers = {fd: _log_output(container_log, stream, live_fds.get(stream)) for fd, stream in ends.pipes.items()}
    tty.copy_output(consumers, lambda: _exited(sandbox))


def run_attached(layout: Layout, container: Container) -> int:
    """Run in the foreground (``run`` without ``-d``, ``start -a``); return the exit code.

    As docker does, the output is also kept for ``lamina logs``: it passes through pipes (or the
    pty) that this process copies to its own stdout/stderr and to the container's log.
    """
    claim(container)
    try:
        spec = build_spec(layout, container)
    except LaminaError as e:  # e.g. its image was removed meanwhile (rmi -f)
        _record_failure(layout, container, e)
        raise
    with contextlib.closing(open_log(container)) as container_log:
        ends = _plumb_output(spec, container.tty)
        if not container.interactive:
            spec.stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            ends.child_ends.append(spec.stdin)
        try:
            with forward_signals() as forwarder:
                try:
                    sandbox = _start(spec, ends)
                except LaminaError as e:
                    _record_failure(layout, container, e)
                    raise
                _mark_running(container, sandbox)
                forwarder.attach(sandbox)
                stdin_fd = sys.stdin.fileno() if container.interactive else None
                raw = container.interactive and container.tty
                with tty.raw_terminal(sys.stdin.fileno()) if raw else contextlib.nullcontext(), \
                        health_checks(layout, container.id, container.directory, container.healthcheck):
                    _copy_output(ends, container_log, sandbox, live=True, stdin_fd=stdin_fd,
                                 attach=_attached_streams(container))
                code = sandbox.wait()
        finally:
            ends.close()
    _finish(layout, container, code)
    return code


def _attached_streams(container: Container) -> tuple[str, ...]:
    """``run -a``: only the streams named are shown (both when none is); the log keeps both."""
    named = tuple(s for s in container.attach if s in (STDOUT, STDERR))
    return named if container.attach else (STDOUT, STDERR)


def _exited(sandbox: Sandbox) -> bool:
    return sandbox.poll() is not None


def start_detached(layout: Layout, container: Container, hold_output: bool = False) -> None:
    """Start the container under a daemonised monitor; return once its command runs.

    A ``-t`` container's monitor serves its terminal to attached clients (:mod:`runner.attach`);
    ``hold_output``: keep what it writes until the first client attaches (``run -it``)."""
    clear_stopped_by_user(container)
    container.state.restart_count = 0
    report_r, report_w = os.pipe2(os.O_CLOEXEC)

    def monitor() -> None:
        unionserver.forget_inherited()
        claim(container)
        _monitor(layout, container, report_w, hold_output)

    try:
        linux.run_detached(monitor, {0, 1, 2, report_w})
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    with os.fdopen(report_r, "rb") as f:
        report = f.readline().decode(errors="replace").rstrip("\n")
    if report.startswith("ok"):
        return
    code_text, _, message = report.partition(" ")
    err = ContainerError(message or "the container monitor died")
    if code_text.isdigit():
        err.exit_code = int(code_text)
    raise err


def _detach_stdio(container: Container) -> None:
    """The monitor outlives the command line: it must hold none of its terminal or pipes (a caller
    reading ``run -d``'s output to the end would wait for the container). Its input and output are
    /dev/null; its own diagnostics go to the container's ``monitor.log``, never into the container's
    output log."""
    null = os.open(os.devnull, os.O_RDWR)
    diagnostics = os.open(container.monitor_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(diagnostics, 2)
    os.close(null)
    os.close(diagnostics)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def _monitor(layout: Layout, container: Container, report_w: int, hold_output: bool = False) -> None:
    """The daemonised monitor of ``run -d``/``start``: starts the sandbox with its output on pipes
    (or a pty), reports to the command line on ``report_w``, then copies the output to the log until
    the container exits and records its exit code; and starts it again while its ``--restart``
    policy says so (with docker's back-off, doubling from 100 ms), until ``stop`` or ``kill``."""
    _detach_stdio(container)
    delay = RESTART_DELAY
    while True:
        try:
            container_log = open_log(container)
            spec = build_spec(layout, container)
            ends = _plumb_output(spec, container.tty)
            listener = attach.open_listener(container.directory) if container.tty else None
            sandbox = _start(spec, ends)
        except LaminaError as e:
            _record_failure(layout, container, e)
            _report(report_w, f"{e.exit_code} {e}")
            return
        except BaseException as e:
            _mark_exited(container, 125, str(e))
            _report(report_w, f"125 {e}")
            return
        _mark_running(container, sandbox)
        report_w = _report(report_w, "ok")
        if container.state.restart_count and stopped_by_user(container):
            sandbox.send_signal(signal.SIGKILL)  # a stop that came while it was being restarted
        started = time.monotonic()
        with health_checks(layout, container.id, container.directory, container.healthcheck):
            code = _watch(container, container_log, sandbox, ends, listener, hold_output)
        hold_output = False  # only the first start's output waits for `run -it` to attach
        if not should_restart(container.restart_policy, code, container.state.restart_count,
                              stopped_by_user(container)):
            _finish(layout, container, code)
            return
        _mark_exited(container, code)
        # docker resets the back-off once a run lasted 10 s.
        delay = RESTART_DELAY if time.monotonic() - started >= 10 else delay
        time.sleep(delay)
        delay = min(delay * 2, 60.0)
        fresh = _reread(container)
        if fresh is None or stopped_by_user(fresh):
            return
        container = fresh
        container.state.restart_count += 1
        claim(container)


RESTART_DELAY = 0.1


def _report(report_w: int, message: str) -> int:
    """Tell the command line how the first start went (once); -1 afterwards."""
    if report_w >= 0:
        with contextlib.suppress(OSError):
            os.write(report_w, f"{message}\n".encode())
        os.close(report_w)
    return -1


def _reread(container: Container) -> Container | None:
    """The container's record as it is on disk now (``stop`` may have written to it), or None if it
    was removed."""
    try:
        return Container.read(container.directory)
    except (OSError, ValueError, TypeError):
        return None


def _watch(container: Container, container_log: LogWriter, sandbox: Sandbox, ends: _OutputEnds,
           listener: socket.socket | None, hold_output: bool) -> int:
    """Copy the container's output to its log (and, for a terminal, to the clients attached through
    ``listener``) until it exits; its exit code, which the attached clients are told."""
    with forward_signals() as forwarder:
        forwarder.attach(sandbox)
        clients: list[socket.socket] = []
        try:
            if listener is not None and ends.master is not None:
                clients = attach.serve_terminal(ends.master, listener, _log_output(container_log, STDOUT, None),
                                                lambda: _exited(sandbox), hold_output)
            else:
                _copy_output(ends, container_log, sandbox, live=False)
        except Exception:
            # Nobody would see the traceback (this process ends in os._exit): say it in monitor.log,
            # and keep the container's record true. Closing the pipes makes its writes fail with
            # EPIPE rather than block.
            log.exception("container %s: copying its output to the log failed", container.short_id)
        finally:
            ends.close()
            container_log.close()
            if listener is not None:
                listener.close()
        code = sandbox.wait()
    attach.send_exit(clients, code)
    return code


STOPPED_MARK = "stopped-by-user"


def mark_stopped_by_user(container: Container) -> None:
    """``stop``/``kill``: the restart policy must not start it again (docker's manual stop). A file
    beside the record, not a field of it, so the monitor's own writes of the record cannot lose it;
    the next ``start`` removes it."""
    with contextlib.suppress(OSError):
        (container.directory / STOPPED_MARK).touch()


def stopped_by_user(container: Container) -> bool:
    return (container.directory / STOPPED_MARK).exists()


def clear_stopped_by_user(container: Container) -> None:
    with contextlib.suppress(FileNotFoundError):
        (container.directory / STOPPED_MARK).unlink()


def signal_container(container: Container, sig: int) -> None:
    if not container.running or not container.state.pid:
        raise ContainerError(f"container {container.name} is not running")
    try:
        os.kill(container.state.pid, sig)
    except ProcessLookupError:
        pass


def wait_stopped(store: ContainerStore, container: Container, timeout: float) -> bool:
    """Wait until the container's monitor has recorded its exit; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fresh = store.get(container.id)
        except ContainerNotFound:  # it was started with --rm and is gone already
            container.state.status = STATUS_EXITED
            return True
        if not fresh.running:
            container.state = fresh.state
            return True
        time.sleep(0.02)
    return False


def stop(store: ContainerStore, container: Container, timeout: float) -> None:
    """STOPSIGNAL, then SIGKILL after ``timeout`` seconds (docker's ``stop -t``)."""
    mark_stopped_by_user(container)  # also when it waits to be restarted: it must stay stopped
    if not container.running:
        return
    with contextlib.suppress(ContainerError):
        signal_container(container, container.stop_signal)
    if wait_stopped(store, container, timeout):
        return
    with contextlib.suppress(ContainerError):
        signal_container(container, signal.SIGKILL)
    if not wait_stopped(store, container, 10):
        raise ContainerError(f"container {container.name} did not stop")


def remove(layout: Layout, container: Container, background: bool = True, volumes: bool = False) -> None:
    """Remove the container, and its anonymous volumes when ``volumes`` (``rm -v``, ``--rm``; docker's
    ``rm`` and ``container prune`` keep them); its
    directory's deletion finishes in the background unless told not to (a container that failed to
    start leaves the store exactly as it was when lamina exits)."""
    store = ContainerStore(layout)
    with store.lock():
        store.remove_directory(container, background=background)
    if volumes:
        remove_anonymous_volumes(layout, container)
