"""Starting, attaching to, stopping and removing containers (the monitor process lives here).

``run`` without ``-d`` makes the lamina process itself the monitor: it starts the sandbox, records
the container as running, relays a pty when ``-t``, forwards signals, and records the exit code.
``run -d`` and ``start`` fork a daemonised monitor (double fork, new session) whose output goes to
the container's log file; the command line waits until the monitor reports that the command has
started (or why it could not) and then returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from lamina.errors import ContainerError, ContainerNotFound, LaminaError
from runner import linux, tty, unionserver
from runner.network import PortMapping
from runner.sandbox import Mount, Sandbox, SandboxSpec, call_in_userns, forward_signals, start_sandbox
from runner.state import STATUS_EXITED, STATUS_RUNNING, Container, ContainerStore, now, process_start_time

log = logging.getLogger(__name__)


def build_spec(root: Path, container: Container) -> SandboxSpec:
    from store import Store

    store = Store.open(root)
    image = store.resolve_image(container.image_id)
    lowers = list(reversed(store.layer_paths(image)))
    mounts = [Mount(target=m["target"], kind=m.get("kind", "bind"),
                    source=Path(m["source"]) if m.get("source") else None,
                    readonly=bool(m.get("readonly")), options=m.get("options", ""))
              for m in container.mounts]
    return SandboxSpec(
        argv=list(container.argv), lowers=lowers, upper=container.upper, work=container.work,
        env=dict(container.env), cwd=container.workdir, user=container.user, network=container.network,
        mounts=mounts, hostname=container.hostname,
        ports=[PortMapping.from_json(p) for p in container.ports], readonly_rootfs=container.readonly,
        init=container.init, state_dir=container.directory, seccomp=container.seccomp,
        union_log=container.directory / "unionfs.log",
    )


def _mark_running(container: Container, sandbox: Sandbox) -> None:
    container.state.status = STATUS_RUNNING
    container.state.pid = sandbox.container_pid
    container.state.monitor_pid = os.getpid()
    container.state.monitor_start = process_start_time(os.getpid()) or ""
    container.state.started_at = now()
    container.state.exit_code = None
    container.state.finished_at = ""
    container.state.error = ""
    container.save()


def _mark_exited(container: Container, code: int, error: str = "") -> None:
    container.state.status = STATUS_EXITED
    container.state.exit_code = code
    container.state.finished_at = now()
    container.state.pid = 0
    container.state.monitor_pid = 0
    container.state.error = error
    with contextlib.suppress(OSError):
        container.save()


def _finish(root: Path, container: Container, code: int) -> None:
    _mark_exited(container, code)
    if container.auto_remove:
        remove(root, container)


def run_attached(root: Path, container: Container) -> int:
    """Run in the foreground (``run`` without ``-d``, ``start -a``); return the exit code.

    As docker does, the output is also kept for ``lamina logs``: it passes through pipes (or the
    pty) that this process copies to its own stdout/stderr and to the container's log file.
    """
    spec = build_spec(root, container)
    master = slave = devnull = None
    pipes: dict[int, int] = {}  # read end -> where it goes
    child_ends: list[int] = []
    if not container.interactive:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        spec.stdin = devnull
        child_ends.append(devnull)
    if container.tty:
        master, slave = tty.open_pty()
        spec.terminal = slave
        child_ends.append(slave)
        spec.env.setdefault("TERM", os.environ.get("TERM", "xterm"))
    else:
        for target in (1, 2):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            pipes[read_end] = target
            child_ends.append(write_end)
            if target == 1:
                spec.stdout = write_end
            else:
                spec.stderr = write_end
    log_fd = os.open(container.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        with forward_signals() as forwarder:
            try:
                sandbox = start_sandbox(spec)
            except LaminaError as e:
                _mark_exited(container, e.exit_code, str(e))
                if container.auto_remove:
                    remove(root, container)
                raise
            finally:
                for fd in child_ends:
                    os.close(fd)
            _mark_running(container, sandbox)
            forwarder.attach(sandbox)
            if master is not None:
                stdin_fd = sys.stdin.fileno() if container.interactive else None
                with tty.raw_terminal(sys.stdin.fileno()) if container.interactive else contextlib.nullcontext():
                    tty.relay(master, stdin_fd, sys.stdout.fileno(), lambda: _exited(sandbox), copy_to=log_fd)
            else:
                tty.copy_output(pipes, log_fd)
            code = sandbox.wait()
    finally:
        for fd in [*pipes, *([master] if master is not None else []), log_fd]:
            os.close(fd)
    _finish(root, container, code)
    return code


def _exited(sandbox: Sandbox) -> bool:
    return sandbox.poll() is not None


def start_detached(root: Path, container: Container) -> None:
    """Start the container under a daemonised monitor; return once its command runs."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            linux.close_fds_except({0, 1, 2, report_w})
            unionserver.forget_inherited()
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _monitor(root, container, report_w)
        finally:
            os._exit(0)
    os.close(report_w)
    os.waitpid(pid, 0)
    with os.fdopen(report_r, "rb") as f:
        report = f.readline().decode(errors="replace").rstrip("\n")
    if report.startswith("ok"):
        return
    code_text, _, message = report.partition(" ")
    err = ContainerError(message or "the container monitor died")
    if code_text.isdigit():
        err.exit_code = int(code_text)
    raise err


def _monitor(root: Path, container: Container, report_w: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(container.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    try:
        spec = build_spec(root, container)
        master = slave = None
        if container.tty:
            master, slave = tty.open_pty()
            spec.terminal = slave
            spec.env.setdefault("TERM", "xterm")
        try:
            sandbox = start_sandbox(spec)
        finally:
            if slave is not None:
                os.close(slave)
    except LaminaError as e:
        _mark_exited(container, e.exit_code, str(e))
        if container.auto_remove:
            remove(root, container)
        os.write(report_w, f"{e.exit_code} {e}\n".encode())
        return
    except BaseException as e:
        _mark_exited(container, 125, str(e))
        os.write(report_w, f"125 {e}\n".encode())
        return
    _mark_running(container, sandbox)
    os.write(report_w, b"ok\n")
    os.close(report_w)
    with forward_signals() as forwarder:
        forwarder.attach(sandbox)
        if master is not None:
            tty.relay(master, None, 1, lambda: False)
            os.close(master)
        code = sandbox.wait()
    _finish(root, container, code)


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


def remove(root: Path, container: Container) -> None:
    store = ContainerStore(root)
    with store.lock():
        for path in container.anonymous_volumes:
            with contextlib.suppress(LaminaError):
                call_in_userns(shutil.rmtree, Path(path).parent, True)
        store.remove_directory(container)
