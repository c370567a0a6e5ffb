"""One scheduler pass less per FUSE request: pyfuse3's read lock without a checkpoint.

pyfuse3's request loop (``_session_loop``) takes a ``trio.Lock`` before it waits for /dev/fuse to
become readable, so that one loop at a time reads. ``trio.Lock.acquire`` always yields to the
scheduler, even when nobody holds the lock (a trio checkpoint), and the wait for /dev/fuse yields
again: two passes through trio's run loop for every request, each with an ``epoll_wait``. With
lamina's one request loop (trick "session-loop") the lock is nearly always free, and the first
pass buys nothing: the wait for /dev/fuse that follows is itself a checkpoint, so other tasks
(signals, finished copy-ups, the spare loops) still get their turn once per request.

:func:`install` gives pyfuse3, and only pyfuse3, a view of trio (its module global ``trio``)
whose ``Lock`` is :class:`UncheckedLock`: taken at once when free, parked in FIFO order when not.
Everything else in that view is trio's own. It is trick "read-lock" of the inventory in
:mod:`unionfs.startup`; with ``LAMINA_NO_PATCHES=1`` pyfuse3 keeps trio as it is.
"""

from __future__ import annotations

import types
from typing import Any

import trio

from unionfs import startup


class UncheckedLock:
    """An async mutex whose uncontended ``acquire`` does not yield (``async with`` only)."""

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        self._lot.unpark()


class _TrioForPyfuse3(types.ModuleType):
    """trio as pyfuse3 sees it: trio's own attributes (copied, so that the request loop's lookups
    stay dictionary hits; others are asked of trio), but ``Lock`` is :class:`UncheckedLock`."""

    Lock = UncheckedLock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(pyfuse3_module: types.ModuleType) -> bool:
    """Point ``pyfuse3_module``'s ``trio`` at the view above, before ``pyfuse3.main`` runs (its
    read lock is made at the first request). Returns whether it did (not with the switch off, nor
    on a pyfuse3 that does not name trio as a module global)."""
    if not startup.patches_enabled() or getattr(pyfuse3_module, "trio", None) is not trio:
        return False
    view = _TrioForPyfuse3("trio")
    view.__dict__.update({k: v for k, v in vars(trio).items() if not k.startswith("__")})
    view.__dict__["Lock"] = UncheckedLock  # (the copy above brought trio's own)
    pyfuse3_module.trio = view  # type: ignore[attr-defined]
    return True
