"""``lamina exec``: run another command inside a running container's namespaces.

The helper process joins the container init's user namespace first (only then does it hold the
capabilities to join the others), then its mount, UTS, IPC, network and PID namespaces; joining a
PID namespace only applies to children, so it forks once more, and that child drops privileges
exactly as the container's own command did and execs. Namespaces the container shares with the
host (``--network host``) are not joined.

The helper runs from a sealed copy of the interpreter with an empty environment, non-dumpable,
holding only the namespace descriptors, its status pipe, the terminal and 0, 1, 2 (see
:mod:`runner.sealed`): the container sees neither the caller's environment nor a host binary nor a
host descriptor while it prepares the command.

``exec -it`` can be detached from, as docker's (``--detach-keys``, ctrl-p,ctrl-q by default): the
command must outlive this process then, yet the helper and the command die with their parent
(PR_SET_PDEATHSIG, so that a killed ``lamina exec`` leaves nothing behind). So an interactive
terminal exec starts the helper from a keeper process of its own: the keeper dies with ``lamina
exec`` until the user detaches; then ``lamina exec`` hands it the terminal's master, the keeper
stops dying with its parent, drains the command's output (nobody reads it, as with docker) and
waits for the helper; ``lamina exec`` exits 1 with docker's "read escape sequence".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import termios
from collections.abc import Callable
from typing import Any, NoReturn

from lamina.errors import ContainerError
from runner import linux, sealed, tty
from runner.attach import Detached, EscapeMatcher
from runner.sandbox import _EventReader, _raise_event
from runner.sandbox_init import (
    DEFAULT_PATH,
    FORWARDED_SIGNALS,
    Privileges,
    child_main,
    container_privileges,
    exec_command,
    exit_code,
)
from runner.state import Container
from runner.userdb import resolve_user

KEEPER_ACK_TIMEOUT_S = 30.0
NAMESPACES = (("user", linux.CLONE_NEWUSER), ("mnt", linux.CLONE_NEWNS), ("uts", linux.CLONE_NEWUTS),
              ("ipc", linux.CLONE_NEWIPC), ("net", linux.CLONE_NEWNET), ("pid", linux.CLONE_NEWPID))


def _open_namespaces(pid: int) -> list[tuple[int, int]]:
    fds = []
    try:
        for name, flag in NAMESPACES:
            path = f"/proc/{pid}/ns/{name}"
            if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
    except OSError as e:
        for fd, _ in fds:
            os.close(fd)
        raise ContainerError(f"cannot open the container's namespaces: {e.strerror}") from e
    return fds


def exec_in_container(container: Container, argv: list[str], env: dict[str, str], user: str,
                      workdir: str, use_tty: bool, interactive: bool, detach_keys: bytes | None = None) -> int:
    """Run ``argv`` in ``container`` and return its exit code (126/127 raised as docker does).
    With a terminal, input and ``detach_keys``, typing the keys leaves the command running and
    raises :class:`Detached`."""
    if not container.running or not container.state.pid:
        raise ContainerError(f"container {container.name} is not running")
    sealed.sealed_interpreter()  # made once, here, rather than in the child (and can fail here)
    ns_fds = _open_namespaces(container.state.pid)
    console = theirs = None
    if use_tty:
        # The helper makes the pty inside the container (its own devpts: `tty` says /dev/pts/N
        # there) and sends the master back on this socket.
        console, theirs_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs = theirs_socket.detach()
        env.setdefault("TERM", "xterm")  # as docker: not the caller's
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    keeper = theirs_keeper = None
    if use_tty and interactive and detach_keys:
        keeper, theirs_keeper = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        def start_helper() -> int:
            job = (ns_fds, argv, env, user, workdir, theirs, interactive, status_w, container_privileges(container))
            sealed.exec_sealed("exec-helper", job, {0, 1, 2, status_w, theirs, *(fd for fd, _ in ns_fds)})

        os.close(status_r)
        if theirs_keeper is None:
            child_main(status_w, start_helper)
        assert keeper is not None
        keeper.close()
        _keep(os.getppid(), theirs_keeper, status_w, [theirs, *(fd for fd, _ in ns_fds)],
              lambda: child_main(status_w, start_helper))
    if theirs_keeper is not None:
        theirs_keeper.close()
    os.close(status_w)
    for fd, _ in ns_fds:
        os.close(fd)
    if theirs is not None:
        os.close(theirs)
    events = _EventReader(status_r)
    error = None
    while (event := events.next()) is not None:
        if event.get("event") == "error" and error is None:
            error = event
    os.close(status_r)
    master = None
    if console is not None:
        with console:
            if error is None:
                master = tty.receive_terminal(console)
    previous = {sig: signal.signal(sig, lambda signum, _f: _kill(pid, signum))
                for sig in FORWARDED_SIGNALS if sig != signal.SIGWINCH}
    try:
        if master is not None:
            stdin_fd = sys.stdin.fileno() if interactive else None
            matcher = EscapeMatcher(detach_keys) if keeper is not None and detach_keys else None
            with tty.raw_terminal(sys.stdin.fileno()) if interactive else contextlib.nullcontext():
                detached = tty.relay(master, stdin_fd, sys.stdout.fileno(), lambda: False,
                                     input_filter=matcher.feed if matcher is not None else None)
            if detached and keeper is not None:
                _hand_over(keeper, master)
                raise Detached()
            os.close(master)
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keeper is not None:
            keeper.close()
    if error is not None:
        _raise_event(error, "exec failed")
    return exit_code(status)


def _keep(parent: int, client: socket.socket, status_w: int, close: list[int | None],
          start_helper: Callable[[], NoReturn]) -> NoReturn:
    """The keeper of a detachable exec (see the module's docstring): the helper's parent; its exit
    code is the helper's."""
    code = 125
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # until the user detaches
        if os.getppid() != parent:
            os._exit(code)
        os.setsid()  # not in the caller's job: the shell may hang it up once it has detached
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):  # all the command's input and output go through its pty
            os.dup2(null, target)
        os.close(null)
        helper = os.fork()
        if helper == 0:
            start_helper()
        os.close(status_w)
        for fd in close:
            if fd is not None:
                os.close(fd)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, lambda signum, _f: _kill(helper, signum))
        _wait_draining(helper, client)
        _, status = os.waitpid(helper, 0)
        code = exit_code(status)
    finally:
        os._exit(code)


def _hand_over(keeper: socket.socket, master: int) -> None:
    """Give the keeper the terminal's master, and wait until it no longer dies with this process."""
    socket.send_fds(keeper, [b"d"], [master])  # the keeper drains it from now on
    keeper.settimeout(KEEPER_ACK_TIMEOUT_S)
    try:
        if keeper.recv(1) != b"k":
            raise ContainerError("the exec's keeper went away: the command may have ended")
    except TimeoutError:
        raise ContainerError("the exec's keeper did not answer: the command may end with this process") from None


def _wait_draining(helper: int, client: socket.socket) -> None:
    """Until ``helper`` exits: take the terminal's master when the client detaches, and read
    (and drop) the command's output from it."""
    helper_fd = os.pidfd_open(helper)
    watched: list[int | socket.socket] = [helper_fd, client]
    master = None
    while helper_fd not in (readable := select.select(watched, [], [])[0]):
        if client in readable:
            watched.remove(client)
            with contextlib.suppress(OSError):
                _, fds, _, _ = socket.recv_fds(client, 1, 1)
                if fds:
                    linux.prctl(linux.PR_SET_PDEATHSIG, 0)
                    client.sendall(b"k")  # only now may the client exit
                    master = fds[0]
                    watched.append(master)
        if master is not None and master in readable and not tty.read_master(master):
            watched.remove(master)
    os.close(helper_fd)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def sealed_exec_helper(*job: Any) -> NoReturn:
    """The helper, in the sealed interpreter (:mod:`runner.sealed`): join, fork, exec."""
    child_main(job[7], lambda: _helper(*job))


def _helper(ns_fds: list[tuple[int, int]], argv: list[str], env: dict[str, str], user_spec: str,
            workdir: str, console: int | None, interactive: bool, status_w: int,
            privileges: Privileges | None = None) -> int:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for fd, flag in ns_fds:
        linux.setns(fd, flag)
        os.close(fd)
    slave = None
    if console is not None:
        # /dev/ptmx is the container's now: the pty is one of its own.
        master, slave = os.openpty()
        with socket.socket(fileno=console) as sock:
            socket.send_fds(sock, [b"t"], [master])
        os.close(master)
    user = resolve_user(user_spec, "/etc/passwd" if os.path.isfile("/etc/passwd") else None,
                        "/etc/group" if os.path.isfile("/etc/group") else None)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", user.home)
    child = os.fork()
    if child == 0:
        def command() -> NoReturn:
            if slave is not None:
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for target in (0, 1, 2):
                    os.dup2(slave, target)
            elif not interactive:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
            exec_command(argv, env, workdir, user, status_w, privileges=privileges)

        child_main(status_w, command)
    os.close(status_w)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _f: _kill(child, signum))
    _, status = os.waitpid(child, 0)
    return exit_code(status)
