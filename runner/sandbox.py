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
import fcntl
import json
import logging
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import termios
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

from lamina.errors import CommandNotFound, CommandNotInvokable, ContainerError, LaminaError, MountError
from runner import linux, sealed, unionserver
from runner.idmap import apply_mapping, current_mapping, is_mapped
from runner.network import SLIRP_DNS, SLIRP_GUEST_IP, PortMapping, Slirp, loopback_up, normalize_network
from runner.rootfs import MountRequest, make_init_layer, pivot_into, prepare_root
from runner.seccomp import install_filter  # imported here: after pivot_root nothing can be imported
from runner.unionserver import UnionServer
from runner.userdb import ExecUser, resolve_user
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T = TypeVar("T")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH)
# Signals that mean "stop": one that comes before the command runs cancels its start.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
UNION_READY_TIMEOUT = 15.0


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
    pty that becomes the command's controlling terminal and /dev/console. ``seccomp`` applies
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


def _send(fd: int, **event: object) -> None:
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    except OSError:
        pass


def _exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 125


def _hosts_file(hostname: str, network: str) -> str:
    own_ip = SLIRP_GUEST_IP if network == "slirp" else "127.0.1.1"
    return ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{own_ip}\t{hostname}\n")


def _resolv_conf(network: str) -> str:
    if network == "slirp":
        return f"nameserver {SLIRP_DNS}\n"
    try:
        with open("/etc/resolv.conf") as f:
            return f.read()
    except OSError:
        return ""


def write_etc_files(state_dir: Path, hostname: str, network: str) -> dict[str, str]:
    """Write the per-container /etc files into ``state_dir``; return {name in /etc: host path}."""
    contents = {"hosts": _hosts_file(hostname, network), "hostname": hostname + "\n",
                "resolv.conf": _resolv_conf(network)}
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
                 server: UnionServer | None = None) -> None:
        self.keeper_pid = keeper_pid
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
                self.returncode = _exit_code(status)
                self._cleanup()
        return self.returncode

    def wait(self) -> int:
        """Wait for the command to exit; return its exit code (128+N when killed by signal N)."""
        if self.returncode is None:
            _, status = os.waitpid(self.keeper_pid, 0)
            self.returncode = _exit_code(status)
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
    temp_dir = None
    if spec.state_dir is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="lamina-sandbox-"))
        os.chmod(temp_dir, 0o755)
    state_dir = spec.state_dir or temp_dir
    assert state_dir is not None
    try:
        etc_files = write_etc_files(state_dir, spec.hostname, network)
        init_layer = make_init_layer(state_dir / "init") if spec.rootfs is None else None
        merged = state_dir / "merged"
        merged.mkdir(exist_ok=True)
    except OSError as e:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise ContainerError(f"cannot prepare container state in {state_dir}: {e.strerror}") from e

    server_spec = ""
    if init_layer is None:
        if server is not None:
            server.stop()
            server = None
    else:
        from unionfs.mount import MountSpec

        assert spec.lowers is not None  # an init layer is made only for image layers
        mount_spec = MountSpec(lowers=spec.lowers.with_bottom(init_layer), upper=spec.upper, work=spec.work,
                               mountpoint=merged, options=list(spec.union_options))
        server_spec = mount_spec.server_options().to_json()
        if server is None:
            server = UnionServer()
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    ready_r = server.ready_r if server is not None else None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # keeper
        def keeper() -> int:
            linux.close_fds_except({0, 1, 2, status_w, sync_r, go_r, ready_r, spec.stdin, spec.stdout, spec.stderr,
                                    spec.terminal, interpreter})
            return _keeper(spec, network, status_w, sync_r, go_r, str(merged), ready_r, etc_files)

        child_main(status_w, keeper)

    os.close(status_w)
    os.close(sync_r)
    os.close(go_r)
    slirp: Slirp | None = None
    startup = _Startup(status_r)
    try:
        _raise_if_cancelled(cancel)
        if not startup.read_until("unshared"):
            _raise_event(startup.error, "the sandbox did not start")
        apply_mapping(pid, mapping)
        log.debug("sandbox: namespaces made and id maps written")
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
        _kill_quietly(pid, signal.SIGKILL)  # and with it C, by its parent-death signal
        os.waitpid(pid, 0)
        if server is not None:
            server.stop(grace=0)
        if slirp is not None:
            slirp.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        for fd in (sync_w, go_w, status_r):
            os.close(fd)
    log.debug("sandbox: command started as pid %d", startup.container_pid)
    if server is not None:
        server.release_ready_pipe()
    return Sandbox(pid, startup.container_pid, slirp, temp_dir, server)


def child_main(status_w: int, body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in a forked child and ``_exit`` with its result: a child must never return into
    the caller's stack. A failure is reported on ``status_w`` as an error event with docker's exit
    code (125 for lamina's own errors, 126/127 for the command's)."""
    code = 125
    try:
        code = body()
    except LaminaError as e:
        code = e.exit_code
        _send(status_w, event="error", code=code, message=str(e))
    except OSError as e:
        _send(status_w, event="error", code=125,
              message=f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except BaseException as e:
        _send(status_w, event="error", code=125, message=f"internal error: {e!r}")
    finally:
        os._exit(code)


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


# --- inside the namespaces ---------------------------------------------------------------------------


def _keeper(spec: SandboxSpec, network: str, status_w: int, sync_r: int, go_r: int,
            merged: str, ready_r: int | None, etc_files: dict[str, str]) -> int:
    os.setsid()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    flags = linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
    if network != "host":
        flags |= linux.CLONE_NEWNET
    try:
        linux.unshare(flags)
    except OSError as e:
        raise ContainerError(f"cannot create the container's namespaces: {e.strerror} (are unprivileged user "
                             "namespaces disabled? see sysctl user.max_user_namespaces)") from e
    _send(status_w, event="unshared")
    if os.read(sync_r, 1) != b"1":
        return 125
    os.close(sync_r)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    root = merged if ready_r is not None else str(spec.rootfs)
    linux.unshare(linux.CLONE_NEWPID)
    # C starts its sealed interpreter (see runner.sealed) while the union is being mounted, and
    # waits for *mounted* before it makes its own mount namespace (a copy of this one).
    mounted_r, mounted_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        def start_init() -> int:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            sealed.exec_sealed("container-init", (spec, network, root, status_w, go_r, etc_files, mounted_r),
                               {0, 1, 2, status_w, go_r, mounted_r, spec.stdin, spec.stdout, spec.stderr,
                                spec.terminal})

        child_main(status_w, start_init)
    for fd in (go_r, mounted_r):
        os.close(fd)
    _send(status_w, event="pid", pid=pid)
    if ready_r is not None:
        _wait_union_ready(ready_r)
        log.debug("sandbox: union mounted")
    os.write(mounted_w, b"1")
    os.close(mounted_w)
    os.close(status_w)
    _, status = os.waitpid(pid, 0)
    log.debug("sandbox: command exited")
    if ready_r is not None:
        # The server shares this mount namespace: unmounting here ends its session.
        try:
            linux.umount2(merged, linux.MNT_DETACH)
        except OSError as e:
            log.debug("unmounting %s: %s", merged, e)
    return _exit_code(status)


def _wait_union_ready(ready_r: int) -> None:
    ready, _, _ = select.select([ready_r], [], [], UNION_READY_TIMEOUT)
    message = os.read(ready_r, 4096) if ready else b""
    if message != b"1":
        text = message.decode(errors="replace").strip()
        if not ready:
            text = "the union filesystem did not become ready in time"
        raise MountError(text or "the union filesystem exited before mounting")
    os.close(ready_r)


def sealed_container_init(spec: SandboxSpec, network: str, root: str, status_w: int, go_r: int,
                          etc_files: dict[str, str], mounted_r: int) -> NoReturn:
    """C, in the sealed interpreter (:mod:`runner.sealed`): wait for K's union, then be PID 1."""
    def init() -> int:
        # Killing K must kill C at every stage: the start may be cancelled after "go", and an --init
        # reaper stays this process (the exec'd command sets its own again, after dropping privileges).
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.read(mounted_r, 1) != b"1":
            return 125  # K is gone, and has said why
        os.close(mounted_r)
        _container_init(spec, network, root, status_w, go_r, etc_files)

    child_main(status_w, init)


def _container_init(spec: SandboxSpec, network: str, root: str, status_w: int, go_r: int,
                    etc_files: dict[str, str]) -> NoReturn:
    """PID 1 of the container: prepare the root, pivot, drop privileges, exec (never returns)."""
    linux.unshare(linux.CLONE_NEWNS)
    console = os.ttyname(spec.terminal) if spec.terminal is not None else None
    user_mounts = [MountRequest(m.target, m.kind, str(m.source) if m.source else None, m.readonly, m.options)
                   for m in spec.mounts]
    prepare_root(root, cwd=spec.cwd, create_cwd=spec.create_cwd, etc_files=etc_files, mounts=user_mounts,
                 console=console, own_netns=network != "host", readonly=spec.readonly_rootfs,
                 gid5_mapped=is_mapped(5, "/proc/self/gid_map"))
    user = resolve_user(spec.user, _existing(root, "/etc/passwd"), _existing(root, "/etc/group"))
    if network != "host":
        loopback_up()
    try:
        linux.sethostname(spec.hostname)
    except OSError as e:
        raise ContainerError(f"cannot set hostname {spec.hostname!r}: {e.strerror}") from e
    _send(status_w, event="prepared")
    if os.read(go_r, 1) != b"1":
        raise ContainerError("aborted before start")
    os.close(go_r)
    pivot_into(root)

    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", spec.hostname)
    env.setdefault("HOME", user.home)
    _apply_stdio(spec)
    if spec.init:
        _run_init_reaper(spec, user, env, status_w)
    _exec_command(spec.argv, env, spec.cwd, user, status_w, spec.create_cwd, spec.seccomp)


def _existing(root: str, path: str) -> str | None:
    from runner.paths import resolve_in_root

    resolved = resolve_in_root(root, path)
    return resolved if os.path.isfile(resolved) else None


def _apply_stdio(spec: SandboxSpec) -> None:
    if spec.terminal is not None:
        os.setsid()
        fcntl.ioctl(spec.terminal, termios.TIOCSCTTY, 0)
        for target in (0, 1, 2):
            os.dup2(spec.terminal, target)
        return
    for fd, target in ((spec.stdin, 0), (spec.stdout, 1), (spec.stderr, 2)):
        if fd is not None and fd != target:
            os.dup2(fd, target)


def _drop_privileges(user_uid: int, user_gid: int, groups: list[int], seccomp: bool = True) -> None:
    keep = linux.cap_mask(linux.DOCKER_DEFAULT_CAPS)
    linux.restrict_capabilities(keep)
    if _setgroups_allowed():
        os.setgroups(groups)
    try:
        os.setresgid(user_gid, user_gid, user_gid)
        os.setresuid(user_uid, user_uid, user_uid)
    except OSError as e:
        raise ContainerError(f"cannot switch to uid {user_uid} gid {user_gid}: {e.strerror} (ids outside the "
                             "user namespace's map: is the user given subordinate ids in /etc/subuid?)") from e
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if seccomp:
        install_filter()


def _setgroups_allowed() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "allow"
    except OSError:
        return False


def _exec_command(argv: list[str], env: dict[str, str], cwd: str, user: ExecUser, status_w: int,
                  create_cwd: bool = False, seccomp: bool = True) -> NoReturn:
    """Enter ``cwd``, drop to ``user`` and exec ``argv`` (already inside the container's root).

    Every descriptor but 0, 1, 2 and ``status_w`` (close-on-exec) is closed *before* entering
    ``cwd``: a working directory such as ``/proc/self/fd/N`` must not reach a host directory through
    a descriptor of ours (CVE-2024-21626), and one that lies outside the container's root anyway is
    refused, as runc does."""
    os.closerange(3, status_w)
    os.closerange(status_w + 1, 1 << 16)
    try:
        try:
            os.chdir(cwd or "/")
        except FileNotFoundError:
            if not create_cwd:
                raise
            # The directory made before the mounts was hidden by a volume mounted over a parent:
            # make it again, now that "/" is the container's root (so it cannot lead outside).
            os.makedirs(cwd, 0o755, exist_ok=True)
            os.chdir(cwd)
        os.getcwd()  # ENOENT when the directory is not reachable from the container's root
    except OSError as e:
        raise ContainerError(f"cannot enter working directory {cwd}: {e.strerror}") from e
    _drop_privileges(user.uid, user.gid, user.groups, seccomp)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in range(1, signal.NSIG):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    program = argv[0]
    try:
        if "/" in program:
            os.execve(program, argv, env)
        else:
            os.execvpe(program, argv, env)
    except FileNotFoundError as e:
        if "/" in program:
            message = f'exec: "{program}": stat {program}: no such file or directory'
        else:
            message = f'exec: "{program}": executable file not found in $PATH'
        raise CommandNotFound(message) from e
    except PermissionError as e:
        raise CommandNotInvokable(f'exec: "{program}": permission denied') from e
    except OSError as e:
        raise CommandNotInvokable(f'exec: "{program}": {e.strerror}') from e


def _run_init_reaper(spec: SandboxSpec, user: ExecUser, env: dict[str, str], status_w: int) -> NoReturn:
    """``--init``: stay as PID 1, run the command as a child, forward signals, reap every orphan."""
    child = os.fork()
    if child == 0:
        def command() -> NoReturn:
            if spec.terminal is not None:
                # The command's own process group owns the terminal, so Ctrl-C reaches it, not us.
                os.setpgid(0, 0)
                signal.signal(signal.SIGTTOU, signal.SIG_IGN)
                os.tcsetpgrp(0, os.getpid())
            _exec_command(spec.argv, env, spec.cwd, user, status_w, spec.create_cwd, spec.seccomp)

        child_main(status_w, command)
    os.close(status_w)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _kill_quietly(child, signum))
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(125)
        if pid == child:
            os._exit(_exit_code(status))


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


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
