"""Serve a host-visible mount from inside lamina's user namespace.

Unprivileged users with subordinate ids own images and containers whose files belong to those ids
(a container's ``chown 1000 /data; chmod 700 /data``, a Debian image's ``_apt`` cache directory).
A filesystem server running as the user cannot read them; root of lamina's user namespace (which
maps the subordinate range) can. But a mount made inside that namespace is invisible to the user's
shell, and ``fusermount3`` is not setuid inside it.

So the two halves are split, as libfuse allows: ``fusermount3`` mounts in the host namespace and
hands back the ``/dev/fuse`` descriptor (the ``_FUSE_COMMFD`` protocol libfuse itself uses), and the
server is started as root of the user namespace with mount point ``/dev/fd/N``, which libfuse takes
to mean "already mounted, serve this descriptor". The kernel charges file access to the server's
credentials, so the user sees every file of the image; ownership shows the namespace's ids.

Resource handling: :func:`start_userns_server` returns with the mount in place and the server (its
child, detached in its own session) answering; on any failure it unmounts and kills what it made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lamina.errors import MountError

log = logging.getLogger(__name__)

FSNAME = "lamina-unionfs"
SUBTYPE = "lamina"


def wants_userns() -> bool:
    """True when files may belong to subordinate ids: an unprivileged user with an id range."""
    if os.geteuid() == 0:
        return False
    from runner.idmap import current_mapping

    return not current_mapping().single


def _fusermount_fd(mountpoint: Path) -> int:
    """Mount ``mountpoint`` with fusermount3 in this namespace; return the /dev/fuse descriptor."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        try:
            result = subprocess.run(
                ["fusermount3", "-o", f"fsname={FSNAME},subtype={SUBTYPE}", "--", str(mountpoint)],
                env=env, pass_fds=[theirs.fileno()], capture_output=True, text=True, timeout=30,
                check=False)
        except FileNotFoundError as e:
            raise MountError("fusermount3 not found: install the fuse3 package") from e
        theirs.close()
        if result.returncode != 0:
            raise MountError(f"cannot mount {mountpoint}: {result.stderr.strip() or 'fusermount3 failed'}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"fusermount3 mounted {mountpoint} but sent no descriptor")
        fd = fds[0]
        if fd <= 2:
            # The child puts /dev/null and the log on 0-2; keep the descriptor clear of them.
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            fd = high
        return fd
    finally:
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()


def start_userns_server(argv_for: Callable[[Path], list[str]], mountpoint: Path, log_path: Path,
                        timeout: float) -> int:
    """Mount ``mountpoint`` and serve it with ``argv_for(Path('/dev/fd/N'))``; return the server pid.

    Error handling: :class:`MountError` with the server's log when it fails or does not answer in
    ``timeout`` seconds; the mount is then removed and the server killed.
    """
    from runner import linux
    from runner.idmap import apply_mapping, current_mapping

    mapping = current_mapping()
    fuse_fd = _fusermount_fd(mountpoint)
    argv = argv_for(Path(f"/dev/fd/{fuse_fd}"))
    log.debug("serving %s from lamina's user namespace: %s", mountpoint, argv)
    step_r, step_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only execs
        try:
            os.setsid()
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(step_w, b"u")
            if os.read(go_r, 1) == b"1":
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.set_inheritable(fuse_fd, True)
                os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(step_w)
    os.close(go_r)
    os.close(log_fd)
    try:
        try:
            if os.read(step_r, 1) != b"u":
                raise MountError("cannot create a user namespace for the filesystem server")
            apply_mapping(pid, mapping)
            os.write(go_w, b"1")
        finally:
            os.close(step_r)
            os.close(go_w)
            # Only the server may hold the connection: if it dies, the mount must fail, not hang.
            os.close(fuse_fd)
        _wait_answering(pid, mountpoint, log_path, timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
        raise
    return pid


def _wait_answering(pid: int, mountpoint: Path, log_path: Path, timeout: float) -> None:
    """Wait until a stat() of the mount root is answered (it blocks until the server serves)."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            os.stat(mountpoint)
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, name="mount-probe", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.005)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise MountError(f"unionfs exited with status {os.waitstatus_to_exitcode(status)} before "
                             f"serving {mountpoint}: {log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise MountError(f"unionfs did not answer on {mountpoint} within {timeout:.0f} s: "
                             f"{log_tail(log_path)}")
    error = outcome[0] if outcome else None
    if error is not None:
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error)
        if isinstance(error, OSError) and error.errno == errno.ENOTCONN:
            reason = "the server went away"
        raise MountError(f"unionfs did not serve {mountpoint}: {reason}: {log_tail(log_path)}")


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a server log, as one line for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
