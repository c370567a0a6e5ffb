"""Where a build's steps write: temporary directories under the store's ``tmp/``, and the layers
they commit to the store.

Resource handling: every temporary directory is removed when its step ends, whether it succeeded
or not, by a :class:`Cleaner` the build waits for before it returns. A directory that may hold files
of subordinate ids (what a RUN made) is removed as root of lamina's user namespace.

Error handling: writes to the store happen inside :meth:`Interruption.deferred`, so a signal never
leaves half a layer behind (see :mod:`builder.interruption`).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from builder.fsops import LayerView, clamp_times, prune_empty_dirs
from lamina.errors import LaminaError
from lamina.store.progress import Heartbeat
from unionfs.core.stack import LayerStack

if TYPE_CHECKING:
    from builder.interruption import Interruption
    from lamina.store import Layer, Store

log = logging.getLogger(__name__)


class Workspace:
    """The store as a build's steps see it: scratch directories and layer commits."""

    def __init__(self, store: Store, interruption: Interruption, epoch: int | None,
                 say: Callable[[str], None] = lambda _line: None) -> None:
        self._store = store
        self._interruption = interruption
        self._epoch = epoch
        self._say = say  # where a commit that takes long says it is still going
        self.cleaner = Cleaner()

    @property
    def tmp_root(self) -> Path:
        """The store's directory for temporary files (made on first use)."""
        path = self._store.layout.tmp
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_temp_dir(self, kind: str) -> Path:
        """A fresh directory the caller must hand to :meth:`remove` (or use :meth:`temp_dir`)."""
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.build-{kind}.", dir=self.tmp_root))

    @contextmanager
    def temp_dir(self, kind: str) -> Iterator[Path]:
        path = self.new_temp_dir(kind)
        try:
            yield path
        finally:
            self.remove(path)

    def remove(self, path: Path) -> None:
        with self._interruption.deferred():
            self.cleaner.remove(path)

    def write_layer(self, fill: Callable[[Path, Path], None]) -> Layer | None:
        """A layer from what ``fill(scratch_dir, layer_dir)`` writes, as the build's own user; None
        when it writes nothing."""
        with self.temp_dir("step") as tmp:
            diff = tmp / "diff"
            diff.mkdir()
            # Only the build's own user writes here: no files of subordinate ids to worry about.
            self.cleaner.mark_plain(tmp)
            fill(tmp, diff)
            if not any(diff.iterdir()) and not _is_opaque(diff):
                return None
            if self._epoch is not None:
                clamp_times(str(diff), self._epoch)
            with self._interruption.deferred(), Heartbeat(self._say, "Committing layer") as beat:
                return self._store.commit_layer(diff, progress=beat)

    def commit_upper(self, lowers: LayerStack, upper: Path, work: Path, targets: list[str]) -> Layer | None:
        """Turn a RUN step's upper directory into a layer (None when the step changed nothing).

        Files the command made may belong to subordinate ids, which only root of lamina's user
        namespace can read: the upper is cleaned up, packed into a blob and renamed into the
        store as the layer's directory there (see :func:`_finish_upper`)."""
        from lamina.store import Layer
        from lamina.store.store import OCI_LAYER_TAR
        from runner.sandbox import call_in_userns

        with Heartbeat(self._say, "Committing layer"):
            packed = call_in_userns(_finish_upper, self._store, lowers, upper, work, targets, self._epoch)
            if packed is None:
                return None
            digest, diff_id = packed
            diff_id, size = self._store.ensure_layer(digest, diff_id)
        return Layer(diff_id=diff_id, digest=digest, path=self._store.layer_dir(diff_id), size=size,
                     media_type=OCI_LAYER_TAR)


def _finish_upper(store: Store, lowers: LayerStack, upper: Path, work: Path,
                  targets: list[str], epoch: int | None) -> tuple[str, str] | None:
    """In lamina's user namespace: flatten redirects, drop scaffolding, pack the upper into a blob
    and make it the store's layer directory. Returns (blob digest, diff_id), or None for an empty
    upper.

    The walk that packs the upper also settles it (:mod:`lamina.store.layer_settle`): every entry
    becomes its user's, with owner overrides where the tar names another owner, exactly as
    unpacking the tar here would have made it (root of this namespace is not root of the initial
    one), and the upper is then renamed into the store instead of being unpacked again and
    removed. What is left (the work directory, an upper whose layer was already stored, or one
    a failure left half settled) is removed here, where files of subordinate ids can be.
    """
    from unionfs.export import flatten_redirects

    # A directory renamed over a lower one carries an overlay redirect, which a layer tar cannot
    # express: give it a full copy of what it showed instead (a no-op when nothing was renamed).
    flatten_redirects(lowers, upper, work)
    prune_empty_dirs(str(upper), targets, LayerView(lowers))
    try:
        if not any(upper.iterdir()) and not _is_opaque(upper):
            return None
        if epoch is not None:
            clamp_times(str(upper), epoch)
        # A plain tar, as every local layer (lamina.store.outbound): its digest is its diff_id.
        layer = store.commit_layer(upper, adopt=True, settle=True)
        return layer.digest, layer.diff_id
    finally:
        _remove_scratch(upper, work)


def _remove_scratch(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _is_opaque(path: Path) -> bool:
    from unionfs.core import ondisk

    return ondisk.is_opaque_dir(str(path))


def _remove_tree(path: Path) -> None:
    from runner.sandbox import call_in_userns

    # What a RUN step made may belong to subordinate ids: delete it as root of the namespace.
    try:
        call_in_userns(shutil.rmtree, path, True)
    except LaminaError as e:
        log.info("could not remove %s in the user namespace: %s", path, e)
    if path.exists():
        from lamina.store.blobs import remove_tree

        try:
            remove_tree(path)
        except (OSError, TypeError) as e:
            log.info("could not remove %s: %s", path, e)


class Cleaner:
    """Removes the temporary directories of finished steps.

    Deleting a step's files costs milliseconds per file on a busy disk, so as real root it happens
    on a worker thread while the next steps run (``unlink`` releases the GIL); the build waits for
    it before returning (:meth:`wait`). Unprivileged, a directory that may hold files of subordinate
    ids (a failed RUN's upper) needs a child process in lamina's user namespace, which is not forked
    from the worker thread: it is removed at once instead. Directories marked plain go to the
    worker for everyone."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._plain: set[Path] = set()

    def mark_plain(self, path: Path) -> None:
        """``path`` holds only files of the build's own user: any process may delete it."""
        self._plain.add(path)

    def remove(self, path: Path) -> None:
        if os.geteuid() != 0 and path not in self._plain:
            _remove_tree(path)
            return
        self._plain.discard(path)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lamina-build-cleaner", daemon=True)
            self._thread.start()
        self._queue.put(path)

    def _work(self) -> None:
        from lamina.store.blobs import remove_tree

        # Never fork from this thread (no user namespace here): only plain directories come here.
        while (path := self._queue.get()) is not None:
            try:
                remove_tree(path)
            except (OSError, TypeError) as e:
                log.info("could not remove %s: %s", path, e)

    def wait(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
