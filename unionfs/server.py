"""Running the filesystem: open the layers, mount, serve until unmounted or signalled.

Imports of pyfuse3 and trio happen here, lazily, so the command line answers errors fast.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType
from typing import IO, TYPE_CHECKING

from unionfs.options import ServerOptions
from unionfs.startup import import_fuse_stack, patches_enabled

if TYPE_CHECKING:
    from unionfs.core import UnionFS
    from unionfs.fuse_ops import UnionOperations

log = logging.getLogger(__name__)

_MCL_CURRENT = 1
_MCL_ONFAULT = 4


def open_trace(spec: str | None) -> tuple[Callable[[str], None] | None, IO[str] | None]:
    if spec is None:
        return None, None
    if spec == "-":
        stream: IO[str] = sys.stderr
        owned = None
    else:
        stream = open(spec, "a", buffering=1)  # lives as long as the server
        owned = stream

    def emit(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return emit, owned


class _AbandonedReplyFilter(logging.Filter):
    """Drop pyfuse3's error for a reply the kernel no longer waits for.

    Writing a reply to a request the kernel has dropped (its caller was interrupted, or the mount
    is being torn down while files are still released) fails with ENOENT; pyfuse3 logs that as an
    error, though nothing was lost: the request has no one left to answer.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        return not ("fuse_reply_" in message and os.strerror(errno.ENOENT) in message)


def _tune_garbage_collector() -> None:
    """Make the cyclic garbage collector run far less often than its defaults (700, 10, 10).

    A big listing makes tens of thousands of objects (entries, nodes) that live on; with the
    defaults, each few hundred of them start a collection that walks young objects again and again,
    and every few thousand one that walks the whole heap: that was half the CPU time of listing a
    10,000-entry directory. What request handling leaves for the collector (reference cycles: a
    forgotten node and its children) is small, so collecting every 20,000 allocations costs little
    memory. Everything from start-up (modules, trio's and pyfuse3's state) is frozen out of the
    collector's walks for good.
    """
    import gc

    gc.freeze()  # no collection first: that would be ~10 ms more before the mount answers
    gc.set_threshold(20_000, 20, 20)
    gc.enable()  # the command line turns it off for the start-up (unionfs.cli)


def _lock_memory() -> None:
    """Keep the server's own pages (interpreter, libraries, heap) in memory.

    A FUSE server that page-faults waits on the disk, and under memory pressure reclaim can wait on
    the very filesystem it serves. Best effort: needs CAP_IPC_LOCK or a big enough RLIMIT_MEMLOCK.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # MCL_ONFAULT: lock pages as they are touched instead of faulting every mapping in first, which
    # took ~20 ms of the time to mount. Pages in use stay resident all the same.
    if libc.mlockall(_MCL_CURRENT | _MCL_ONFAULT) == 0:
        return
    if ctypes.get_errno() == errno.EINVAL and libc.mlockall(_MCL_CURRENT) == 0:  # before Linux 4.4
        return
    log.debug("mlockall failed: %s", os.strerror(ctypes.get_errno()))


def _release_layers(core: UnionFS, ops: UnionOperations) -> None:
    """Close every descriptor the server holds on a layer: open files, then the core's own."""
    for h in list(ops.files.values()):
        core.release(h.node, h.fd)
    ops.files.clear()
    core.close()


def _open_detached(opts: ServerOptions) -> dict[str, int]:
    from unionfs import detached_layers

    paths = [*opts.lowers, *(p for p in (opts.upper, opts.work) if p is not None)]
    return detached_layers.open_directories(paths)


async def _serve_with_spare_loops(pyfuse3: ModuleType, ops: UnionOperations) -> None:
    """pyfuse3.main with one request loop, and more only for handlers that wait (copy-ups).

    Trick "session-loop" of the inventory in unionfs.startup, off with the switch. pyfuse3 has no
    public call for this: a spare is its own worker loop (min_tasks=max_tasks=1: it neither spawns
    loops nor leaves while fewer than two others wait, so loops stay bounded by the handlers that
    ever waited). A loop leaves when two others wait for requests, and pyfuse3.main's own loop is
    no exception: main then returns while spares still serve. So main and every spare run in one
    nursery, and serving ends when all of them have, which is when the session does (an unmount
    or pyfuse3.terminate ends every loop; the last two never leave by the idle rule).
    """
    import trio

    async with trio.open_nursery() as serving:
        def spawn_session_loop() -> None:
            serving.start_soon(pyfuse3._session_loop, serving, 1, 1)

        ops.spawn_session_loop = spawn_session_loop
        await pyfuse3.main(min_tasks=1, max_tasks=1)


def serve(opts: ServerOptions, ready: Callable[[], None] | None = None, *, detach_layers: bool = False) -> None:
    """Mount and serve until unmounted (fusermount3 -u) or SIGTERM/SIGINT; then unmount and return.

    ``ready`` is called once the mount is in place. With ``detach_layers`` the layers are opened in
    a throwaway mount namespace (unionfs.detached_layers): for a server in the caller's namespace,
    whose layers' filesystems the caller may unmount right after the union. Raises UnionError/OSError
    when the layers cannot be opened or the mount fails.
    """
    import_fuse_stack()  # before anything imports trio: its substitutes only help the first import
    pyfuse3_log = logging.getLogger("pyfuse3")
    if not any(isinstance(f, _AbandonedReplyFilter) for f in pyfuse3_log.filters):
        pyfuse3_log.addFilter(_AbandonedReplyFilter())
    import pyfuse3
    import trio

    from unionfs import listing_cache, lowlevel_ops, read_lock
    from unionfs.core import UnionFS
    from unionfs.fuse_ops import UnionOperations

    os.umask(0)  # modes arrive from the kernel with the caller's umask applied
    trace, trace_file = open_trace(opts.trace)
    opened = _open_detached(opts) if detach_layers else {}
    try:
        core = UnionFS(opts.lowers, opts.upper, opts.work, trace=trace, layer_xattr=opts.layer_xattr,
                       redirect_dir=opts.redirect_dir, opened=opened)
    finally:
        for fd in opened.values():  # a directory the core did not take (named twice, or it failed)
            os.close(fd)
    ops = UnionOperations(core, enable_acl=opts.enable_acl)
    listing_cache.enable(ops.is_directory_handle)
    lowlevel_ops.install(ops.fallocate)
    read_lock.install(pyfuse3)
    if opts.enable_acl:
        ops.enable_acl = True
    pyfuse3.init(ops, opts.mountpoint, opts.fuse_options())
    mounted = True
    _lock_memory()
    _tune_garbage_collector()
    try:
        if ready is not None:
            ready()

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                async def watch_signals() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                        async for _ in sigs:
                            pyfuse3.terminate()
                            return

                nursery.start_soon(watch_signals)
                lowlevel_ops.start(nursery.start_soon)

                if patches_enabled():
                    await _serve_with_spare_loops(pyfuse3, ops)
                else:  # pyfuse3 as it comes: its own loops, started when all are busy
                    await pyfuse3.main()
                nursery.cancel_scope.cancel()
            # Unmounted (or signalled): no task or worker thread uses a layer any more. Let go of
            # them now, before the rest of the teardown: umount(8) returns before this process
            # learns of it, and the layers' filesystems are busy until it lets go.
            _release_layers(core, ops)

        trio.run(run)
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
        core.close()
        if trace_file is not None:
            trace_file.close()
