"""The image store's two locks: the store lock, and the lock of the tag index.

The store lock (``ROOT/lock``) is shared by writers that only add complete objects (blobs, layers,
images, tags) and exclusive for anything that deletes (rmi, prune, check), so a deletion can never
remove a blob another process has just written and is about to reference. The tags lock
(``ROOT/tags.lock``) serialises read-modify-write of ``images/tags.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from lamina.errors import StoreError

log = logging.getLogger(__name__)

# realpath of a lock file -> [fd, flock mode, depth]: the store locks this process holds.
_HELD_LOCKS: dict[str, list[int]] = {}


@contextlib.contextmanager
def hold_store_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold the store lock at ``path`` (exclusive unless ``shared``); re-entrant within this process.

    Re-entrancy is per process and lock file, not per Store object: flock locks taken through two
    open files of one process would otherwise block each other.
    Resource handling: the lock is released when the outermost ``with`` ends. A nested request
    for a stronger lock than the one held is an error (upgrading flock is not atomic).
    """
    want = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    key = os.path.realpath(path)
    held = _HELD_LOCKS.get(key)
    if held is not None:
        if want == fcntl.LOCK_EX and held[1] == fcntl.LOCK_SH:
            raise StoreError("internal error: exclusive store lock requested while holding a shared one")
        held[2] += 1
        try:
            yield
        finally:
            held[2] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, want | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the lock on the store %s", path.parent)
            fcntl.flock(fd, want)
        _HELD_LOCKS[key] = [fd, want, 1]
        yield
    finally:
        _HELD_LOCKS.pop(key, None)
        os.close(fd)


@contextlib.contextmanager
def hold_tags_lock(path: Path) -> Iterator[None]:
    """Hold the tag index's lock at ``path`` (exclusive, not re-entrant)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
