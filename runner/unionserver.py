"""The unionfs server of one sandbox: forked (not exec'd) early, attached to the container late.

Most of a container's start-up time is the union filesystem's own start-up: importing pyfuse3 and
trio. So the server process is forked *before* it is needed (by ``lamina run`` as soon as the
command line says so, see :func:`prefork`; otherwise at the start of the sandbox set-up), and
imports them while the caller resolves the image and builds the namespaces. When the keeper's user
namespace is mapped, :meth:`UnionServer.attach` sends the server its arguments and the keeper's
pid; the server joins the keeper's user and mount namespaces and mounts there, so the mount belongs
to the container and vanishes with it. Readiness (or a one-line error) reaches the keeper through
the ``ready`` pipe.

This module imports nothing heavy at module level: the CLI imports it before anything else.

Resource handling: the caller owns the :class:`UnionServer`; :meth:`UnionServer.stop` reaps the
process (it exits by itself once the keeper unmounts) and kills it when it lingers or was never
attached. The server has a parent-death signal, so it never outlives its caller.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

_preforked: UnionServer | None = None


class UnionServer:
    """A forked unionfs server waiting for its mount arguments."""

    def __init__(self) -> None:
        self.ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        attach_r, self._attach_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                code = _serve(attach_r, ready_w)
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(attach_r)
        self._reaped = False

    def attach(self, keeper_pid: int, server_spec: str, log_path: str | None) -> None:
        """Tell the server what to mount (``ServerOptions.to_json()``) and in whose namespaces."""
        message = json.dumps({"keeper": keeper_pid, "spec": server_spec, "log": log_path}).encode()
        os.write(self._attach_w, message)
        os.close(self._attach_w)
        self._attach_w = -1

    def release_ready_pipe(self) -> None:
        """The keeper holds its own copy of the ready pipe; the caller's is not needed."""
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1

    def stop(self, grace: float = 5.0) -> None:
        if self._attach_w >= 0:  # never attached: closing the pipe makes it exit
            os.close(self._attach_w)
            self._attach_w = -1
        self.release_ready_pipe()
        if self._reaped:
            return
        deadline = time.monotonic() + grace
        delay = 0.0005
        while grace > 0 and time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped = True
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self._reaped = True


def prefork() -> None:
    """Fork a server now, for the next sandbox this process starts (see :func:`take`)."""
    global _preforked
    if _preforked is None and not os.environ.get("LAMINA_NO_PREFORK"):
        _preforked = UnionServer()


def maybe_prefork(argv: list[str]) -> None:
    """Prefork when ``argv`` (lamina's arguments) is a foreground ``run``.

    Cheap and conservative: ``run -d`` hands the container to a daemonised monitor, which must own
    its server, so it is skipped; a guess that turns out wrong costs one idle process, stopped by
    :func:`discard`.
    """
    from lamina.argv import requested_verb

    if requested_verb(argv) != "run":
        return
    rest = argv[argv.index("run") + 1:]
    for arg in rest:
        if not arg.startswith("-"):
            break
        if arg in ("-d", "--detach") or (arg.startswith("-") and not arg.startswith("--") and "d" in arg[1:]
                                         and arg[1:].isalpha()):
            return
    prefork()


def take() -> UnionServer | None:
    """The preforked server, if any (it then belongs to the caller)."""
    global _preforked
    server, _preforked = _preforked, None
    return server


def forget_inherited() -> None:
    """In a forked child: a preforked server belongs to the parent, never use it here."""
    global _preforked
    _preforked = None


def discard() -> None:
    server = take()
    if server is not None:
        server.stop()


def _serve(attach_r: int, ready_w: int) -> int:
    from runner import linux

    os.setsid()  # terminal signals are for the container, not for its filesystem
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    linux.close_fds_except({0, 1, 2, attach_r, ready_w})
    try:
        # Imported now, while the caller is busy elsewhere: this is the point of forking early.
        from unionfs.startup import import_fuse_stack, use_import_bundle

        use_import_bundle()
        import_fuse_stack()
        from unionfs.options import ServerOptions, check_dirs
        from unionfs.server import serve

        data = b""
        while chunk := os.read(attach_r, 65536):
            data += chunk
        if not data:
            return 0  # discarded before use
        request = json.loads(data)
        if request.get("log"):
            log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        opts = ServerOptions.from_json(request["spec"])
        check_dirs(opts)
        for name, flag in (("user", linux.CLONE_NEWUSER), ("mnt", linux.CLONE_NEWNS)):
            fd = os.open(f"/proc/{int(request['keeper'])}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            linux.setns(fd, flag)
            os.close(fd)

        def ready() -> None:
            os.write(ready_w, b"1")
            os.close(ready_w)

        serve(opts, ready=ready)
        return 0
    except BaseException as e:
        reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror else str(e)
        try:
            os.write(ready_w, f"union filesystem: {reason or type(e).__name__}".encode())
        except OSError:
            pass
        return 1
