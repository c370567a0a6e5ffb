"""The background fill of a lazy image: every byte of its layer blobs, then an ordinary image.

eStargz layers are filled by range into their partial blobs (:mod:`lamina.lazy.partial`), which
the layer server also writes as it fetches verified chunks for readers, so what a container read
is not fetched twice. A layer that is not eStargz is fetched whole (it was already, by the layer
server, to be listed at all; its blob was not kept). When every layer is whole, :func:`finish`
imports the image into the store exactly as ``lamina pull`` does: each blob verified against its
digest as the store adopts it, each layer unpacked and checked against the config's diff_id, the
manifest and config kept byte for byte. So the image ID, layer digests and diff_ids are a pull's,
and the image runs offline from then on. The lazy record is then removed.

One filler per image at a time (an exclusive ``flock`` on ``fill.lock`` in the image's record);
another process that finds it taken serves its readers and leaves the fill alone.

Failure: a registry that stops answering ends the fill with one log line (every request has the
layer server's deadline); the image stays lazy, the bytes already here stay, and the next fill
(the next run of the image) goes on from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lamina.errors import FormatError, ImageNotFound, LaminaError
from lamina.layout import Layout
from lamina.lazy import images
from lamina.lazy.images import LazyImage
from lamina.lazy.partial import PartialBlob
from lamina.lazy.remote import REQUEST_DEADLINE_S, has_toc
from lamina.store.blobs import temp_name
from lamina.store.image_schema import Descriptor
from lamina.store.registry import RegistryClient
from lamina.store.registry_auth import lookup_credentials

log = logging.getLogger(__name__)

# One range request of the fill: big enough to keep the connection busy, small enough that a stop
# (or a reader waiting for the same connection's registry) is never long behind it.
FILL_PIECE = 4 << 20


class FillStopped(LaminaError):
    """The fill was asked to stop before it was done."""


@contextlib.contextmanager
def fill_lock(layout: Layout, image: LazyImage, wait: bool = False) -> Iterator[bool]:
    """Hold the image's fill lock if nobody else does (or once they are done, with ``wait``);
    yields whether this process has it."""
    path = layout.lazy_images / image.id / "fill.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # the record went: filled by someone else meanwhile
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield (layout.lazy_images / image.id).exists()
    finally:
        os.close(fd)


def open_client(image: LazyImage) -> RegistryClient:
    return RegistryClient(image.api_host, tls_verify=image.tls_verify,
                          credentials=lookup_credentials(image.registry), timeout=REQUEST_DEADLINE_S)


def fill_layer(client: RegistryClient, image: LazyImage, layer: Descriptor, partial: PartialBlob,
               stop: threading.Event) -> None:
    """Fetch every range of an eStargz layer blob not yet in ``partial``.

    Error handling: RegistryError (and TransientRegistryError past a deadline); FillStopped.
    """
    for start, end in partial.missing(layer.size, FILL_PIECE):
        if stop.is_set():
            raise FillStopped("stopped")
        data = client.fetch_blob_range(image.repository, layer.digest, start, end,
                                       deadline=time.monotonic() + REQUEST_DEADLINE_S)
        partial.write(start, data)


def finish(layout: Layout, image: LazyImage, client: RegistryClient) -> None:
    """Import the filled image into the store as a pull does, then forget the lazy record.

    Layers that are not eStargz are fetched whole here. Error handling: RegistryError,
    FormatError (a blob that does not hash to its digest: its partial copy is discarded, to be
    filled again), LayerError (a layer that does not unpack to its diff_id).
    """
    from lamina.store.store import Store
    from lamina.store.transfer import BlobLocations

    store = Store.open(layout)
    taken: list[tuple[str, Path]] = []
    try:
        for layer in image.layers:
            if store.has_blob(layer.digest):
                continue
            if has_toc(layer):
                destination = temp_name(layout.tmp, "filled")
                if not PartialBlob(layout.lazy_blobs, layer.digest).take(layer.size, destination):
                    raise FormatError(f"layer {layer.digest[7:19]} is not filled yet")
                taken.append((layer.digest, destination))
            else:
                taken.append((layer.digest, client.fetch_blob(image.repository, layer.digest, layout.tmp,
                                                               size=layer.size)))
        # One shared lock from the first blob adopted to the image recorded, as pull holds it.
        with store.lock(shared=True):
            for digest, path in taken:
                store.ingest_blob(path, digest)
            store.import_image_from_manifest(image.manifest_bytes, image.config_bytes, image.tags)
    finally:
        for _, path in taken:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    BlobLocations(layout.blob_locations).record(image.registry, image.repository,
                                                [image.manifest["config"]["digest"],
                                                 *(layer.digest for layer in image.layers)])
    images.remove(layout, image.id)
    log.info("lazy image %s is filled: an ordinary image of the store now", image.id[:12])


def _fill(layout: Layout, image: LazyImage, stop: threading.Event) -> None:
    """Fill every layer and finish; the caller holds the fill lock. Raises what fails."""
    with open_client(image) as client:
        for layer in image.layers:
            if has_toc(layer) and not os.path.exists(layout.blobs / layer.digest.removeprefix("sha256:")):
                fill_layer(client, image, layer, PartialBlob(layout.lazy_blobs, layer.digest), stop)
        finish(layout, image, client)


def fill_image(layout: Layout, image_id: str, stop: threading.Event) -> bool:
    """Fill the lazy image ``image_id`` and make it an ordinary image; True when it is one.

    Returns False without doing anything when another process is filling it, and False (after
    one log line) when the registry fails or ``stop`` is set: what was fetched stays for later.
    """
    try:
        image = images.load(layout, image_id)
    except ImageNotFound:
        return True  # filled meanwhile (by another process), or removed
    with fill_lock(layout, image) as mine:
        if not mine:
            log.info("lazy image %s: another process is filling it", image.id[:12])
            return False
        try:
            _fill(layout, image, stop)
        except FillStopped:
            return False
        except LaminaError as e:
            log.warning("the fill of lazy image %s stopped: %s", image.id[:12], e)
            return False
    return True


def fill_now(layout: Layout, image_id: str) -> None:
    """Make the lazy image ``image_id`` an ordinary image before returning: a commit on top of it
    needs its layers in the store. Waits for another process's fill first, then fills what is left.

    Error handling: whatever the fill fails with (RegistryError, FormatError, LayerError).
    """
    try:
        image = images.load(layout, image_id)
    except ImageNotFound:
        return  # an ordinary image already
    with fill_lock(layout, image, wait=True) as mine:
        if mine:
            _fill(layout, image, threading.Event())
