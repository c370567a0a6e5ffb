"""Copy-ups as the adapter runs them: big files in a worker thread, one copy at a time per node.

A handler that must wait (for its own big copy-up, or for one another request started) awaits a
trio.Event; before it does, it makes sure another request loop is reading requests
(``spawn_session_loop``, provided by the server), so a big copy-up stalls nobody.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from unionfs.core import UnionFS
from unionfs.core.copyup import begin_copy_up, finish_copy_up
from unionfs.core.nodes import Node

# Copy-ups of files larger than this run in a worker thread (and writable opens defer them).
THREAD_COPY_BYTES = 1 << 20
# Request loops started for handlers that wait for copy-ups (they stay, as pyfuse3's own would).
MAX_SPARE_LOOPS = 8


class CopyUps:
    """The copy-ups in flight, and the request loops kept for the handlers waiting on them."""

    def __init__(self, core: UnionFS, size: Callable[[Node], int]) -> None:
        self.core = core
        self._size = size  # a node's size, from what the adapter knows when it can
        self._copying: dict[int, trio.Event] = {}
        # Starts one more request loop; None when nothing serves /dev/fuse.
        self.spawn_session_loop: Callable[[], None] | None = None
        self._spare_loops = 0
        self._waiting_handlers = 0

    def is_big(self, node: Node) -> bool:
        """Whether copying ``node``'s data up goes to a worker thread."""
        return node.kind == stat.S_IFREG and self._size(node) > THREAD_COPY_BYTES

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around an await in a handler: keep enough request loops for the handlers that wait."""
        self._waiting_handlers += 1
        if self.spawn_session_loop is not None and \
                self._spare_loops < min(self._waiting_handlers, MAX_SPARE_LOOPS):
            self._spare_loops += 1
            self.spawn_session_loop()
        try:
            yield
        finally:
            self._waiting_handlers -= 1

    async def copy_up(self, node: Node, truncate: bool = False) -> None:
        """Copy up ``node``; big files in a worker thread, one copy at a time per node."""
        while not node.in_upper:
            event = self._copying.get(node.ino)
            if event is not None:
                with self.waiting():
                    await event.wait()
                continue
            if truncate or not self.is_big(node):
                self.core.copy_up(node, truncate)
                return
            event = trio.Event()
            self._copying[node.ino] = event
            try:
                job = begin_copy_up(self.core, node, truncate)
                if job is None:
                    return
                try:
                    with self.waiting():
                        await trio.to_thread.run_sync(job.copy_data)
                except BaseException:
                    job.close()
                    raise
                finish_copy_up(self.core, job)
            finally:
                del self._copying[node.ino]
                event.set()

    async def wait_for(self, node: Node) -> None:
        """Until no copy-up of ``node`` is in flight."""
        while (event := self._copying.get(node.ino)) is not None:
            with self.waiting():
                await event.wait()
