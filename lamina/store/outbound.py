"""Layers compressed on the way out: local layers stay plain tars, a push sends them gzipped.

Like containers-storage and docker, the store keeps the layers it makes (build, commit, import) as
uncompressed tars: their blob digest is their diff_id, and nothing on the local path (run, save,
history) ever needs them compressed. Compression happens only where a format asks for it, a
registry push, and then once per layer: the gzip blob is stored beside the plain one and its digest
is recorded in ``layers/<diffhex>/gzip``, so the next push of any image holding that layer sends the
same blob without compressing again. Garbage collection keeps that blob as long as the layer lives
(:meth:`lamina.store.usage.Usage.roots`).

The gzip stream is made by ISA-L (``isal``) at level 1 in independent blocks on worker threads:
about 7× zlib's speed on incompressible data here, with a smaller output than zlib's level 1 on
text; the bytes depend only on the input (header mtime 0, no name, fixed block size), not on the
number of threads.

Error handling: a plain blob that is missing raises :class:`StoreError`; I/O errors propagate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from isal import igzip_threaded

from lamina.errors import StoreError
from lamina.store.blobs import CHUNK, HashingWriter, digest_hex
from lamina.store.files import canonical_json, write_file_atomic

if TYPE_CHECKING:
    from lamina.store.store import Store

log = logging.getLogger(__name__)

# ISA-L's level 1: faster than zlib's level 1 and smaller (see the module docstring).
GZIP_LEVEL = 1
_GZIP_THREADS = max(1, min(4, os.cpu_count() or 1))

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
# A manifest's uncompressed layer type -> the type of the same layer gzipped.
GZIPPED_TYPE = {
    OCI_LAYER_TAR: "application/vnd.oci.image.layer.v1.tar+gzip",
    DOCKER_LAYER_TAR: "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
_CACHE_NAME = "gzip"

Progress = Callable[[int], None]


def gzip_writer(sink: BinaryIO | HashingWriter) -> BinaryIO:
    """A write-only gzip stream into ``sink`` (left open), compressed on worker threads.

    Resource handling: closing the returned stream finishes the gzip member; ``sink`` stays open.
    """
    stream: BinaryIO = igzip_threaded.open(sink, "wb", compresslevel=GZIP_LEVEL, threads=_GZIP_THREADS)
    return stream


def cached_gzip(store: Store, plain_digest: str) -> str | None:
    """The gzip blob recorded for the plain layer blob ``plain_digest``, if it is still stored."""
    try:
        digest = (store.layers_dir / digest_hex(plain_digest) / _CACHE_NAME).read_text().strip()
        return digest if store.has_blob(digest) else None
    except (OSError, ValueError, StoreError):
        return None


def gzipped_layer(store: Store, plain_digest: str, progress: Progress | None = None) -> tuple[str, int]:
    """The digest and size of ``plain_digest``'s layer gzipped, compressing it at most once.

    The plain blob must be a stored layer's tar (its digest is the layer's diff_id). Resource
    handling: takes the store's shared lock while it writes the gzip blob and its record.
    """
    with store.lock(shared=True):
        cached = cached_gzip(store, plain_digest)
        if cached is not None:
            if progress is not None:
                progress(store.blobs.size(plain_digest))
            return cached, store.blobs.size(cached)
        source = store.blob_path(plain_digest)
        try:
            plain = open(source, "rb")
        except FileNotFoundError:
            raise StoreError(f"the store lacks layer blob {plain_digest} (run `lamina system check`)") from None
        with plain, store.blobs.writer() as blob:
            gz = gzip_writer(blob)
            try:
                while chunk := plain.read(CHUNK):
                    gz.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            finally:
                gz.close()
        layer_dir = store.layers_dir / digest_hex(plain_digest)
        if layer_dir.is_dir():
            write_file_atomic(layer_dir / _CACHE_NAME, blob.digest.encode(), store.tmp_dir)
        log.info("gzipped layer %s: %d -> %d bytes", plain_digest[:19], store.blobs.size(plain_digest), blob.size)
        return blob.digest, blob.size


def kept_gzip_blobs(store: Store, diff_ids: set[str]) -> set[str]:
    """The gzip blobs recorded for the layers ``diff_ids`` (what garbage collection keeps for them)."""
    kept = set()
    for diff_id in diff_ids:
        try:
            kept.add((store.layers_dir / digest_hex(diff_id) / _CACHE_NAME).read_text().strip())
        except (OSError, ValueError, StoreError):
            continue
    return kept


def outbound_manifest(store: Store, manifest_bytes: bytes,
                      progress: Callable[[str], Progress | None] | None = None) -> bytes:
    """``manifest_bytes`` with every uncompressed layer replaced by its gzipped blob.

    A manifest with no uncompressed layer is returned byte for byte (its digest stays the same);
    otherwise the new manifest is canonical JSON, stored as a blob so a later ``pull`` by its digest
    finds it. ``progress(digest)`` may give a byte counter for each layer being compressed.
    """
    manifest: dict[str, Any] = json.loads(manifest_bytes)
    layers = manifest.get("layers") or []
    if not any(isinstance(d, dict) and d.get("mediaType") in GZIPPED_TYPE for d in layers):
        return manifest_bytes
    out_layers = []
    for desc in layers:
        if desc.get("mediaType") in GZIPPED_TYPE:
            digest, size = gzipped_layer(store, desc["digest"], progress(desc["digest"]) if progress else None)
            desc = {**desc, "mediaType": GZIPPED_TYPE[desc["mediaType"]], "digest": digest, "size": size}
        out_layers.append(desc)
    data = canonical_json({**manifest, "layers": out_layers})
    store.put_blob(data)
    return data
