"""Lazy images: images of a registry that a container runs from before they are pulled.

A lazy image is recorded in ``ROOT/lazy/images/ID/`` (ID: the config digest's hex, the image ID a
pull gives): ``manifest.json`` and ``config.json`` byte for byte as the registry served them (both
verified, as a pull verifies them), and ``record.json`` (where the image came from and its tag).
Its layers are read lazily (:mod:`lamina.lazy.lower`) and filled in the background
(:mod:`lamina.lazy.fill`); once every layer blob is whole, the image is imported into the store
exactly as a pull imports it, and this record is removed. So one ID is an ordinary image, a lazy
image or neither, and an ordinary image always wins (:func:`resolve`).

The choice between running lazily and pulling lives in :func:`should_run_lazily`, one rule used by
``run``/``create`` and by ``FROM``.

Presence: what part of a lazy image's compressed bytes is here (:func:`presence`), counted from the
layer blobs the store holds whole and the ranges of the partial blobs being filled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import ImageNotFound, RegistryError, UsageError
from lamina.layout import Layout
from lamina.lazy.partial import PartialBlob
from lamina.store.blobs import temp_name
from lamina.store.files import write_file_atomic
from lamina.store.image_schema import Descriptor, config_diff_ids
from lamina.store.reference import Reference, looks_like_id
from lamina.store.registry_manifest import IMAGE_MANIFEST_TYPES, MAX_CONFIG_BYTES, parsed, sha256_digest

if TYPE_CHECKING:
    from lamina.store.store import Image

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LazyImage:
    """A recorded lazy image: its verified manifest and config, and where to read its layers."""

    id: str  # hex of the config digest: the image ID a pull of the same reference gives
    reference: str  # the full normalised reference it was run by (``HOST/REPO:TAG``)
    registry: str
    api_host: str
    tls_verify: bool
    repository: str
    manifest_bytes: bytes
    config_bytes: bytes
    added: str

    @property
    def manifest(self) -> dict:
        result: dict = json.loads(self.manifest_bytes)
        return result

    @property
    def config(self) -> dict:
        result: dict = json.loads(self.config_bytes)
        return result

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.parse(raw, f"layer {i}") for i, raw in enumerate(self.manifest["layers"])]

    @property
    def diff_ids(self) -> list[str]:
        return parsed(config_diff_ids, self.config_bytes, "the image config")

    @property
    def tags(self) -> list[str]:
        ref = Reference.parse(self.reference)
        return [str(ref)] if ref.tag and not ref.digest else []

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class Presence:
    """How much of a lazy image's layer blobs (compressed bytes) is here."""

    present: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.present / self.total if self.total else 100.0


def _directory(layout: Layout, image_id: str) -> Path:
    return layout.lazy_images / image_id


def record(layout: Layout, ref: Reference, api_host: str, tls_verify: bool, manifest_bytes: bytes,
           config_bytes: bytes, added: str) -> LazyImage:
    """Keep a lazy image (manifest and config already verified by the caller); returns it.

    Written as one directory renamed into place, so a record is whole or absent.
    """
    manifest = json.loads(manifest_bytes)
    image_id = manifest["config"]["digest"].removeprefix("sha256:")
    if not _ID_RE.fullmatch(image_id):
        raise RegistryError(f"{ref}: the manifest names config {manifest['config']['digest']!r}")
    image = LazyImage(id=image_id, reference=str(ref), registry=ref.registry, api_host=api_host,
                      tls_verify=tls_verify, repository=ref.repository, manifest_bytes=manifest_bytes,
                      config_bytes=config_bytes, added=added)
    target = _directory(layout, image_id)
    if target.exists():
        _retag(target, image)
        return image
    layout.lazy_images.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = temp_name(layout.lazy_images, "lazy-image")
    work.mkdir(mode=0o700)
    try:
        (work / "manifest.json").write_bytes(manifest_bytes)
        (work / "config.json").write_bytes(config_bytes)
        (work / "record.json").write_text(json.dumps(_meta(image)))
        os.rename(work, target)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        if not target.exists():
            raise
    return image


def _meta(image: LazyImage) -> dict:
    return {"reference": image.reference, "registry": image.registry, "api_host": image.api_host,
            "tls_verify": image.tls_verify, "repository": image.repository, "added": image.added}


def _retag(directory: Path, image: LazyImage) -> None:
    """The same image run by another reference: that reference is its tag from now on."""
    write_file_atomic(directory / "record.json", json.dumps(_meta(image)).encode(), directory.parent)


def load(layout: Layout, image_id: str) -> LazyImage:
    """The lazy image with the full hex ``image_id``; ImageNotFound when there is none."""
    directory = _directory(layout, image_id)
    try:
        meta = json.loads((directory / "record.json").read_bytes())
        manifest_bytes = (directory / "manifest.json").read_bytes()
        config_bytes = (directory / "config.json").read_bytes()
    except FileNotFoundError:
        raise ImageNotFound(image_id) from None
    except (OSError, ValueError) as e:
        raise ImageNotFound(f"{image_id} (its lazy record is unreadable: {e})") from None
    return LazyImage(id=image_id, reference=meta["reference"], registry=meta["registry"],
                     api_host=meta["api_host"], tls_verify=bool(meta["tls_verify"]),
                     repository=meta["repository"], manifest_bytes=manifest_bytes, config_bytes=config_bytes,
                     added=meta.get("added", ""))


def image_ids(layout: Layout) -> list[str]:
    try:
        names = os.listdir(layout.lazy_images)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _ID_RE.fullmatch(name))


def all_images(layout: Layout) -> list[LazyImage]:
    found = []
    for image_id in image_ids(layout):
        with contextlib.suppress(ImageNotFound):
            found.append(load(layout, image_id))
    return found


def find(layout: Layout, ref_or_id: str) -> LazyImage:
    """A lazy image by reference (``HOST/REPO:TAG``) or ID (prefix); ImageNotFound otherwise.

    Only the store's own images shadow these: callers ask the store first (:func:`resolve`).
    """
    ref: Reference | None = None
    with contextlib.suppress(UsageError):
        ref = Reference.parse(ref_or_id)
    images = all_images(layout)
    if ref is not None:
        for image in images:
            recorded = Reference.parse(image.reference)
            if (ref.tag is not None and ref.digest is None and recorded.tagged_key == ref.tagged_key
                    and recorded.digest is None):
                return image
            if ref.digest is not None and ref.name == recorded.name and ref.digest == recorded.digest:
                return image
    if looks_like_id(ref_or_id):
        prefix = ref_or_id.removeprefix("sha256:")
        matches = [image for image in images if image.id.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"image ID prefix {ref_or_id!r} is ambiguous ({len(matches)} lazy images)")
    raise ImageNotFound(ref_or_id)


def remove(layout: Layout, image_id: str) -> None:
    """Forget a lazy image (filled, or removed by the user); its partial blobs go with it."""
    directory = _directory(layout, image_id)
    with contextlib.suppress(ImageNotFound):
        for layer in load(layout, image_id).layers:
            PartialBlob(layout.lazy_blobs, layer.digest).discard()
    shutil.rmtree(directory, ignore_errors=True)


def presence(layout: Layout, image: LazyImage) -> Presence:
    """Compressed bytes of the image's layers that are here (whole in the store, or partly filled)."""
    from lamina.store.blobs import BlobStore

    blobs = BlobStore(layout.blobs, layout.tmp)
    present = total = 0
    for layer in image.layers:
        total += layer.size
        if blobs.has(layer.digest):
            present += layer.size
        else:
            present += min(layer.size, PartialBlob(layout.lazy_blobs, layer.digest).present_bytes())
    return Presence(present, total)


# ----- the one rule: lazily or not -----


def should_run_lazily(layers: list[Descriptor]) -> bool:
    """Whether an image with these layers is worth running lazily: some layer is eStargz (its
    TOC lets a file be read without the rest). An image of plain layers is pulled, as before."""
    from lamina.lazy.remote import has_toc

    return any(has_toc(layer) for layer in layers)


def fetch_lazy(layout: Layout, reference: str, tls_verify: bool | None = None) -> LazyImage | None:
    """Record ``reference`` as a lazy image if it should run lazily (None when it should be pulled).

    The manifest and config are fetched and verified as a pull does; nothing of the layers is.
    Error handling: RegistryError (unreachable, refused, unverifiable), UsageError (bad reference).
    """
    from lamina.store.registry import RegistryClient
    from lamina.store.registry_auth import lookup_credentials
    from lamina.store.store import now_rfc3339
    from lamina.store.transfer import _check_layers as check_layers
    from lamina.store.transfer import api_host, default_tls_verify, strip_transport

    ref = Reference.parse(strip_transport(reference))
    verify = default_tls_verify(ref.registry, tls_verify)
    host = api_host(ref.registry)
    with RegistryClient(host, tls_verify=verify, credentials=lookup_credentials(ref.registry)) as client:
        manifest, _index = client.get_image_manifest(ref.repository, ref.digest or ref.tag or "latest")
        if manifest.media_type not in IMAGE_MANIFEST_TYPES:
            raise RegistryError(f"{ref}: unsupported manifest type {manifest.media_type}")
        image_manifest = manifest.image()
        check_layers(ref, image_manifest.layers)
        if not should_run_lazily(image_manifest.layers):
            return None
        config = image_manifest.config
        layout.tmp.mkdir(parents=True, exist_ok=True)
        config_bytes = client.fetch_small_blob(ref.repository, config.digest, layout.tmp, size=config.size,
                                               max_size=MAX_CONFIG_BYTES)
    diff_ids = parsed(config_diff_ids, config_bytes, f"{ref}: the image config")
    if len(diff_ids) != len(image_manifest.layers):
        raise RegistryError(f"{ref}: the config lists {len(diff_ids)} diff_ids for "
                            f"{len(image_manifest.layers)} layers")
    from lamina.store.store import validate_image_config

    validate_image_config(json.loads(config_bytes))
    return record(layout, ref, host, verify, manifest.data, config_bytes, now_rfc3339())


# ----- as the store's verbs show images -----


def as_image(image: LazyImage) -> Image:
    """The lazy image in the shape of the store's images, for ``images``/``inspect`` (sizes are the
    layers' uncompressed sizes as eStargz records them, else their compressed sizes: no file of
    a lazy layer has to be fetched to list it)."""
    from lamina.store.estargz import UNCOMPRESSED_SIZE_ANNOTATION
    from lamina.store.store import Image, Layer

    layers = []
    for descriptor, diff_id in zip(image.layers, image.diff_ids, strict=True):
        size_text = descriptor.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION, "")
        size = int(size_text) if size_text.isdigit() else descriptor.size
        layers.append(Layer(diff_id=diff_id, digest=descriptor.digest, path=Path(), size=size,
                            media_type=descriptor.media_type))
    return Image(id=image.id, config=image.config, manifest=image.manifest,
                 manifest_digest=sha256_digest(image.manifest_bytes), layers=layers,
                 tags=[Reference.parse(tag).familiar for tag in image.tags])


def presence_json(presence: Presence) -> dict[str, int | float]:
    """``inspect``'s ``Lazy`` field (lamina's own: docker has no lazy images)."""
    return {"PresentBytes": presence.present, "TotalBytes": presence.total,
            "Percent": round(presence.percent, 1)}
