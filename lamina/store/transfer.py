"""Pull and push: the store meets a registry (the verbs are in :mod:`lamina.commands.registry`).

Pull: the manifest (through an index to the requested or host platform) and the config are fetched
and verified; every layer blob the store lacks is downloaded (up to three at once, each retried on a
dropped connection or a busy registry) into the store's temporary directory and verified against its
digest and size. Only when all of them are verified are they ingested and the image recorded, under
one shared store lock, so a registry that lies about any digest leaves the store exactly as it was,
and a concurrent prune cannot remove a blob before the image that needs it is recorded. (A layer
whose digest is right but whose tar is hostile is refused by the store's unpacker; its blob then
stays as an unreferenced blob until ``system prune``.)

Push: every blob the image names (layers, then config) is ``HEAD``-checked; the missing ones are
mounted from another repository of the same registry when lamina has seen them there, else
uploaded; then the manifest goes up. Local layers are plain tars (:mod:`lamina.store.outbound`):
they are gzipped once, on the first push, and the manifest that goes up names the gzipped blobs; a
manifest whose layers are all compressed (a pulled image) goes up exactly as the store holds it, so
the digest the registry records is the digest lamina knows.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from lamina.errors import RegistryError, UsageError
from lamina.store.image_schema import Descriptor, ImageManifest, config_diff_ids
from lamina.store.layer_unpack import Limits
from lamina.store.outbound import outbound_manifest
from lamina.store.progress import LayerProgress, layer_id
from lamina.store.reference import DEFAULT_REGISTRY, Reference
from lamina.store.registry import RegistryClient, TransientRegistryError
from lamina.store.registry_auth import lookup_credentials
from lamina.store.registry_manifest import (
    DOCKER_MANIFEST,
    IMAGE_MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    OCI_MANIFEST,
    Platform,
    parsed,
)
from lamina.store.store import Image, Store

if TYPE_CHECKING:
    from lamina.store.estargz_push import ConvertedImage

log = logging.getLogger(__name__)

# Layer media types lamina can unpack (docker's and OCI's; gzip, zstd or plain tar).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}


# An image with more layers than this is absurd (overlayfs itself stops at 500 lowerdirs).
MAX_LAYERS = 500


def api_host(registry: str) -> str:
    """The host that serves a registry's API (docker.io's lives at registry-1.docker.io)."""
    return "registry-1.docker.io" if registry == DEFAULT_REGISTRY else registry


def is_loopback_registry(registry: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``[::1]`` registries (with or without a port)."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return host in ("localhost", "[::1]") or host.startswith("127.")


def default_tls_verify(registry: str, flag: bool | None = None) -> bool:
    """``--tls-verify`` as given, else docker's default: registries on the loopback network are
    insecure (plain HTTP allowed), every other one needs HTTPS with a trusted certificate."""
    return flag if flag is not None else not is_loopback_registry(registry)


class Progress(LayerProgress):
    """Per-layer progress on ``stream`` (redrawn in place on a terminal, plain lines in a pipe);
    silent when ``stream`` is None."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(LayerProgress.to_stream(stream).renderer)


class BlobLocations:
    """Where on which registry each blob was last seen: ``ROOT/registry/blob-locations.json``.

    Advisory only (as docker's blob info cache): a push asks the registry to mount a blob it lacks in
    the destination repository from a repository that had it, which saves the upload; if the mount
    fails the blob is simply uploaded. Concurrent writers may lose each other's entries, which costs
    at most an upload.
    """

    MAX_REPOSITORIES = 4

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, list[str]]]:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def repositories(self, registry: str, digest: str) -> list[str]:
        found = self._load().get(registry, {}).get(digest, [])
        return [r for r in found if isinstance(r, str)] if isinstance(found, list) else []

    def record(self, registry: str, repository: str, digests: list[str]) -> None:
        data = self._load()
        known = data.setdefault(registry, {})
        for digest in digests:
            repos = [r for r in known.get(digest, []) if r != repository]
            known[digest] = [repository, *repos][: self.MAX_REPOSITORIES]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{os.getpid()}.{self.path.name}.tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("cannot record blob locations in %s: %s", self.path, e)


# ----- pull -----


T = TypeVar("T")

# A dropped connection or a busy registry is retried this many times, after 1, 2, 4... seconds.
RETRIES = 3
RETRY_DELAY = 1.0


def retrying(what: str, report: Callable[[int], None] | None, action: Callable[[], T]) -> T:
    """``action()``, retried after a :class:`TransientRegistryError` (``report(-1)`` restarts the
    byte count from zero)."""
    for attempt in range(RETRIES + 1):
        try:
            return action()
        except TransientRegistryError as e:
            if attempt == RETRIES:
                raise
            delay = RETRY_DELAY * 2 ** attempt
            log.info("%s failed (%s); retrying in %g s", what, e, delay)
            if report is not None:
                report(-1)
            time.sleep(delay)
    raise AssertionError("unreachable")


# Blobs transferred at once, as docker and podman do (each on its own connection).
PARALLEL_TRANSFERS = 3

# What one transfer does: (client of its own, digest, size, progress callback) -> result.
Transfer = Callable[[RegistryClient, str, int, Callable[[int], None]], T]


def transfer_blobs(client: RegistryClient, blobs: dict[str, tuple[str, int]], transfer: Transfer[T],
                   progress: LayerProgress, results: list[tuple[str, T]], counting: str = "Pushing") -> None:
    """Run ``transfer`` for every blob (digest → (label, size)), up to PARALLEL_TRANSFERS at once;
    the bytes of each are reported as the layer's ``counting`` status.

    Transient failures are retried. Resource handling: each result is appended to ``results`` as soon
    as it exists, so the caller can clean up whatever happens. On any error (or Ctrl-C) the other
    transfers are stopped and waited for before the error propagates.
    """
    if len(blobs) <= 1 or PARALLEL_TRANSFERS <= 1:
        for digest, (label, size) in blobs.items():
            report = progress.counter(digest, counting, size)
            results.append((digest, retrying(label, report, functools.partial(transfer, client, digest, size, report))))
        return
    stop = threading.Event()

    def run(digest: str, label: str, size: int) -> T:
        report = progress.counter(digest, counting, size)

        def count(n: int) -> None:
            if stop.is_set():
                raise RegistryError("transfer cancelled")
            report(n)
        with client.clone() as own:
            return retrying(label, count, functools.partial(transfer, own, digest, size, count))

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_TRANSFERS, thread_name_prefix="transfer")
    futures = {pool.submit(run, digest, label, size): digest for digest, (label, size) in blobs.items()}
    try:
        for future in concurrent.futures.as_completed(futures):
            results.append((futures[future], future.result()))
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        finished = {digest for digest, _ in results}
        for future, digest in futures.items():
            if digest not in finished and future.done() and not future.cancelled() and future.exception() is None:
                results.append((digest, future.result()))
        raise
    finally:
        pool.shutdown(wait=True)


def pull_image(store: Store, ref: Reference, client: RegistryClient, progress: Progress,
               platform: Platform | None = None) -> Image:
    """Download ``ref`` into ``store`` (only the blobs it lacks) and record it; returns the Image.

    From an image index, the manifest for ``platform`` (default: this host) is chosen.

    Error handling: RegistryError for anything the registry refuses or gets wrong; the store then
    holds no new image and no unverified byte.
    """
    repository = ref.repository
    reference = ref.digest or ref.tag or "latest"
    progress.line(f"{ref.tag or ref.digest or 'latest'}: Pulling from {repository}")
    manifest, _index = client.get_image_manifest(repository, reference, platform)
    if manifest.media_type not in IMAGE_MANIFEST_TYPES:
        raise RegistryError(f"{ref}: unsupported manifest type {manifest.media_type}")
    image_manifest = manifest.image()
    config_desc, layers = image_manifest.config, image_manifest.layers
    if config_desc.size > MAX_CONFIG_BYTES:
        raise RegistryError(f"{ref}: the image config is {config_desc.size} bytes, more than the "
                            f"{MAX_CONFIG_BYTES} lamina accepts")
    _check_layers(ref, layers)
    tmp_dir = store.layout.tmp
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_digest = config_desc.digest
    if store.has_blob(config_digest):
        config_bytes = store.blob_path(config_digest).read_bytes()
    else:
        config_bytes = retrying(f"download of config {config_digest[7:19]}", None,
                                functools.partial(client.fetch_small_blob, repository, config_digest, tmp_dir,
                                                  size=config_desc.size))
    _check_config(ref, config_bytes, len(layers))

    # Everything is downloaded and verified before anything enters the store: a registry that lies
    # about the last layer leaves no trace of the first ones.
    downloaded: list[tuple[str, Path]] = []
    try:
        missing: dict[str, tuple[str, int]] = {}
        for layer in layers:
            if store.has_blob(layer.digest) or layer.digest in missing:
                progress.layer(layer.digest, "Already exists")
            else:
                missing[layer.digest] = (f"download of layer {layer_id(layer.digest)}", layer.size)
                progress.layer(layer.digest, "Pulling fs layer")

        def download(own: RegistryClient, digest: str, size: int, report: Callable[[int], None]) -> Path:
            path = own.fetch_blob(repository, digest, tmp_dir, size=size, progress=report)
            # fetch_blob has checked the digest and size by the time it returns.
            progress.layer(digest, "Verifying Checksum")
            progress.layer(digest, "Download complete")
            return path

        transfer_blobs(client, missing, download, progress, downloaded, counting="Downloading")
        tags = [str(ref.with_tag(ref.tag))] if ref.tag else []
        # One shared lock from the first blob ingested to the image recorded: a concurrent prune
        # (exclusive) cannot remove blobs that are not referenced yet.
        with store.lock(shared=True):
            for digest, path in downloaded:
                progress.layer(digest, "Extracting")
                store.ingest_blob(path, digest)
                progress.layer(digest, "Pull complete")
            image = store.import_image_from_manifest(manifest.data, config_bytes, tags)
    finally:
        for _, path in downloaded:
            path.unlink(missing_ok=True)
    if image.manifest_digest:
        progress.line(f"Digest: {image.manifest_digest}")
    progress.line(f"Status: {'Downloaded newer image' if downloaded else 'Image is up to date'} for {ref.familiar}")
    BlobLocations(store.layout.blob_locations).record(ref.registry, repository, [config_digest, *(d.digest for d in layers)])
    return image


def _check_layers(ref: Reference, layers: list[Descriptor]) -> None:
    """Refuse, before any download, a manifest whose layers lamina would not accept."""
    if len(layers) > MAX_LAYERS:
        raise RegistryError(f"{ref}: {len(layers)} layers is more than the {MAX_LAYERS} lamina accepts")
    max_layer_bytes = Limits().max_total_bytes
    for layer in layers:
        if layer.size > max_layer_bytes:
            raise RegistryError(f"{ref}: layer {layer.digest} is {layer.size} bytes, more than the limit "
                                f"of {max_layer_bytes} (set LAMINA_MAX_LAYER_BYTES to allow it)")
        if layer.urls:
            raise RegistryError(f"{ref}: layer {layer.digest} is a foreign layer (urls), not supported")
        if layer.media_type not in LAYER_TYPES:
            raise RegistryError(f"{ref}: layer {layer.digest} has unsupported media type "
                                f"{layer.media_type or None!r}")


def _check_config(ref: Reference, config_bytes: bytes, layer_count: int) -> None:
    diff_ids = parsed(config_diff_ids, config_bytes, f"{ref}: the image config")
    if len(diff_ids) != layer_count:
        raise RegistryError(f"{ref}: the config lists {len(diff_ids)} diff_ids for {layer_count} layers")


def strip_transport(text: str) -> str:
    """Accept podman's ``docker://`` transport prefix; refuse other transports with a hint."""
    if text.startswith("docker://"):
        return text[len("docker://"):]
    transport = text.split(":", 1)[0]
    if transport in ("oci", "oci-archive", "docker-archive", "dir", "containers-storage", "docker-daemon"):
        raise UsageError(f"{text}: only registries (docker://) are supported here; "
                         "use lamina save/load for archives")
    return text


def pull(store: Store, reference: str, *, tls_verify: bool | None = None,
         credentials: tuple[str, str] | None = None,
         platform: Platform | None = None, progress_stream: TextIO | None = None,
         cert_dir: Path | None = None) -> Image:
    """Pull ``reference`` into ``store`` as ``lamina pull`` does; for other packages (``FROM``, ``run``).

    Credentials default to those stored by ``lamina login``/``podman login``. Error handling:
    RegistryError (or UsageError for a malformed reference); the store is left as it was.
    """
    ref = Reference.parse(strip_transport(reference))
    if credentials is None:
        credentials = lookup_credentials(ref.registry)
    with RegistryClient(api_host(ref.registry), tls_verify=default_tls_verify(ref.registry, tls_verify),
                        credentials=credentials,
                        cert_dir=cert_dir) as client:
        return pull_image(store, ref, client, Progress(progress_stream), platform)


# ----- push -----


def push_image(store: Store, image: Image, dest: Reference, client: RegistryClient, progress: Progress,
               converted: ConvertedImage | None = None) -> tuple[str, int]:
    """Upload ``image`` to ``dest`` (only the blobs the registry lacks), manifest last.

    With ``converted`` (e.g. from :func:`~lamina.store.estargz_push.open_estargz_image`), its
    manifest and blob files go up instead of the stored ones. Returns the manifest's digest and size.
    """
    manifest_bytes, media_type = _stored_manifest(store, image) if converted is None else \
        (converted.manifest, converted.media_type)
    blob_path = store.blob_path if converted is None else converted.blob_path
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise RegistryError(f"cannot push a manifest of type {media_type}")

    progress.line(f"The push refers to repository [{dest.registry}/{dest.repository}]")

    def compressing(digest: str) -> Callable[[int], None]:
        return progress.counter(digest, "Compressing", store.blobs.size(digest))

    manifest_bytes = outbound_manifest(store, manifest_bytes, compressing)
    stored = parsed(ImageManifest.parse, manifest_bytes, f"the manifest of image {image.id[:12]}")
    repository = dest.repository
    locations = BlobLocations(store.layout.blob_locations)
    blobs = [(layer.digest, "blob") for layer in stored.layers]
    blobs.append((stored.config.digest, "config"))
    missing: dict[str, tuple[str, int]] = {}
    shown = dict.fromkeys(layer.digest for layer in stored.layers)  # docker shows layers, not the config
    for digest in shown:
        progress.layer(digest, "Preparing")
    for digest, kind in blobs:
        path = blob_path(digest)
        if not path.is_file():
            raise RegistryError(f"the store lacks blob {digest} of image {image.id[:12]} "
                                "(run `lamina system check`)")
        if digest in missing or client.has_blob(repository, digest):
            if digest in shown:
                progress.layer(digest, "Layer already exists")
        else:
            missing[digest] = (f"upload of {kind} {layer_id(digest)}", path.stat().st_size)

    def upload(own: RegistryClient, digest: str, size: int, report: Callable[[int], None]) -> None:
        mount_from = next((r for r in locations.repositories(dest.registry, digest) if r != repository), None)
        mounted = own.upload_blob(repository, digest, blob_path(digest), mount_from=mount_from,
                                  progress=report if digest in shown else None)
        if digest in shown:
            progress.layer(digest, f"Mounted from {mount_from}" if mounted else "Pushed")

    transfer_blobs(client, missing, upload, progress, [])
    digest = client.put_manifest(repository, dest.tag or dest.digest or "latest", manifest_bytes, media_type)
    locations.record(dest.registry, repository, [d for d, _ in blobs])
    return digest, len(manifest_bytes)


def _stored_manifest(store: Store, image: Image) -> tuple[bytes, str]:
    """The image's manifest exactly as the store holds it, and its media type."""
    data: bytes = store.manifest_bytes(image)
    try:
        media_type = json.loads(data).get("mediaType") or OCI_MANIFEST
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise RegistryError(f"the stored manifest of image {image.id[:12]} is malformed "
                            "(run `lamina system check`)") from None
    return data, media_type
