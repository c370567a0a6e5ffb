"""``python -m lamina.lazy.unionfs_when_ready LOWER_MOUNT LOWER_PID -- UNIONFS_ARGS...``: unionfs over lazy layers.

A lazy mount needs two servers, the layer server (:mod:`lamina.lazy.serve`) and unionfs over its
mount. Started one after the other, their start-ups add up: two Python interpreters importing trio
and pyfuse3, and the registry's round trips in between. This starts unionfs *at the same time* as
the layer server: it imports everything unionfs needs while the layer server fetches its TOCs, waits
until the layer server's mount appears in ``/proc/self/mountinfo``, and only then runs unionfs's own
command line (which opens the lower directories, so they must be there).

Error handling: exit status 1 with one line on stderr when the layer server exits first (its own
log says why: :mod:`lamina.lazy.mount` reads it) or does not mount within :data:`WAIT_LIMIT_S`.
"""

from __future__ import annotations

import os
import sys
import time

# Before anything else: the same start-up tricks as ``python -m unionfs`` (see unionfs.startup).
import unionfs.cli

WAIT_LIMIT_S = 60.0


def _mounted(target: str) -> bool:
    # mountinfo escapes these four characters of a mount point as octal (space is \040).
    escaped = os.fsencode(target.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
                          .replace("\n", "\\012"))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ", 5)[4] == escaped for line in f)


def _preload() -> None:
    """Import what ``unionfs.server.serve`` will, in the order it does (its tricks first)."""
    from unionfs.startup import import_fuse_stack

    import_fuse_stack()
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from unionfs import listing_cache, lowlevel_ops, server  # noqa: F401
    from unionfs.core import UnionFS  # noqa: F401
    from unionfs.fuse_ops import UnionOperations  # noqa: F401


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def wait_for_mount(target: str, pid: int, limit: float = WAIT_LIMIT_S) -> str | None:
    """None once ``target`` is mounted; else why not (``pid``, its server, exited, or time ran out)."""
    deadline = time.monotonic() + limit
    delay = 0.002
    while not _mounted(target):
        if not _alive(pid):
            return f"the lazy layer server (pid {pid}) exited before mounting {target}"
        if time.monotonic() > deadline:
            return f"the lazy layer server did not mount {target} within {limit:.0f} s"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.01)
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        sys.stderr.write("usage: python -m lamina.lazy.unionfs_when_ready LOWER_MOUNT LOWER_PID -- ARGS...\n")
        return 2
    _preload()  # now, while the layer server fetches its TOCs
    problem = wait_for_mount(os.path.abspath(argv[0]), int(argv[1]))
    if problem is not None:
        sys.stderr.write(f"lamina-unionfs: error: {problem}\n")
        return 1
    return unionfs.cli.main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
