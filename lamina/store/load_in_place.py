"""A plain layer read once for two uses: copied into the blob store and unpacked, at the same time.

``load`` used to ingest each docker-archive layer into a blob (read, hash, write, fsync) and then
unpack the blob: two passes one after the other. A plain layer is now unpacked in place from the
archive (:func:`lamina.store.layer_unpack.unpack_plain_in_place`) while a thread copies and hashes
the same bytes into the blob; hashing and the kernel's copying run outside the GIL. The layer
directory is installed only once the blob's digest proves to be the expected diff_id.
"""

from __future__ import annotations

import io
import threading
from typing import TYPE_CHECKING, Any

from lamina.errors import LayerError
from lamina.store import private
from lamina.store.blobs import CHUNK, remove_tree, temp_name
from lamina.store.layer_unpack import FileRegion, unpack_plain_in_place

if TYPE_CHECKING:
    from lamina.store.store import Store


def add_plain_layer(store: Store, fd: int, offset: int, size: int, diff_id: str, progress: Any = None) -> str:
    """Store the plain layer tar at ``offset`` of the open file ``fd`` (a docker-archive's member)
    as a blob and as an unpacked layer; return the blob's digest.

    Error handling: a hostile tar, or a digest other than ``diff_id``, raises
    :class:`LayerError` and installs no layer (a blob stored under its real digest is left for
    the caller's clean-up, or prune).
    """
    with store.lock(shared=True):
        found: list[str | BaseException] = []

        def ingest() -> None:
            try:
                source = io.BufferedReader(FileRegion(fd, offset, offset + size), CHUNK)
                found.append(store.blobs.ingest(source, None, progress))
            except BaseException as e:  # handed to the thread that waits for it
                found.append(e)

        thread = threading.Thread(target=ingest, name="lamina-layer-ingest")
        thread.start()
        work = temp_name(store.tmp_dir, "layer")
        try:
            try:
                private.make_private_dir(work)
                result = unpack_plain_in_place(fd, offset, size, work / "diff", diff_id)
            finally:
                thread.join()
            digest = found[0]
            if isinstance(digest, BaseException):
                raise digest
            if digest != diff_id:
                raise LayerError(f"layer content does not match its diff_id: expected {diff_id}, "
                                 f"got {digest}")
            store.install_layer(work, diff_id, result.tar_size, result.content_size)
            return digest
        finally:
            if work.exists():
                remove_tree(work)
