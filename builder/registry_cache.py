"""``--cache-from`` and ``--cache-to``: the build cache shared through a registry.

A registry cache (``type=registry,ref=REG/REPO:TAG``) is an OCI image manifest whose config is the
cache metadata and whose layers are the cached layers (:mod:`builder.cache_config` says what the
documents hold and where they differ from BuildKit's). An inline cache is the same metadata inside an
image's config (``BUILDKIT_INLINE_CACHE=1`` or ``--cache-to type=inline`` when it was built), its
layers the image's own: ``--cache-from IMAGE`` reads it, as docker's older form did.

Import: every ``--cache-from`` ref's manifest and metadata are fetched before the first step (small
documents); a step whose key is missing locally but present in an imported cache is CACHED, and only
then is its layer blob downloaded (verified against its digest), unpacked (verified against its
diff_id) and recorded in the local cache, so a later build on this machine needs no registry. A ref
that is missing, unreachable or not a cache gives one warning line and the build goes on without
it, as BuildKit's does; so does a layer that cannot be fetched (the step then runs).

Export: after the image is recorded, the layers the chosen steps made are uploaded (those the
registry lacks), then the metadata, then the manifest under the ref's tag. A layer the store keeps
uncompressed (every layer a build makes) goes out gzipped, as a push sends it: the same blob a push
of any image holding that layer sends, compressed once (:mod:`lamina.store.outbound`). Keys and the
image built from the cache do not change (a record names its layer's diff_id, and an image's ID is
its config's digest); only the blobs shrink. The registry replaces a
tag's manifest in one write, so two builders exporting to one ref at once leave the cache of one of
them, whole (last writer wins, as in BuildKit); blobs are content-addressed, so their uploads never
conflict. ``mode=min`` (the default) exports the steps of the final stage and the stages it is
built ``FROM``; ``mode=max`` every stage built. An export that fails fails the build (BuildKit's
rule), unless ``ignore-error=true``.

Trust: importing a cache trusts whoever can push to its ref, as pulling a base image trusts whoever
can push that image; what it sends is still verified (digests, sizes, diff_ids, the metadata's
shape) before the store keeps any of it. Credentials and TLS are those of ``lamina pull``/``push``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from builder.cache_config import (
    CACHE_CONFIG_TYPE,
    INLINE_KEY,
    CachedLayer,
    CacheRecord,
    ImageLayers,
    canonical,
    config_document,
    layers_of,
    manifest_document,
    parse_config,
)
from lamina.errors import LaminaError, UsageError

if TYPE_CHECKING:
    from lamina.store import Reference, Store
    from lamina.store.image_schema import ImageManifest
    from lamina.store.registry import RegistryClient

log = logging.getLogger(__name__)

Warn = Callable[[str], None]

# BuildKit's cache exporter options that change nothing here (lamina always writes OCI media types
# and an image manifest, and sends its layers gzipped).
_ACCEPTED_NOOPS = {"oci-mediatypes": "true", "image-manifest": "true"}
# A cache registry is asked quickly: a builder waiting a minute for an unreachable cache is worse
# than one that builds without it.
CACHE_TIMEOUT = 20.0


@dataclass(frozen=True)
class CacheSource:
    """One ``--cache-from``: a registry cache or an image with inline cache metadata. ``local``: the
    bare ``--cache-from IMAGE`` form, which also looks for the image in the store first (docker's
    classic builder used local images only)."""

    ref: str
    local: bool = False
    insecure: bool = False  # registry.insecure=true: plain HTTP or an unverified certificate


@dataclass(frozen=True)
class CacheTarget:
    """One ``--cache-to``: ``type=registry`` (``ref``) or ``type=inline`` (``ref`` empty)."""

    kind: str
    ref: str = ""
    mode: str = "min"
    ignore_error: bool = False
    insecure: bool = False  # registry.insecure=true


def _fields(flag: str, text: str) -> dict[str, str]:
    try:
        items = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise UsageError(f"{flag} {text}: expected type=TYPE,KEY=VALUE,...") from None
    fields: dict[str, str] = {}
    for item in items:
        key, has_value, value = item.partition("=")
        if not has_value or not key:
            raise UsageError(f"{flag} {text}: invalid field {item!r}: must be a key=value pair")
        fields[key.strip().lower()] = value.strip()
    return fields


def _flag(flag: str, text: str, fields: dict[str, str], name: str) -> bool:
    value = fields.pop(name, "false")
    if value not in ("true", "false"):
        raise UsageError(f"{flag} {text}: {name} must be true or false")
    return value == "true"


def _check_ref(flag: str, text: str) -> str:
    from lamina.store import Reference

    if not text:
        raise UsageError(f"{flag}: ref= is required for a registry cache")
    Reference.parse(text)
    return text


def parse_cache_from(text: str) -> CacheSource:
    """``--cache-from type=registry,ref=REF``, or ``REF`` alone (an image or a registry cache)."""
    flag = "--cache-from"
    if "=" not in text:
        return CacheSource(_check_ref(flag, text), local=True)
    fields = _fields(flag, text)
    kind = fields.pop("type", "registry")
    if kind != "registry":
        raise UsageError(f"{flag} {text}: unsupported cache type {kind!r} (lamina imports type=registry)")
    ref = _check_ref(flag, fields.pop("ref", ""))
    insecure = _flag(flag, text, fields, "registry.insecure")
    if fields:
        raise UsageError(f"{flag} {text}: unexpected key {sorted(fields)[0]!r}")
    return CacheSource(ref, insecure=insecure)


def parse_cache_to(text: str) -> CacheTarget:
    """``--cache-to type=registry,ref=REF[,mode=min|max][,ignore-error=true]`` or ``type=inline``."""
    flag = "--cache-to"
    fields = _fields(flag, text)
    kind = fields.pop("type", "")
    if kind not in ("registry", "inline"):
        raise UsageError(f"{flag} {text}: unsupported cache type {kind!r} (expected type=registry or type=inline)")
    ref = _check_ref(flag, fields.pop("ref", "")) if kind == "registry" else ""
    mode = fields.pop("mode", "min")
    if mode not in ("min", "max"):
        raise UsageError(f"{flag} {text}: mode must be min or max, not {mode!r}")
    if kind == "inline" and mode != "min":
        raise UsageError(f"{flag} {text}: an inline cache holds the image's own steps only (mode=min)")
    ignore_error = _flag(flag, text, fields, "ignore-error")
    insecure = _flag(flag, text, fields, "registry.insecure")
    for key, value in list(fields.items()):
        if _ACCEPTED_NOOPS.get(key) == value:
            del fields[key]
    if fields:
        key = sorted(fields)[0]
        raise UsageError(f"{flag} {text}: unsupported option {key}={fields[key]}")
    return CacheTarget(kind, ref, mode, ignore_error, insecure)


class Registries:
    """One client per registry host, opened when first needed, closed by :meth:`close`."""

    def __init__(self) -> None:
        self._clients: dict[str, RegistryClient] = {}

    def client(self, registry: str, insecure: bool = False) -> RegistryClient:
        """The client of ``registry``; ``insecure`` (for any ref of this registry) allows plain HTTP
        and unverified certificates, as ``--tls-verify=false`` does for pull and push."""
        if registry not in self._clients:
            from lamina.store.registry import RegistryClient
            from lamina.store.registry_auth import lookup_credentials
            from lamina.store.transfer import api_host, default_tls_verify

            self._clients[registry] = RegistryClient(
                api_host(registry), tls_verify=default_tls_verify(registry, False if insecure else None),
                credentials=lookup_credentials(registry), timeout=CACHE_TIMEOUT)
        return self._clients[registry]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


@dataclass(frozen=True)
class _Origin:
    ref: Reference
    layers: dict[str, int]  # digest -> size of the blobs the manifest lists: the only ones fetched


class ImportedCache:
    """The records of every ``--cache-from``, and the fetching of their layers on a hit."""

    def __init__(self, store: Store, registries: Registries, warn: Warn) -> None:
        self.store = store
        self.registries = registries
        self.warn = warn
        self.records: dict[str, tuple[CacheRecord, _Origin]] = {}

    def load(self, source: CacheSource) -> None:
        """Read one source's metadata; any failure is one warning and the source is left out."""
        from lamina.store import Reference

        ref = Reference.parse(source.ref)
        try:
            found = self._read_local(ref) if source.local else None
            records, origin = found if found is not None else self._read(ref, source.insecure)
        except (LaminaError, OSError) as e:
            self.warn(f"[Warning] --cache-from {source.ref}: {_one_line(e)}; building without it")
            return
        if not records:
            self.warn(f"[Warning] --cache-from {source.ref}: no build cache metadata (build the image with "
                      "--cache-to type=inline or --build-arg BUILDKIT_INLINE_CACHE=1); building without it")
            return
        for record in records:
            self.records.setdefault(record.key, (record, origin))

    def _read_local(self, ref: Reference) -> tuple[list[CacheRecord], _Origin] | None:
        """The inline cache of the image ``ref`` in the store (its layers are there already), or None."""
        from lamina.errors import ImageNotFound

        try:
            image = self.store.resolve_image(str(ref))
        except ImageNotFound:
            return None
        inline = image.config.get(INLINE_KEY)
        if inline is None:
            return None
        local = {layer.diff_id: (layer.digest, layer.media_type, self.store.blobs.size(layer.digest))
                 for layer in image.layers}
        sizes = {digest: size for digest, _type, size in local.values()}
        return self._checked(parse_config(inline, f"image {ref}", local), _Origin(ref, sizes))

    def _read(self, ref: Reference, insecure: bool) -> tuple[list[CacheRecord], _Origin]:
        from lamina.store.registry_manifest import IMAGE_MANIFEST_TYPES, MAX_CONFIG_BYTES

        client = self.registries.client(ref.registry, insecure)
        manifest, _index = client.get_image_manifest(ref.repository, ref.digest or ref.tag or "latest")
        if manifest.media_type not in IMAGE_MANIFEST_TYPES:
            raise LaminaError(f"unsupported manifest type {manifest.media_type}")
        parsed = manifest.image()
        origin = _Origin(ref, {layer.digest: layer.size for layer in parsed.layers})
        config = client.fetch_small_blob(ref.repository, parsed.config.digest, self.store.layout.tmp,
                                         size=parsed.config.size, max_size=MAX_CONFIG_BYTES)
        what = f"cache {ref}"
        if parsed.config.media_type == CACHE_CONFIG_TYPE:
            records = parse_config(config, what)
        else:
            try:
                image_config = json.loads(config)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise LaminaError("the image config is not JSON") from None
            inline = image_config.get(INLINE_KEY) if isinstance(image_config, dict) else None
            records = parse_config(inline, what, _image_layers(image_config, parsed)) if inline is not None else []
        return self._checked(records, origin)

    @staticmethod
    def _checked(records: list[CacheRecord], origin: _Origin) -> tuple[list[CacheRecord], _Origin]:
        from lamina.store.layer_unpack import Limits

        limit = Limits().max_total_bytes
        for record in records:
            layer = record.layer
            if layer is None:
                continue
            if origin.layers.get(layer.digest) != layer.size:
                raise LaminaError(f"cache record names layer {layer.digest} of {layer.size} bytes, which the "
                                  "manifest does not list")
            if layer.size > limit:
                raise LaminaError(f"cache layer {layer.digest} is {layer.size} bytes, more than the limit of "
                                  f"{limit} (set LAMINA_MAX_LAYER_BYTES to allow it)")
        return records, origin

    def lookup(self, key: str) -> CacheRecord | None:
        found = self.records.get(key)
        return found[0] if found is not None else None

    def fetch(self, record: CacheRecord) -> bool:
        """Bring the record's layer into the store; False (after one warning) when it cannot."""
        layer = record.layer
        if layer is None or (self.store.has_blob(layer.digest) and self.store.has_layer(layer.diff_id)):
            return True
        _record, origin = self.records[record.key]
        try:
            if not self.store.has_blob(layer.digest):
                client = self.registries.client(origin.ref.registry)
                from lamina.store.transfer import retrying

                tmp = self.store.layout.tmp
                tmp.mkdir(parents=True, exist_ok=True)
                path = retrying(f"download of {layer.digest[7:19]}", None, functools.partial(
                    client.fetch_blob, origin.ref.repository, layer.digest, tmp, size=layer.size))
                try:
                    self.store.ingest_blob(path, layer.digest)
                finally:
                    path.unlink(missing_ok=True)
            self.store.ensure_layer(layer.digest, layer.diff_id)
        except (LaminaError, OSError) as e:
            self.warn(f"[Warning] --cache-from {origin.ref}: layer {layer.digest[7:19]}: {_one_line(e)}; "
                      "running the step")
            return False
        return True


def _gzipped(store: Store, records: list[CacheRecord]) -> list[CacheRecord]:
    """``records`` with each uncompressed layer replaced by its gzip blob."""
    from lamina.store.outbound import GZIPPED_TYPE, gzipped_layer

    outbound: dict[str, CachedLayer] = {}
    result = []
    for record in records:
        layer = record.layer
        if layer is not None and layer.media_type in GZIPPED_TYPE:
            if layer.digest not in outbound:
                digest, size = gzipped_layer(store, layer.digest)
                outbound[layer.digest] = dataclasses.replace(layer, digest=digest, size=size,
                                                             media_type=GZIPPED_TYPE[layer.media_type])
            record = dataclasses.replace(record, layer=outbound[layer.digest])
        result.append(record)
    return result


def _image_layers(config: dict[str, Any], manifest: ImageManifest) -> ImageLayers:
    """diff_id -> the image manifest's blob for it (the config's diff_ids and the manifest's layers
    go in the same order)."""
    from lamina.store.image_schema import config_diff_ids

    diff_ids = config_diff_ids(config, "the image config")
    if len(diff_ids) != len(manifest.layers):
        raise LaminaError(f"the config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
    return {diff_id: (desc.digest, desc.media_type, desc.size)
            for diff_id, desc in zip(diff_ids, manifest.layers, strict=True)}


def _one_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


@contextlib.contextmanager
def open_imports(store: Store, sources: list[CacheSource], warn: Warn) -> Iterator[ImportedCache]:
    """The imported caches of ``sources`` (a failing one left out, with a warning).

    Resource handling: the registry connections are closed when the block ends."""
    registries = Registries()
    try:
        imported = ImportedCache(store, registries, warn)
        for source in sources:
            imported.load(source)
        yield imported
    finally:
        registries.close()


def inline_metadata(records: list[CacheRecord]) -> dict[str, Any]:
    """What ``--cache-to type=inline`` adds to the image config under :data:`INLINE_KEY`."""
    return config_document(records, inline=True)


def export(store: Store, target: CacheTarget, records: list[CacheRecord]) -> str:
    """Upload ``records`` (their layers, metadata and manifest) to ``target.ref``; returns the
    manifest's digest. Error handling: RegistryError (or OSError) on any failure; the ref then
    still names what it named before, since the manifest is written last."""
    from lamina.store import Reference
    from lamina.store.registry_manifest import OCI_MANIFEST
    from lamina.store.transfer import BlobLocations, Progress, transfer_blobs

    ref = Reference.parse(target.ref)
    repository = ref.repository
    records = _gzipped(store, records)
    layers = layers_of(records)
    config = canonical(config_document(records))
    registries = Registries()
    try:
        client = registries.client(ref.registry, target.insecure)
        config_digest = store.put_blob(config)
        locations = BlobLocations(store.layout.blob_locations)
        missing: dict[str, tuple[str, int]] = {}
        for digest in [layer.digest for layer in layers] + [config_digest]:
            if not store.has_blob(digest):
                raise LaminaError(f"the store lacks blob {digest} (run `lamina system check`)")
            if digest not in missing and not client.has_blob(repository, digest):
                missing[digest] = (f"Copying blob {digest[7:19]}", store.blob_path(digest).stat().st_size)

        def upload(own: RegistryClient, digest: str, size: int, report: Callable[[int], None]) -> None:
            mount_from = next((r for r in locations.repositories(ref.registry, digest) if r != repository), None)
            own.upload_blob(repository, digest, store.blob_path(digest), mount_from=mount_from, progress=report)

        transfer_blobs(client, missing, upload, Progress(None), [])
        manifest = canonical(manifest_document(config, config_digest, layers))
        digest = client.put_manifest(repository, ref.tag or ref.digest or "latest", manifest, OCI_MANIFEST)
        locations.record(ref.registry, repository, [layer.digest for layer in layers])
        return digest
    finally:
        registries.close()

