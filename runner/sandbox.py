"""Run one command in a rootless sandbox over a union of image layers.

The process tree (P is the caller, on the host)::

    P  lamina: writes the id maps, runs slirp4netns, forwards signals, waits
    ├─ S  unionfs server (runner.unionserver): forked first, joins K's user and mount namespaces
    │     once they are mapped, and mounts the union there
    └─ K  keeper: new user, mount, UTS, IPC (and network) namespaces; waits for S's mount; then
       │  unshares a PID namespace and forks C; unmounts when C is gone
       └─ C  container init, PID 1: a *nested* mount namespace, the root prepared, pivot_root,
             privileges dropped, exec of the command

Why a nested mount namespace: ``pivot_root`` moves the root of every process of the namespace whose
root was the old one, and that would include the FUSE server. Why mount inside the namespaces: a
FUSE mount made by root of the user namespace shows the image's owners correctly and needs no
fusermount3; and it vanishes with the namespace, so a crash leaves no stale mount on the host.

P's side is this module; what K and C run inside the namespaces is :mod:`runner.sandbox_init`.

Synchronisation uses close-on-exec pipes: *status* (K and C report JSON events to P: the
namespaces exist, C's pid, C's root is prepared, or an error with an exit code; EOF means C has
exec'd), *sync* (P tells K the id maps are written), *ready* (S tells K the union is mounted, or why
not) and *go* (P tells C to exec: the network is ready, so the command never starts before its ports
are published, and no stop signal came meanwhile).

Stop signals during the set-up: a SIGINT or SIGTERM that reaches lamina before the command runs
cannot simply be passed on once it does. The command is PID 1 of its PID namespace, and the kernel
drops a signal sent to such a process from outside while its handler is SIG_DFL, which it still is
at exec time. So :func:`start_sandbox` asks its ``cancel`` callback at each step of the set-up (before
the union is mounted, before *go*, once the command has exec'd): when a stop signal has come, the
command is not started (or, if it was exec'd in between, killed at once) and
:class:`StartInterrupted` is raised, with docker's exit code for a command killed by that signal
(128+N). :func:`forward_signals` provides that callback to every sandbox started inside it. Signals
that come once the command runs are forwarded to it.

Resource handling: :func:`start_sandbox` returns a :class:`Sandbox` that owns K (and through it
C), S and slirp4netns; :meth:`Sandbox.wait` reaps them and removes temporary state. If P dies, K, S
and C get SIGKILL (parent-death signals) and the namespaces, mount included, disappear.

Error handling: a failure before the command runs raises :class:`ContainerError` (or
:class:`MountError`, or :class:`StartInterrupted`); a command that cannot be found or executed
raises :class:`CommandNotFound` (127) or :class:`CommandNotInvokable` (126), as docker reports them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from lamina.errors import CommandNotFound, CommandNotInvokable, ContainerError, LaminaError, MountError
from runner import linux, sealed, unionserver
from runner.idmap import apply_mapping, current_mapping
from runner.network import SLIRP_DNS, SLIRP_GUEST_IP, PortMapping, Slirp, normalize_network
from runner.rootfs import make_init_layer
from runner.sandbox_init import FORWARDED_SIGNALS, child_main, exit_code, keeper, kill_quietly
from runner.unionserver import UnionServer
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)

T = TypeVar("T")
# Signals that mean "stop": one that comes before the command runs cancels its start.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# Answers "has a stop signal come?" with its number, or None: see start_sandbox.
CancelCheck = Callable[[], int | None]


class StartInterrupted(ContainerError):
    """A stop signal came while the sandbox was set up: its command did not run (or was killed as it
    exec'd). The exit code is 128+N, as for a command killed by signal N."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} while the container was starting")
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class Mount:
    """An extra mount for the sandbox: ``bind`` (a host path), ``tmpfs``, ``cache`` (a bind of a
    persistent host directory, as the builder's ``RUN --mount=type=cache``) or ``volume`` (a bind
    of a volume directory that is filled from the image's content at ``target`` when empty)."""

    target: str
    kind: str = "bind"
    source: Path | None = None
    readonly: bool = False
    options: str = ""


@dataclass
class SandboxSpec:
    """What to run and on which root. Either ``lowers`` (image layer directories, top first) with an
    optional ``upper``/``work`` pair, or ``rootfs`` (a plain directory used as is).

    ``user`` is ``user[:group]`` by name or number, resolved in the image's /etc/passwd and
    /etc/group. ``env`` gets PATH and HOME defaults as docker gives them. ``stdin``/``stdout``/
    ``stderr`` are file descriptors (None: inherit the caller's). ``terminal`` is the slave side of a
    pty that becomes the command's controlling terminal and /dev/console; with ``console_socket``
    the container's init makes that pty itself, of the container's devpts. ``seccomp`` applies
    :mod:`runner.seccomp`'s filter (docker's default profile). ``state_dir`` holds the
    per-container files (hosts, hostname, resolv.conf, the init layer, the mount point); a temporary
    one is made and removed when it is None.
    """

    argv: list[str]
    lowers: LayerStack | None = None
    upper: Path | None = None
    work: Path | None = None
    rootfs: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str = "0"
    network: str = "slirp"
    mounts: list[Mount] = field(default_factory=list)
    hostname: str = "lamina"
    ports: list[PortMapping] = field(default_factory=list)
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    terminal: int | None = None
    readonly_rootfs: bool = False
    init: bool = False
    state_dir: Path | None = None
    union_options: list[str] = field(default_factory=lambda: ["allow_other", "default_permissions"])
    union_log: Path | None = None
    create_cwd: bool = True
    seccomp: bool = True
    # docker's run flags (runner.runflags): None capabilities means docker's default set.
    capabilities: list[str] | None = None
    no_new_privileges: bool = True
    unmask_proc: bool = False
    ulimits: list[tuple[int, int, int]] = field(default_factory=list)  # (RLIMIT_*, soft, hard), -1 unlimited
    shm_size: int = 0
    extra_hosts: list[tuple[str, str]] = field(default_factory=list)  # (host, address)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    cgroup: Path | None = None  # a cgroup v2 directory (runner.cgroups) the container's processes go in
    # --network container:NAME: the pid of a process in that container, whose user and network
    # namespaces the container joins (its id maps are that container's).
    join_network_of: int | None = None
    pid_host: bool = False  # --pid host: no PID namespace of its own
    # --ipc: "" its own IPC namespace and /dev/shm, "none" its own namespace and no /dev/shm,
    # "host" the host's namespace and /dev/shm; join_ipc_of: the pid of a process of a shareable
    # container whose user and IPC namespaces it joins.
    ipc: str = ""
    join_ipc_of: int | None = None
    # Run in the container's root instead of ``argv``, as root of its namespace: ``worker(0)`` with
    # ``stdin`` on descriptor 0, its result the exit code (``cp`` on a stopped container).
    worker: Callable[[int], int] | None = None
    # A Unix socket: the container's init makes a pty of the container's own devpts, sends its
    # master here (SCM_RIGHTS) and makes the slave its terminal (``-t``; instead of ``terminal``).
    console_socket: int | None = None


def _hosts_file(hostname: str, network: str, extra_hosts: list[tuple[str, str]]) -> str:
    """docker's order: the loopback names, ``--add-host`` lines, then the container's own name."""
    own_ip = SLIRP_GUEST_IP if network == "slirp" else "127.0.1.1"
    return ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            + "".join(f"{address}\t{host}\n" for host, address in extra_hosts)
            + f"{own_ip}\t{hostname}\n")


def _resolv_conf(network: str, dns: list[str], search: list[str], options: list[str]) -> str:
    """The network's resolver, with ``--dns``, ``--dns-search`` and ``--dns-option`` replacing its
    nameserver, search and options lines, as docker does."""
    if network == "slirp":
        base = f"nameserver {SLIRP_DNS}\n"
    else:
        try:
            with open("/etc/resolv.conf") as f:
                base = f.read(1 << 16)
        except OSError:
            base = ""
    if not (dns or search or options):
        return base
    lines = base.splitlines()
    replaced = {"nameserver": bool(dns), "search": bool(search), "domain": bool(search), "options": bool(options)}
    kept = [line for line in lines if not replaced.get(line.split(maxsplit=1)[0] if line.split() else "", False)]
    head = ([f"search {' '.join(search)}"] if search else []) + [f"nameserver {ip}" for ip in dns]
    tail = [f"options {' '.join(options)}"] if options else []
    return "\n".join(head + kept + tail) + "\n"


def write_etc_files(state_dir: Path, hostname: str, network: str,
                    spec: SandboxSpec | None = None) -> dict[str, str]:
    """Write the per-container /etc files into ``state_dir``; return {name in /etc: host path}."""
    extra_hosts = spec.extra_hosts if spec is not None else []
    dns = (spec.dns, spec.dns_search, spec.dns_options) if spec is not None else ([], [], [])
    contents = {"hosts": _hosts_file(hostname, network, extra_hosts), "hostname": hostname + "\n",
                "resolv.conf": _resolv_conf(network, *dns)}
    paths = {}
    for name, text in contents.items():
        path = state_dir / name
        if not path.exists():
            path.write_text(text)
        paths[name] = str(path)
    return paths


class Sandbox:
    """A started sandbox; see the module docstring for what it owns."""

    def __init__(self, keeper_pid: int, container_pid: int, slirp: Slirp | None, temp_dir: Path | None,
                 server: UnionServer | None = None, cgroup: Path | None = None) -> None:
        self.keeper_pid = keeper_pid
        self._cgroup = cgroup
        self.container_pid = container_pid
        self._slirp = slirp
        self._server = server
        self._temp_dir = temp_dir
        self.returncode: int | None = None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.container_pid, sig)
            except ProcessLookupError:
                pass

    def poll(self) -> int | None:
        """The exit code if the command has finished (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.keeper_pid, os.WNOHANG)
            if pid:
                self.returncode = exit_code(status)
                self._cleanup()
        return self.returncode

    def wait(self) -> int:
        """Wait for the command to exit; return its exit code (128+N when killed by signal N)."""
        if self.returncode is None:
            _, status = os.waitpid(self.keeper_pid, 0)
            self.returncode = exit_code(status)
            self._cleanup()
        return self.returncode

    def _cleanup(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._slirp is not None:
            self._slirp.close()
            self._slirp = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        if self._cgroup is not None:
            with contextlib.suppress(OSError):  # empty now: K and every process of the container are gone
                os.rmdir(self._cgroup)
            self._cgroup = None


def start_sandbox(spec: SandboxSpec, server: UnionServer | None = None,
                  cancel: CancelCheck | None = None) -> Sandbox:
    """Start ``spec``'s command; return once it has been exec'd (or raise, leaving nothing behind).

    ``server``: a union server forked earlier; by default the one :func:`runner.unionserver.prefork`
    made, if any (callers that know a sandbox is coming call ``prefork()`` early, so the server's
    imports overlap with their own work). The sandbox takes it over (and stops it when ``spec`` has
    a plain ``rootfs``).

    ``cancel``: asked during the set-up whether a stop signal has come (see the module docstring);
    by default the :class:`SignalForwarder` installed by :func:`forward_signals`, if any. When it
    answers a signal number, :class:`StartInterrupted` is raised and nothing is left running.
    """
    if server is None:
        server = unionserver.take()
    if cancel is None and _installed_forwarder is not None:
        cancel = _installed_forwarder.stop_signal
    network = normalize_network(spec.network)
    if not spec.argv:
        raise ContainerError("no command specified")
    if spec.rootfs is None and not spec.lowers:
        raise ContainerError("sandbox needs a rootfs or image layers")
    mapping = current_mapping()
    try:
        interpreter = sealed.sealed_interpreter()  # C starts from it (see runner.sealed)
    except ContainerError:
        if server is not None:
            server.stop(grace=0)
        raise
    state = _prepare_state(spec, network)
    temp_dir = state.temp_dir
    server, server_spec = _union_server(spec, state, server)
    ready_r = server.ready_r if server is not None else None
    pid, status_r, sync_w, go_w = _fork_keeper(spec, network, state, ready_r, interpreter)
    slirp: Slirp | None = None
    startup = _Startup(status_r)
    try:
        _raise_if_cancelled(cancel)
        if not startup.read_until("unshared"):
            _raise_event(startup.error, "the sandbox did not start")
        if spec.join_network_of is None and spec.join_ipc_of is None:
            apply_mapping(pid, mapping)
        log.debug("sandbox: namespaces made and id maps written")
        if spec.cgroup is not None:
            _join_cgroup(spec.cgroup, pid)
        if server is not None:
            server.attach(pid, server_spec, str(spec.union_log) if spec.union_log else None)
        if network == "slirp":
            slirp = Slirp(pid, api=bool(spec.ports))
        _raise_if_cancelled(cancel)
        os.write(sync_w, b"1")
        if slirp is not None:
            slirp.wait_ready()
            for port in spec.ports:
                slirp.add_port(port)
        log.debug("sandbox: network ready")
        if not startup.read_until("prepared"):
            _raise_event(startup.error, "the sandbox exited before running the command")
        log.debug("sandbox: root prepared")
        _raise_if_cancelled(cancel)
        os.write(go_w, b"1")
        log.debug("sandbox: the command may start")
        startup.read_until(None)
        if startup.error is not None or not startup.container_pid:
            _raise_event(startup.error, "the sandbox exited before running the command")
        # A signal that came between "go" and the exec: the command could not have handled it yet.
        _raise_if_cancelled(cancel)
    except BaseException:
        _abandon(pid, server, slirp, temp_dir)
        if spec.cgroup is not None:
            with contextlib.suppress(OSError):
                os.rmdir(spec.cgroup)
        raise
    finally:
        for fd in (sync_w, go_w, status_r):
            os.close(fd)
    log.debug("sandbox: command started as pid %d", startup.container_pid)
    if server is not None:
        server.release_ready_pipe()
    return Sandbox(pid, startup.container_pid, slirp, temp_dir, server, spec.cgroup)


class _EventReader:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""

    def next(self) -> dict[str, object] | None:
        while b"\n" not in self._buffer:
            chunk = os.read(self._fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, object] = json.loads(line)
        return result


class _Startup:
    """What K and C report on the status pipe while the sandbox starts: C's pid, the first error."""

    def __init__(self, fd: int) -> None:
        self._events = _EventReader(fd)
        self.container_pid = 0
        self.error: dict[str, object] | None = None

    def read_until(self, wanted: str | None) -> bool:
        """Read events until one named ``wanted`` (True) or the end of the pipe (False).

        K's and C's events interleave (K reports C's pid while C prepares the root), so the pid and
        the first error are noted whenever they come."""
        while (event := self._events.next()) is not None:
            name = event.get("event")
            if name == "pid":
                self.container_pid = int(event["pid"])  # type: ignore[call-overload]
            elif name == "error" and self.error is None:
                self.error = event
            elif name == wanted:
                return True
        return False


@dataclass
class _State:
    """A sandbox's per-container files (see SandboxSpec.state_dir)."""

    temp_dir: Path | None  # made for this sandbox: removed with it
    etc_files: dict[str, str]
    init_layer: Path | None  # the union's top layer; None for a plain rootfs
    merged: Path


def _prepare_state(spec: SandboxSpec, network: str) -> _State:
    temp_dir = None
    if spec.state_dir is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="lamina-sandbox-"))
        os.chmod(temp_dir, 0o755)
    state_dir = spec.state_dir or temp_dir
    assert state_dir is not None
    try:
        etc_files = write_etc_files(state_dir, spec.hostname, network, spec)
        init_layer = make_init_layer(state_dir / "init") if spec.rootfs is None else None
        merged = state_dir / "merged"
        merged.mkdir(exist_ok=True)
    except OSError as e:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise ContainerError(f"cannot prepare container state in {state_dir}: {e.strerror}") from e
    return _State(temp_dir, etc_files, init_layer, merged)


def _union_server(spec: SandboxSpec, state: _State,
                  server: UnionServer | None) -> tuple[UnionServer | None, str]:
    """The server that mounts the union and its typed specification; none (a forked one stopped)
    for a rootfs."""
    if state.init_layer is None:
        if server is not None:
            server.stop()
        return None, ""
    from unionfs.mount import MountSpec

    assert spec.lowers is not None  # an init layer is made only for image layers
    mount_spec = MountSpec(lowers=spec.lowers.with_bottom(state.init_layer), upper=spec.upper, work=spec.work,
                           mountpoint=state.merged, options=list(spec.union_options))
    return (server if server is not None else UnionServer()), mount_spec.server_options().to_json()


def _fork_keeper(spec: SandboxSpec, network: str, state: _State, ready_r: int | None,
                 interpreter: int) -> tuple[int, int, int, int]:
    """Fork K; return its pid and our ends of the status, sync and go pipes (see the docstring)."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # keeper
        def run_keeper() -> int:
            linux.close_fds_except({0, 1, 2, status_w, sync_r, go_r, ready_r, spec.stdin, spec.stdout, spec.stderr,
                                    spec.terminal, spec.console_socket, interpreter})
            return keeper(spec, network, status_w, sync_r, go_r, str(state.merged), ready_r, state.etc_files)

        child_main(status_w, run_keeper)

    os.close(status_w)
    os.close(sync_r)
    os.close(go_r)
    return pid, status_r, sync_w, go_w


def _join_cgroup(directory: Path, pid: int) -> None:
    """Move K into the container's cgroup before it forks the container's first process."""
    try:
        (directory / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        raise ContainerError(f"cannot move the container into its cgroup {directory}: {e.strerror}") from e


def _abandon(pid: int, server: UnionServer | None, slirp: Slirp | None, temp_dir: Path | None) -> None:
    """Undo a start that failed or was cancelled: nothing it made is left running or on disk."""
    kill_quietly(pid, signal.SIGKILL)  # and with it C, by its parent-death signal
    os.waitpid(pid, 0)
    if server is not None:
        server.stop(grace=0)
    if slirp is not None:
        slirp.close()
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _raise_if_cancelled(cancel: CancelCheck | None) -> None:
    signum = cancel() if cancel is not None else None
    if signum is not None:
        log.debug("sandbox: start cancelled by signal %d", signum)
        raise StartInterrupted(signum)


def _raise_event(event: dict[str, object] | None, fallback: str) -> None:
    if event is None or event.get("event") != "error":
        raise ContainerError(fallback)
    code = int(event.get("code", 125))  # type: ignore[call-overload]
    message = str(event.get("message", fallback))
    if code == 127:
        raise CommandNotFound(message)
    if code == 126:
        raise CommandNotInvokable(message)
    if event.get("kind") == "mount":
        raise MountError(message)
    raise ContainerError(message)


def run_sandboxed(spec: SandboxSpec) -> int:
    """Run ``spec`` to completion and return its exit code (128+N if killed by signal N).

    SIGINT, SIGTERM and friends received meanwhile are forwarded to the command when called from the
    main thread. Raises as :func:`start_sandbox` does when the command cannot be started.
    """
    with forward_signals() as forwarder:
        sandbox = start_sandbox(spec)  # cancelled by a stop signal: the forwarder is installed
        forwarder.attach(sandbox)
        return sandbox.wait()


class SignalForwarder:
    """Sends the signals lamina receives to the sandbox's command. Until a sandbox is attached they
    are kept: a stop signal among them cancels the start (:meth:`stop_signal` is the ``cancel``
    check of :func:`start_sandbox`), the others are sent once the command runs."""

    def __init__(self) -> None:
        self._sandbox: Sandbox | None = None
        self._pending: list[int] = []

    def handle(self, signum: int, _frame: object) -> None:
        if self._sandbox is not None:
            self._sandbox.send_signal(signum)
        else:
            self._pending.append(signum)

    def stop_signal(self) -> int | None:
        """The first stop signal (SIGINT, SIGTERM) that came before a sandbox was attached, if any."""
        return next((signum for signum in self._pending if signum in STOP_SIGNALS), None)

    def attach(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        pending, self._pending = self._pending, []
        for signum in pending:
            sandbox.send_signal(signum)


# The forwarder whose handlers are installed: signal dispositions belong to the process, so the
# sandbox started inside forward_signals() learns of its stop signals without being told.
_installed_forwarder: SignalForwarder | None = None


@contextlib.contextmanager
def forward_signals() -> Iterator[SignalForwarder]:
    """Install a :class:`SignalForwarder` (main thread only) for the duration of the block; a
    sandbox started inside it is not started when a stop signal comes first."""
    global _installed_forwarder
    forwarder = SignalForwarder()
    if threading.current_thread() is not threading.main_thread():
        yield forwarder
        return
    previous = {}
    for sig in FORWARDED_SIGNALS:
        if sig == signal.SIGWINCH:
            continue
        previous[sig] = signal.signal(sig, forwarder.handle)
    outer, _installed_forwarder = _installed_forwarder, forwarder
    try:
        yield forwarder
    finally:
        _installed_forwarder = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def call_in_userns(fn: Callable[..., T], *args: object) -> T:
    """Call ``fn(*args)`` in a child process that is root of a user namespace with lamina's id map.

    For work on container files owned by subordinate ids (removing an upper directory, committing
    it): only root of the namespace may read or delete them. The result comes back pickled; a
    LaminaError raised by ``fn`` is re-raised here, anything else becomes a ContainerError.
    """
    mapping = current_mapping()
    if mapping.uids[0].count == 4294967295:  # real root: no namespace needed
        return fn(*args)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(result_r)
            os.close(sync_w)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(result_w, b"u")
            if os.read(sync_r, 1) == b"1":
                try:
                    payload = pickle.dumps((True, fn(*args)))
                except LaminaError as e:
                    payload = pickle.dumps((False, e))
                except BaseException as e:
                    payload = pickle.dumps((False, ContainerError(f"{e}")))
                with os.fdopen(result_w, "wb") as out:
                    out.write(payload)
                code = 0
        finally:
            os._exit(code)
    os.close(result_w)
    os.close(sync_r)
    try:
        with os.fdopen(result_r, "rb") as inp:
            if inp.read(1) != b"u":
                raise ContainerError("cannot create a user namespace")
            apply_mapping(pid, mapping)
            os.write(sync_w, b"1")
            data = inp.read()
    finally:
        os.close(sync_w)
        os.waitpid(pid, 0)
    if not data:
        raise ContainerError("the user namespace helper failed")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value
