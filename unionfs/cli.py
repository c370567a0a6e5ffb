"""lamina-unionfs: mount a union of directories (fuse-overlayfs's command line).

Without ``-f`` the process forks: the parent waits on a pipe until the child's mount is ready, then
exits 0 without printing anything; if the child fails, the parent prints its one-line error and exits
1. Errors in the command line itself are found before forking.
"""

from __future__ import annotations

import gc
import os
import sys

from unionfs.startup import defer_unused_modules, use_import_bundle

# This process serves one mount and does nothing else: before anything else is imported, imports
# may come from one bundle file, and modules it never uses are put off (see unionfs.startup).
use_import_bundle()
defer_unused_modules()

import logging  # noqa: E402

from unionfs.options import HELP, HelpRequested, OptionError, ServerOptions, parse_args  # noqa: E402

log = logging.getLogger("unionfs")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="lamina-unionfs: %(levelname)s %(name)s: %(message)s")


def _log_to_syslog() -> None:
    """A daemon has no terminal: its warnings and errors go to syslog (when there is one)."""
    if not os.path.exists("/dev/log"):
        return
    from logging.handlers import SysLogHandler

    try:
        handler = SysLogHandler(address="/dev/log")
    except OSError:
        return
    handler.setFormatter(logging.Formatter("lamina-unionfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def _error(msg: str) -> int:
    sys.stderr.write(f"lamina-unionfs: error: {msg}\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    # Start-up (trio and pyfuse3 above all) makes tens of thousands of objects that live for good:
    # cyclic collections meanwhile walk them again and again for nothing (~10 ms of a mount's CPU).
    # The server turns collection back on, tuned, once it serves (unionfs.server).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:
        if collecting:
            gc.enable()


def _main(args: list[str]) -> int:
    try:
        opts = parse_args(args)
    except HelpRequested:
        sys.stdout.write(HELP)
        return 0
    except OptionError as e:
        return _error(str(e))
    if opts.foreground:
        _setup_logging(opts.debug)
        return _serve_foreground(opts)
    return _daemonize(opts)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename + ': ' if isinstance(e.filename, str) else ''}{e.strerror}"
    return str(e) or type(e).__name__


def _serve_foreground(opts: ServerOptions) -> int:
    from unionfs.core import UnionError

    try:
        from unionfs.server import serve

        serve(opts, detach_layers=True)
    except (UnionError, OSError, RuntimeError) as e:
        return _error(f"{opts.mountpoint}: {_describe(e)}")
    except KeyboardInterrupt:
        return 0
    return 0


def _daemonize(opts: ServerOptions) -> int:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        chunks = []
        while True:
            b = os.read(rfd, 4096)
            if not b:
                break
            chunks.append(b)
        os.close(rfd)
        msg = b"".join(chunks).decode(errors="replace")
        if msg == "ok":
            return 0
        if not msg:
            os.waitpid(pid, 0)
            return _error(f"{opts.mountpoint}: the filesystem process died before mounting")
        os.waitpid(pid, 0)
        sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        return 1
    # child
    os.close(rfd)
    os.setsid()
    code = 0
    try:
        _setup_logging(opts.debug)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)

        def ready() -> None:
            os.write(wfd, b"ok")
            os.close(wfd)
            # detach from the caller's output: whoever waits for our stdout/stderr to close must not hang
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            if opts.trace != "-":
                os.dup2(null, 2)
            os.close(null)
            _log_to_syslog()

        from unionfs.core import UnionError
        from unionfs.server import serve

        try:
            serve(opts, ready=ready, detach_layers=True)
        except (UnionError, OSError, RuntimeError) as e:
            try:
                os.write(wfd, f"lamina-unionfs: error: {opts.mountpoint}: {_describe(e)}\n".encode())
            except OSError:
                log.error("%s", _describe(e))
            code = 1
    except BaseException:
        code = 1
    os._exit(code)
