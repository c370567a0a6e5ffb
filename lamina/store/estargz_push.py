"""An image of the store, rewritten with eStargz layers for ``lamina push --compression-format estargz``.

The store's image is not changed: its layers are decompressed one at a time into the store's
temporary directory, written as eStargz next to them, and a new config (the eStargz tars have new
diff_ids, since the TOC and the landmark are tar entries) and a new manifest (each layer descriptor
annotated with its TOC digest and uncompressed size) are made for the push. The push then uploads
those files instead of the stored blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lamina.errors import RegistryError
from lamina.store.compression import decompress_file
from lamina.store.estargz import EStargzBlob, write_estargz
from lamina.store.image_schema import DOCKER_MANIFEST, as_object, parse_json
from lamina.store.layer_unpack import Limits
from lamina.store.store import Store

log = logging.getLogger(__name__)

GZIP_LAYER = {DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar.gzip"}
OCI_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class ConvertedImage:
    """A manifest to push, and the files holding the blobs it names."""

    manifest: bytes
    media_type: str
    files: dict[str, Path] = field(default_factory=dict)

    def blob_path(self, digest: str) -> Path:
        return self.files[digest]


def _temporary(directory: Path, suffix: str) -> Path:
    # The store's temporary-file convention: a name starting with our pid.
    return directory / f"{os.getpid()}.{secrets.token_hex(6)}.{suffix}"


@contextlib.contextmanager
def open_estargz_image(store: Store, manifest_bytes: bytes, tmp_dir: Path,
                       prioritized: Sequence[str] = ()) -> Iterator[ConvertedImage]:
    """Yield the image of ``manifest_bytes`` (a stored manifest) with eStargz layers, as files under
    ``tmp_dir``.

    Resource handling: the files are removed when the block ends, whatever happens.
    Error handling: LayerError or FormatError for a stored layer that cannot be converted.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    manifest = as_object(parse_json(manifest_bytes, "the stored manifest"), "the stored manifest")
    converted = ConvertedImage(b"", manifest.get("mediaType") or "application/vnd.oci.image.manifest.v1+json")
    try:
        layers, diff_ids = [], []
        for index, layer in enumerate(manifest.get("layers") or []):
            blob, descriptor = _convert_layer(store, layer["digest"], tmp_dir, prioritized, f"layer {index}")
            converted.files[blob.digest] = descriptor
            diff_ids.append(blob.diff_id)
            layers.append({**layer, "mediaType": GZIP_LAYER.get(converted.media_type, OCI_GZIP_LAYER),
                           "digest": blob.digest, "size": blob.size,
                           "annotations": {**(layer.get("annotations") or {}), **blob.annotations()}})
        config_digest = manifest["config"]["digest"]
        config = as_object(parse_json(store.blob_path(config_digest).read_bytes(), "the image config"),
                           "the image config")
        config["rootfs"] = {**config.get("rootfs", {}), "diff_ids": diff_ids}
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        config_path = _temporary(tmp_dir, "config")
        config_path.write_bytes(config_bytes)
        converted.files[digest] = config_path
        manifest = {**manifest, "config": {**manifest["config"], "digest": digest, "size": len(config_bytes)},
                    "layers": layers}
        converted.manifest = json.dumps(manifest, indent=3).encode()
        yield converted
    finally:
        for path in converted.files.values():
            path.unlink(missing_ok=True)


def _convert_layer(store: Store, digest: str, tmp_dir: Path, prioritized: Sequence[str], what: str) \
        -> tuple[EStargzBlob, Path]:
    source = store.blob_path(digest)
    if not source.is_file():
        raise RegistryError(f"the store lacks blob {digest} (run `lamina system check`)")
    plain = _temporary(tmp_dir, "tar")
    out = _temporary(tmp_dir, "esgz")
    try:
        with open(source, "rb") as compressed:
            decompress_file(compressed, plain, Limits().max_total_bytes, f"{what} ({digest[7:19]})")
        with open(plain, "rb") as tar, open(out, "xb") as blob_file:
            blob = write_estargz(tar, blob_file, prioritized=prioritized)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        plain.unlink(missing_ok=True)
    log.debug("%s %s written as eStargz %s (TOC %s)", what, digest, blob.digest, blob.toc_digest)
    return blob, out
