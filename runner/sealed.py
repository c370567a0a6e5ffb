"""Start the processes a container can see from a sealed copy of the interpreter, with no environment.

A process that enters a container's namespaces is visible to the container's processes until it
execs the container's command (``lamina exec``: the whole time; ``run --init``: for the container's
life, as its PID 1). Three things about such a process must not reach the container:

- **The host's environment.** ``/proc/PID/environ`` shows the memory a process was *started* with;
  clearing ``os.environ`` afterwards changes nothing there. So the process is started afresh (an
  ``execve``) with an empty environment; what it needs comes through a pickled job, never environ.
- **The host's interpreter binary.** ``/proc/PID/exe`` of a process running the host's Python
  resolves to that file, and a container process that opens it (or that makes lamina exec
  ``/proc/self/exe`` through a ``#!/proc/self/exe`` script, as in CVE-2019-5736) could write the
  host's Python once it is no longer running: as root, the container's root is the file's owner.
  As runc does, the process runs from a memfd copy of the interpreter sealed against writes,
  shrinking and growing (``F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL``): every
  ``/proc/PID/exe`` a container can see is that copy or the container's own command.
- **Its memory and descriptors.** The process makes itself non-dumpable (``PR_SET_DUMPABLE 0``)
  before anything else: ``/proc/PID/*`` then belongs to the host's root and the container can
  neither read it nor ptrace the process. ``exec`` resets that for the container's command.

The copy is made once per lamina process (a few ms for a 7 MB interpreter, from the page cache) and
each helper pays one interpreter start. The helper imports what it needs before it enters the
container's mount namespace (after that the host's files, the standard library included, are out of
reach).

Resource handling: the sealed copy is a close-on-exec descriptor of this process; :func:`exec_sealed`
replaces the calling (forked) process and keeps only the descriptors it is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from lamina.errors import ContainerError
from runner import linux

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
# The code the sealed interpreter runs: lamina's import path, then the entry point. ``-I`` ignores
# PYTHON* variables and the user's site directory, ``-S`` skips site (the path is given), ``-B``
# writes no bytecode from inside a helper.
_BOOT = "import sys; sys.path[:0] = {path!r}; from runner.sealed import main; main()"

_sealed_fd: int | None = None


def sealed_interpreter() -> int:
    """A descriptor of a sealed, in-memory copy of the running interpreter (made on first use).

    Callers that fork children which keep only some descriptors must keep this one too. Raises
    :class:`ContainerError` when the copy cannot be made (an interpreter that cannot be read)."""
    global _sealed_fd
    if _sealed_fd is None:
        try:
            fd = os.memfd_create("lamina", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise ContainerError(f"cannot make a sealed copy of the interpreter: {e.strerror or e}") from e
        try:
            with open("/proc/self/exe", "rb") as source:
                size = os.fstat(source.fileno()).st_size
                copied = 0
                while copied < size:
                    sent = os.sendfile(fd, source.fileno(), copied, size - copied)
                    if sent == 0:
                        raise OSError(f"the interpreter shrank while it was copied ({copied} of {size} bytes)")
                    copied += sent
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as e:
            os.close(fd)
            raise ContainerError(f"cannot make a sealed copy of the interpreter {sys.executable}: "
                                 f"{e.strerror or e}") from e
        except BaseException:
            os.close(fd)
            raise
        _sealed_fd = fd
    return _sealed_fd


def exec_sealed(entry: str, job: tuple[object, ...], keep: set[int | None]) -> NoReturn:
    """Replace this (forked) process by the sealed interpreter running ``ENTRIES[entry](*job)``.

    The new process has an empty environment and only the descriptors in ``keep`` (0, 1 and 2 are
    not kept unless named). ``job`` is pickled into an anonymous file. Raises OSError if the exec
    fails; never returns otherwise."""
    interpreter = sealed_interpreter()
    job_fd = os.memfd_create("lamina-job", 0)
    data = pickle.dumps((entry, job))
    written = 0
    while written < len(data):
        written += os.write(job_fd, data[written:])
    os.lseek(job_fd, 0, os.SEEK_SET)
    kept: set[int] = {fd for fd in keep if fd is not None}
    everything: set[int | None] = {*kept, interpreter, job_fd}
    linux.close_fds_except(everything)
    for fd in kept | {job_fd}:
        os.set_inheritable(fd, True)
    boot = _BOOT.format(path=list(sys.path))
    os.execve(interpreter, [sys.executable, "-I", "-S", "-B", "-c", boot, str(job_fd)], {})


def main() -> NoReturn:
    """The sealed interpreter's entry point: become non-dumpable, read the job, run it, exit."""
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    job_fd = int(sys.argv[-1])
    with os.fdopen(job_fd, "rb") as f:
        entry, job = pickle.load(f)  # written by exec_sealed in the process we replaced
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
                os.set_inheritable(int(name), False)  # what the job execs gets what it hands on
    ENTRIES[entry](*job)
    os._exit(125)  # entries never return


def _container_init(*job: Any) -> NoReturn:
    from runner.sandbox_init import sealed_container_init

    sealed_container_init(*job)


def _exec_helper(*job: Any) -> NoReturn:
    from runner.execute import sealed_exec_helper

    sealed_exec_helper(*job)


def _copy_helper(*job: Any) -> NoReturn:
    from runner.container_files import sealed_copy_helper

    sealed_copy_helper(*job)


ENTRIES: dict[str, Callable[..., NoReturn]] = {"container-init": _container_init, "exec-helper": _exec_helper,
                                               "copy-helper": _copy_helper}
