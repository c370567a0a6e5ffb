"""What runs inside a sandbox's namespaces: the keeper K and the container's init C.

See :mod:`runner.sandbox` for the process tree and the pipes. Everything here runs in a forked
child and ends in ``_exit`` or ``exec``: never returns into the caller's stack. C imports nothing
after ``pivot_root`` (there is no Python library left to import from), so every module it needs is
imported at the top of this one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource as resource_module
import select
import signal
import socket
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from lamina.errors import CommandNotFound, CommandNotInvokable, ContainerError, LaminaError, MountError
from runner import linux, sealed
from runner.idmap import is_mapped
from runner.network import loopback_up
from runner.rootfs import MountRequest, open_console, pivot_into, prepare_root
from runner.runflags import ULIMITS, rlimits
from runner.seccomp import install_filter  # imported here: after pivot_root nothing can be imported
from runner.userdb import ExecUser, resolve_user

if TYPE_CHECKING:
    from runner.sandbox import SandboxSpec
    from runner.state import Container

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH)
UNION_READY_TIMEOUT = 15.0


def send_event(fd: int, **event: object) -> None:
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    except OSError:
        pass


def exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 125


def child_main(status_w: int, body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in a forked child and ``_exit`` with its result: a child must never return into
    the caller's stack. A failure is reported on ``status_w`` as an error event with docker's exit
    code (125 for lamina's own errors, 126/127 for the command's)."""
    code = 125
    try:
        code = body()
    except LaminaError as e:
        code = e.exit_code
        send_event(status_w, event="error", code=code, message=str(e))
    except OSError as e:
        send_event(status_w, event="error", code=125,
              message=f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except BaseException as e:
        send_event(status_w, event="error", code=125, message=f"internal error: {e!r}")
    finally:
        os._exit(code)


def keeper(spec: SandboxSpec, network: str, status_w: int, sync_r: int, go_r: int,
            merged: str, ready_r: int | None, etc_files: dict[str, str]) -> int:
    os.setsid()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    flags = linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
    if network != "host":
        flags |= linux.CLONE_NEWNET
    if spec.ipc == "host":
        flags &= ~linux.CLONE_NEWIPC
    if spec.join_network_of is not None:
        _join_network_of(spec.join_network_of)
        flags &= ~(linux.CLONE_NEWUSER | linux.CLONE_NEWNET)
    if spec.join_ipc_of is not None:
        _join_ipc_of(spec.join_ipc_of, user_joined=spec.join_network_of is not None)
        flags &= ~(linux.CLONE_NEWUSER | linux.CLONE_NEWIPC)
    try:
        linux.unshare(flags)
    except OSError as e:
        raise ContainerError(f"cannot create the container's namespaces: {e.strerror} (are unprivileged user "
                             "namespaces disabled? see sysctl user.max_user_namespaces)") from e
    send_event(status_w, event="unshared")
    if os.read(sync_r, 1) != b"1":
        return 125
    os.close(sync_r)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    root = merged if ready_r is not None else str(spec.rootfs)
    if not spec.pid_host:
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
                                spec.terminal, spec.console_socket})

        child_main(status_w, start_init)
    for fd in (go_r, mounted_r):
        os.close(fd)
    send_event(status_w, event="pid", pid=pid)
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
    return exit_code(status)


def _enter_namespaces(pid: int, names: tuple[str, ...]) -> None:
    """setns into the namespaces ``names`` (``user`` first: we own it and get every capability
    there) of the container process ``pid``."""
    flags = {"user": linux.CLONE_NEWUSER, "net": linux.CLONE_NEWNET, "ipc": linux.CLONE_NEWIPC}
    for name in names:
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, flags[name])
        finally:
            os.close(fd)


def _join_network_of(pid: int) -> None:
    """Enter the user and then the network namespace of the container process ``pid``."""
    try:
        _enter_namespaces(pid, ("user", "net"))
    except OSError as e:
        raise ContainerError(f"cannot join the network of the container process {pid}: {e.strerror}") from e


def _join_ipc_of(pid: int, user_joined: bool) -> None:
    """Enter the user namespace of the container process ``pid`` (unless the network's owner's
    was entered already: a second, different one cannot be) and then its IPC namespace."""
    try:
        _enter_namespaces(pid, ("ipc",) if user_joined else ("user", "ipc"))
    except OSError as e:
        raise ContainerError(f"cannot join the IPC namespace of the container process {pid}: {e.strerror}"
                             + (" (its network is another container's)" if user_joined else "")) from e


def _shm_source(spec: SandboxSpec) -> str | None:
    """What /dev/shm is: "" a tmpfs of its own, None nothing, else the path to bind. A container
    that joins another's IPC namespace keeps a /dev/shm of its own: the other's tmpfs lives in
    that container's mount namespace, which a bind cannot reach (docker binds the donor's, which
    it mounts on the host; a documented difference)."""
    return {"none": None, "host": "/dev/shm"}.get(spec.ipc, "")


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
                 gid5_mapped=is_mapped(5, "/proc/self/gid_map"), shm_size=spec.shm_size,
                 unmask_proc=spec.unmask_proc, host_proc=spec.pid_host, shm_source=_shm_source(spec))
    if spec.console_socket is not None:
        spec.terminal = _hand_over_console(root, spec.console_socket)
    user = resolve_user(spec.user, _existing(root, "/etc/passwd"), _existing(root, "/etc/group"))
    if network != "host":
        loopback_up()
    try:
        linux.sethostname(spec.hostname)
    except OSError as e:
        raise ContainerError(f"cannot set hostname {spec.hostname!r}: {e.strerror}") from e
    send_event(status_w, event="prepared")
    if os.read(go_r, 1) != b"1":
        raise ContainerError("aborted before start")
    os.close(go_r)
    pivot_into(root)

    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", spec.hostname)
    env.setdefault("HOME", user.home)
    _apply_stdio(spec)
    if spec.worker is not None:
        os.close(status_w)  # as an exec would: the start is complete
        os._exit(spec.worker(0))
    if spec.init:
        _run_init_reaper(spec, user, env, status_w)
    exec_command(spec.argv, env, spec.cwd, user, status_w, spec.create_cwd, spec_privileges(spec))


def spec_privileges(spec: SandboxSpec) -> Privileges:
    caps = tuple(spec.capabilities) if spec.capabilities is not None else linux.DOCKER_DEFAULT_CAPS
    return Privileges(spec.seccomp, caps, spec.no_new_privileges, tuple(spec.ulimits))


def container_privileges(container: Container) -> Privileges:
    """A container's privileges from its record (``lamina exec`` gives its commands the same)."""
    caps = tuple(container.capabilities) if container.capabilities is not None else linux.DOCKER_DEFAULT_CAPS
    return Privileges(container.seccomp, caps, container.no_new_privileges, tuple(rlimits(container.ulimits)))


def _hand_over_console(root: str, console_socket: int) -> int:
    """Make the container's pty, send its master to lamina; the slave, to become the terminal."""
    master, slave = open_console(root)
    with socket.socket(fileno=console_socket) as sock:
        socket.send_fds(sock, [b"t"], [master])
    os.close(master)
    return slave


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


@dataclass(frozen=True)
class Privileges:
    """What the command may do: docker's default is its 14 capabilities, the seccomp filter, and
    no ``no_new_privs`` (``--security-opt no-new-privileges`` sets it). ``ulimits`` are
    (RLIMIT_*, soft, hard) with -1 for unlimited."""

    seccomp: bool = True
    capabilities: tuple[str, ...] = linux.DOCKER_DEFAULT_CAPS
    no_new_privileges: bool = True
    ulimits: tuple[tuple[int, int, int], ...] = ()


def _apply_ulimits(ulimits: tuple[tuple[int, int, int], ...]) -> None:
    for resource, soft, hard in ulimits:
        limits = (resource_value(soft), resource_value(hard))
        try:
            resource_module.setrlimit(resource, limits)
        except (OSError, ValueError, OverflowError) as e:
            name = next((k for k, v in ULIMITS.items() if v == resource), str(resource))
            raise ContainerError(f"--ulimit {name}={soft}:{hard}: setrlimit: "
                                 f"{getattr(e, 'strerror', None) or e} (a hard limit above lamina's own "
                                 "needs CAP_SYS_RESOURCE on the host)") from e


def resource_value(limit: int) -> int:
    return resource_module.RLIM_INFINITY if limit == -1 else limit


def _drop_privileges(user_uid: int, user_gid: int, groups: list[int], privileges: Privileges) -> None:
    _apply_ulimits(privileges.ulimits)
    if privileges.no_new_privileges:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if privileges.seccomp:
        # Installed while this process still has CAP_SYS_ADMIN in the container's user namespace,
        # so that no_new_privs stays the user's choice, as in docker.
        install_filter()
    keep = linux.cap_mask(privileges.capabilities)
    linux.limit_bounding_set(keep)
    # The ids change while CAP_SETUID/CAP_SETGID are still held (--cap-drop ALL drops them too); a
    # non-root user then has no capability left, as in docker, and root keeps exactly ``keep``.
    if _setgroups_allowed():
        os.setgroups(groups)
    try:
        os.setresgid(user_gid, user_gid, user_gid)
        os.setresuid(user_uid, user_uid, user_uid)
    except OSError as e:
        raise ContainerError(f"cannot switch to uid {user_uid} gid {user_gid}: {e.strerror} (ids outside the "
                             "user namespace's map: is the user given subordinate ids in /etc/subuid?)") from e
    linux.keep_only(keep if user_uid == 0 else 0)


def _setgroups_allowed() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "allow"
    except OSError:
        return False


def exec_command(argv: list[str], env: dict[str, str], cwd: str, user: ExecUser, status_w: int,
                  create_cwd: bool = False, privileges: Privileges | None = None) -> NoReturn:
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
    _drop_privileges(user.uid, user.gid, user.groups, privileges or Privileges())
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
            exec_command(spec.argv, env, spec.cwd, user, status_w, spec.create_cwd, spec_privileges(spec))

        child_main(status_w, command)
    os.close(status_w)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: kill_quietly(child, signum))
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(125)
        if pid == child:
            os._exit(exit_code(status))


def kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
