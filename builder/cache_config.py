"""The build cache as a document another machine can read: what ``--cache-to`` exports and
``--cache-from`` imports (the registry side is :mod:`builder.registry_cache`).

The layout follows BuildKit's registry cache (``cache/remotecache``, with ``image-manifest=true``):
an OCI image manifest whose layers are the cached layer blobs, each annotated with its diff_id
(``containerd.io/uncompressed``), and whose config blob is the cache metadata. Two things differ,
because lamina's cache keys are not BuildKit's (BuildKit keys LLB operations, lamina keys Dockerfile
steps, :mod:`builder.cache`), so neither could use the other's records:

* the config's media type is :data:`CACHE_CONFIG_TYPE`, not ``application/vnd.buildkit.cacheconfig.v0``,
  so that BuildKit never mistakes lamina's records for its own (nor lamina BuildKit's);
* a record is one step: ``digest`` is the step's key (already chained to its parent's, so BuildKit's
  ``inputs`` links are not needed), ``history`` the image history line the step made and ``layer``
  the index, in ``layers``, of the layer it made (absent when it made none).

``layers`` keeps BuildKit's shape: ``{"blob": digest, "annotations": {"mediaType", "diffID",
"size"}}``, plus lamina's ``contentSize`` (the layer's SIZE). The same document, embedded in an image
config under :data:`INLINE_KEY`, is the inline cache (``BUILDKIT_INLINE_CACHE=1``, ``--cache-to
type=inline``); its layers are then the image's own, named by diff_id alone (no ``blob``, ``size`` or
``mediaType``): the image's manifest says which blob holds each, and a copy of the image that holds
them otherwise (a docker-archive keeps them uncompressed) carries the same metadata, so the same ID.

What a record holds is a step key (a sha256 of the step's text, which never contains a secret's
content: :meth:`builder.layer_instructions.RunStep.cache_text`), a history line and layer digests.

Parsing is strict, because a cache comes from a registry and is hostile until checked: a document
larger than the JSON limit, a malformed digest, an unknown layer media type or a history line that
is not a small flat object is refused (:class:`~lamina.errors.FormatError`) before anything uses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lamina.bounded import JSON_LIMIT
from lamina.errors import FormatError
from lamina.store.transfer import LAYER_TYPES  # those the store unpacks

CACHE_CONFIG_TYPE = "application/vnd.lamina.buildcache.config.v0+json"
INLINE_KEY = "lamina.buildcache.v0"
UNCOMPRESSED_ANNOTATION = "containerd.io/uncompressed"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KEY = re.compile(r"[0-9a-f]{64}")
_HISTORY_TEXT = ("created", "created_by", "comment", "author")
MAX_HISTORY_TEXT = 64 << 10


@dataclass(frozen=True)
class CachedLayer:
    digest: str  # the blob
    diff_id: str
    media_type: str
    size: int  # bytes of the blob
    content_size: int  # bytes of file content (docker's SIZE)


@dataclass(frozen=True)
class CacheRecord:
    """One step: its key, the history line it made and the layer it made, if any."""

    key: str
    history: dict[str, Any]
    layer: CachedLayer | None

    @classmethod
    def from_entry(cls, key: str, entry: dict[str, Any], blob_size: int) -> CacheRecord:
        """From a local cache entry (:class:`builder.cache.BuildCache`)."""
        info = entry.get("layer")
        layer = None
        if isinstance(info, dict):
            layer = CachedLayer(digest=info["digest"], diff_id=info["diff_id"], size=blob_size,
                                media_type=info.get("media_type") or "application/vnd.oci.image.layer.v1.tar+gzip",
                                content_size=int(info.get("size", 0)))
        return cls(key, dict(entry["history"]), layer)

    def entry(self) -> dict[str, Any]:
        """As a local cache entry."""
        layer = None
        if self.layer is not None:
            layer = {"diff_id": self.layer.diff_id, "digest": self.layer.digest,
                     "size": self.layer.content_size, "media_type": self.layer.media_type}
        return {"history": self.history, "layer": layer}


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def layers_of(records: Iterable[CacheRecord]) -> list[CachedLayer]:
    """The distinct layers of ``records``, in order of first use."""
    seen: dict[str, CachedLayer] = {}
    for record in records:
        if record.layer is not None:
            seen.setdefault(record.layer.digest, record.layer)
    return list(seen.values())


def config_document(records: list[CacheRecord], inline: bool = False) -> dict[str, Any]:
    """The cache metadata of ``records`` (a record seen twice is written once); ``inline``: for an
    image config, its layers named by diff_id only."""
    layers = layers_of(records)
    index = {layer.digest: i for i, layer in enumerate(layers)}
    out: list[dict[str, Any]] = []
    written: set[str] = set()
    for record in records:
        if record.key in written:
            continue
        written.add(record.key)
        item: dict[str, Any] = {"digest": "sha256:" + record.key, "history": record.history}
        if record.layer is not None:
            item["layer"] = index[record.layer.digest]
        out.append(item)
    described: list[dict[str, Any]]
    if inline:
        described = [{"annotations": {"diffID": layer.diff_id, "contentSize": layer.content_size}}
                     for layer in layers]
    else:
        described = [{"blob": layer.digest,
                      "annotations": {"mediaType": layer.media_type, "diffID": layer.diff_id, "size": layer.size,
                                      "contentSize": layer.content_size}} for layer in layers]
    return {"layers": described, "records": out}


def manifest_document(config: bytes, config_digest: str, layers: list[CachedLayer]) -> dict[str, Any]:
    """The OCI image manifest that carries a cache: the layers, then the metadata as its config."""
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CACHE_CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
                    "annotations": {UNCOMPRESSED_ANNOTATION: layer.diff_id}} for layer in layers],
    }


# diff_id -> (blob digest, media type, blob size): the layers of the image an inline cache is in.
ImageLayers = dict[str, tuple[str, str, int]]


def parse_config(data: bytes | Any, what: str, image_layers: ImageLayers | None = None) -> list[CacheRecord]:
    """The records of a cache document (bytes, or the already decoded inline object, whose layers
    are looked up by diff_id in ``image_layers``).

    Error handling: FormatError naming ``what`` for anything malformed."""
    if isinstance(data, bytes):
        if len(data) > JSON_LIMIT:
            raise FormatError(f"{what}: cache metadata larger than {JSON_LIMIT} bytes")
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FormatError(f"{what}: cache metadata is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers", []), list) \
            or not isinstance(data.get("records", []), list):
        raise FormatError(f"{what}: cache metadata is not an object with layers and records")
    layers = [_parse_layer(item, what, image_layers) for item in data.get("layers", [])]
    records = []
    for item in data.get("records", []):
        if not isinstance(item, dict):
            raise FormatError(f"{what}: a cache record is not an object")
        digest = item.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise FormatError(f"{what}: invalid cache record digest {str(digest)[:80]!r}")
        index = item.get("layer")
        layer = None
        if index is not None:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(layers):
                raise FormatError(f"{what}: cache record names layer {index!r}, which does not exist")
            layer = layers[index]
        records.append(CacheRecord(digest.removeprefix("sha256:"), _parse_history(item.get("history"), what), layer))
    return records


def _parse_layer(item: Any, what: str, image_layers: ImageLayers | None) -> CachedLayer:
    if not isinstance(item, dict) or not isinstance(item.get("annotations"), dict):
        raise FormatError(f"{what}: a cache layer is not an object with annotations")
    notes = dict(item["annotations"])
    if image_layers is not None:
        named = notes.get("diffID")
        if not isinstance(named, str) or named not in image_layers:
            raise FormatError(f"{what}: the inline cache names layer {str(named)[:80]!r}, which the image lacks")
        digest, kind, size = image_layers[named]
        notes.update(mediaType=kind, size=size)
        item = {"blob": digest}
    blob, diff_id, media_type = item.get("blob"), notes.get("diffID"), notes.get("mediaType")
    for name, value in (("blob", blob), ("diffID", diff_id)):
        if not isinstance(value, str) or not _DIGEST.fullmatch(value):
            raise FormatError(f"{what}: invalid cache layer {name} {str(value)[:80]!r}")
    if media_type not in LAYER_TYPES:
        raise FormatError(f"{what}: cache layer {blob} has unsupported media type {str(media_type)[:80]!r}")
    sizes = [notes.get("size"), notes.get("contentSize", 0)]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise FormatError(f"{what}: cache layer {blob} has an invalid size")
    assert isinstance(blob, str) and isinstance(diff_id, str) and isinstance(media_type, str)
    return CachedLayer(digest=blob, diff_id=diff_id, media_type=media_type, size=int(sizes[0]),
                       content_size=int(sizes[1]))


def _parse_history(value: Any, what: str) -> dict[str, Any]:
    """A history line: only docker's string fields and ``empty_layer``, each of a bounded size."""
    if not isinstance(value, dict):
        raise FormatError(f"{what}: a cache record has no history line")
    history: dict[str, Any] = {}
    for name, item in value.items():
        if name in _HISTORY_TEXT and isinstance(item, str) and len(item) <= MAX_HISTORY_TEXT:
            history[name] = item
        elif name == "empty_layer" and isinstance(item, bool):
            history[name] = item
        else:
            raise FormatError(f"{what}: unexpected history field {str(name)[:40]!r} in a cache record")
    return history


def is_key(text: str) -> bool:
    return bool(_KEY.fullmatch(text))
