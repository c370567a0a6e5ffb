"""Image archives: ``docker-archive`` and ``oci-archive``, saved and loaded (compressed or not).

docker-archive (``docker save``): ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``),
``repositories``, the config as ``<id>.json`` and each layer as an uncompressed ``<diffid>/layer.tar``.
oci-archive: an OCI image layout in a tar (``oci-layout``, ``index.json`` whose manifests carry
``org.opencontainers.image.ref.name``, ``blobs/sha256/``).

Loading never extracts the archive to disk: members are read through ``tarfile`` and streamed into
the blob store, where digests are checked (``oci-archive`` blobs against their descriptors; every
layer against the config's diff_ids when it is unpacked). An archive is written to a temporary file
next to the destination and renamed at the end, so a failed save leaves no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lamina.bounded import ARCHIVE_MANIFEST_LIMIT, JSON_LIMIT, InputTooLarge, read_at_most
from lamina.errors import FormatError, LaminaError, LayerError, UsageError
from lamina.store import load_in_place
from lamina.store.blobs import digest_hex, remove_tree, temp_name
from lamina.store.compression import NoSpace, decompress_file, detect, open_decompressed
from lamina.store.image_schema import (
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    DockerArchiveEntry,
    ImageManifest,
    Index,
    config_diff_ids,
    parse_json,
)
from lamina.store.layer_unpack import Limits
from lamina.store.platforms import choose_manifest, host_platform, offered
from lamina.store.progress import LayerProgress
from lamina.store.reference import Reference
from lamina.store.store import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Image,
    Store,
    canonical_json,
)

log = logging.getLogger(__name__)

DOCKER_ARCHIVE = "docker-archive"
OCI_ARCHIVE = "oci-archive"
REF_NAME = "org.opencontainers.image.ref.name"
SAVING = "Saving layer"  # a layer's status while save writes it, as load's "Loading layer"
ARCHIVE_IDENT = "archive"  # what the progress of the whole archive (read, decompressed) is shown as
ARCHIVE_STEP_SILENCE = 3.0  # seconds a step of the whole archive runs before it is shown
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass
class SaveItem:
    image: Image
    refs: list[Reference]  # the names to record for it (may be empty: saved by ID)


# --- save ----------------------------------------------------------------------------------------


class _HashingReader:
    """Reads from ``src`` and hashes what it returns; used to check a layer while it is copied.
    ``progress`` is told each read's byte count."""

    def __init__(self, src: Any, progress: Callable[[int], None] | None = None) -> None:
        self.src = src
        self.hasher = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.hasher.update(data)
        self.size += len(data)
        if self.progress is not None:
            self.progress(len(data))
        return data


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_blob(tar: tarfile.TarFile, store: Store, digest: str, name: str, progress: LayerProgress,
              layer: bool = False) -> None:
    path = store.blob_path(digest)
    info = tar.gettarinfo(str(path), arcname=name)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    with open(path, "rb") as f:
        if not layer:
            tar.addfile(info, f)
            return
        count = progress.counter(digest, SAVING, info.size)
        tar.addfile(info, _HashingReader(f, count))
    progress.layer(digest, SAVING, info.size, info.size)


def _add_plain_layer(tar: tarfile.TarFile, store: Store, layer: Any, name: str, progress: LayerProgress) -> None:
    """Add the layer as an uncompressed tar, decompressing its blob on the fly and checking diff_id."""
    info = tarfile.TarInfo(name)
    info.size = store.layer_tar_size(layer.diff_id)
    info.mode = 0o644
    if info.size == 0:
        raise FormatError(f"layer {layer.diff_id}: size unknown (run `lamina system check`)")
    with open(store.blob_path(layer.digest), "rb") as f:
        stream, _kind = open_decompressed(f)
        reader = _HashingReader(stream, progress.counter(layer.diff_id, SAVING, info.size))
        try:
            tar.addfile(info, reader)
        except OSError as e:
            raise FormatError(f"layer {layer.diff_id}: blob is shorter than its recorded size ({e})") from None
        if "sha256:" + reader.hasher.hexdigest() != layer.diff_id or stream.read(1):
            raise FormatError(f"layer {layer.diff_id}: stored blob does not match (run `lamina system check`)")
    progress.layer(layer.diff_id, SAVING, info.size, info.size)


def save(store: Store, items: list[SaveItem], out: Path, fmt: str, progress: LayerProgress | None = None) -> None:
    """Write ``items`` as a ``docker-archive`` or ``oci-archive`` tar at ``out``; ``progress`` of
    each layer as load's (``<id>: Saving layer  X/Y``).

    Resource handling: writes a temporary file next to ``out`` and renames it at the end; removes
    it on any failure.
    """
    if fmt not in (DOCKER_ARCHIVE, OCI_ARCHIVE):
        raise UsageError(f"save: --format must be docker-archive or oci-archive, not {fmt!r}")
    out = out.absolute()
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    progress = progress or LayerProgress(None)
    try:
        with open(tmp, "xb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if fmt == DOCKER_ARCHIVE:
                _save_docker(tar, store, items, progress)
            else:
                _save_oci(tar, store, items, progress)
        os.rename(tmp, out)
    except FileExistsError:
        raise LaminaError(f"save: {tmp} exists (another save running?)") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _save_docker(tar: tarfile.TarFile, store: Store, items: list[SaveItem], progress: LayerProgress) -> None:
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    for item in items:
        image = item.image
        config_name = f"{image.id}.json"
        if config_name not in written:
            _add_bytes(tar, config_name, store.blobs.read(image.digest))
            written.add(config_name)
        layer_names = []
        for layer in image.layers:
            hex_ = digest_hex(layer.diff_id)
            name = f"{hex_}/layer.tar"
            if name not in written:
                _add_dir(tar, hex_)
                _add_plain_layer(tar, store, layer, name, progress)
                written.add(name)
            layer_names.append(name)
        repo_tags = [r.familiar for r in item.refs if r.tag]
        manifest.append({"Config": config_name, "RepoTags": repo_tags or None, "Layers": layer_names})
        for ref in item.refs:
            if ref.tag and image.layers:
                repositories.setdefault(ref.familiar_name, {})[ref.tag] = digest_hex(image.layers[-1].diff_id)
    _add_bytes(tar, "manifest.json", canonical_json(manifest))
    _add_bytes(tar, "repositories", canonical_json(repositories))


def _save_oci(tar: tarfile.TarFile, store: Store, items: list[SaveItem], progress: LayerProgress) -> None:
    _add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    _add_dir(tar, "blobs")
    _add_dir(tar, "blobs/sha256")
    written: set[str] = set()
    descriptors: list[dict[str, Any]] = []

    def blob(digest: str, layer: bool = False) -> None:
        if digest not in written:
            _add_blob(tar, store, digest, f"blobs/sha256/{digest_hex(digest)}", progress, layer)
            written.add(digest)

    for item in items:
        image = item.image
        for layer in image.layers:
            blob(layer.digest, layer=True)
        blob(image.manifest["config"]["digest"])
        blob(image.manifest_digest)
        base = {"mediaType": image.manifest.get("mediaType", OCI_MANIFEST), "digest": image.manifest_digest,
                "size": store.blobs.size(image.manifest_digest)}
        # One descriptor per image: podman and skopeo refuse an index that lists an image twice.
        if any(d["digest"] == image.manifest_digest for d in descriptors):
            continue
        refs = [r for r in item.refs if r.tag]
        if refs:
            base["annotations"] = {REF_NAME: str(refs[0]), CONTAINERD_NAME: str(refs[0])}
        descriptors.append(base)
    _add_bytes(tar, "index.json", canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                  "manifests": descriptors}))


# --- load ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_archive(path: Path, store: Store, progress: LayerProgress) -> Iterator[tarfile.TarFile]:
    """Open an archive for random access, decompressing it to a temporary file first if needed."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"load: cannot open {path}: {e.strerror}") from None
    tmp: Path | None = None
    try:
        kind = detect(f.read(6))
        f.seek(0)
        if kind is not None:
            tmp = temp_name(store.tmp_dir, "archive")
            count = progress.counter(ARCHIVE_IDENT, "Decompressing", None, silent_for=ARCHIVE_STEP_SILENCE)
            decompress_file(f, tmp, Limits().max_total_bytes, str(path), count)
            f.close()
            f = open(tmp, "rb")
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError:
            raise FormatError(f"{path}: not a tar archive (nor a compressed one)") from None
        with tar:
            yield tar
    finally:
        f.close()
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class _Archive:
    def __init__(self, tar: tarfile.TarFile, path: Path, progress: LayerProgress | None = None) -> None:
        self.tar = tar
        self.path = path
        self.progress = progress or LayerProgress(None)
        try:
            members = tar.getmembers()
        except tarfile.TarError as e:
            raise FormatError(f"{path}: malformed tar: {e}") from None
        self.members = {posixpath.normpath(m.name.lstrip("/")): m for m in members}

    def member(self, name: str, depth: int = 0) -> tarfile.TarInfo:
        key = posixpath.normpath(name.lstrip("/"))
        m = self.members.get(key)
        if m is None or key.startswith("../"):
            raise FormatError(f"{self.path}: archive lacks {name!r}")
        if m.issym() or m.islnk():
            # docker writes duplicate layers as symlinks to the first copy.
            if depth > 8:
                raise FormatError(f"{self.path}: {name!r}: too many links")
            target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(key), m.linkname)
            return self.member(target, depth + 1)
        if not m.isreg():
            raise FormatError(f"{self.path}: {name!r} is not a file")
        return m

    def open(self, name: str) -> IO[bytes]:
        f = self.tar.extractfile(self.member(name))
        assert f is not None
        return f

    def read_json(self, name: str, limit: int = JSON_LIMIT) -> tuple[bytes, Any]:
        """The bytes and JSON value of member ``name``, refused beyond ``limit`` bytes."""
        m = self.member(name)
        what = f"{self.path}: {name}"
        if m.size > limit:
            raise InputTooLarge(what, limit)
        data = read_at_most(self.open(name), limit, what)
        return data, parse_json(data, what)


def _layer_media_type(store: Store, digest: str) -> str:
    with open(store.blob_path(digest), "rb") as f:
        kind = detect(f.read(6))
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(kind or "", OCI_LAYER_TAR)


def load(store: Store, path: Path, progress: LayerProgress | None = None) -> list[tuple[Image, list[str]]]:
    """Load every image of a docker-archive or oci-archive (detected, compressed or not), telling
    ``progress`` of each layer as docker's load does (``<id>: Loading layer  X/Y``).

    Returns each loaded image with the names it was given. Error handling: FormatError for an
    archive we do not understand; LayerError for a hostile layer. Nothing becomes visible in the
    store for an image whose load failed.
    """
    blobs_before = set(store.blobs.all_digests())
    layers_before = set(os.listdir(store.layers_dir))
    try:
        # Shared from the first blob to the last image recorded, so a concurrent prune cannot
        # collect blobs and layers that no image names yet. Released before the cleanup below,
        # which needs the exclusive lock.
        with store.lock(shared=True), _open_archive(path, store, progress or LayerProgress(None)) as tar:
            archive = _Archive(tar, path, progress)
            try:
                if "manifest.json" in archive.members:
                    return _load_docker(store, archive)
                if "index.json" in archive.members:
                    return _load_oci(store, archive)
            except LayerError as e:
                if str(e).startswith(str(path)):
                    raise
                raise LayerError(f"{path}: layer refused: {e}") from None
            except FormatError as e:
                if str(e).startswith(str(path)):
                    raise
                raise FormatError(f"{path}: {e}") from None
            raise FormatError(f"{path}: neither a docker-archive (manifest.json) nor an oci-archive (index.json)")
    except OSError as e:
        _forget_objects_of_failed_load(store, blobs_before, layers_before)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(store.tmp_dir, str(path)) from None
        raise
    except BaseException:
        _forget_objects_of_failed_load(store, blobs_before, layers_before)
        raise


def _forget_objects_of_failed_load(store: Store, blobs_before: set[str], layers_before: set[str]) -> None:
    """Remove the blobs and unpacked layers a failed load brought in: the store is left as it was.

    Only objects that were not there before and that nothing references (another process may have
    committed an image naming one meanwhile) are removed.
    """
    with store.lock():
        keep_blobs, keep_layers = store.usage.roots()
        for digest in set(store.blobs.all_digests()) - blobs_before - keep_blobs:
            store.blobs.remove(digest)
        for name in set(os.listdir(store.layers_dir)) - layers_before:
            if "sha256:" + name not in keep_layers:
                remove_tree(store.layers_dir / name)


def _ingest_member(store: Store, archive: _Archive, name: str, expected: str | None,
                   size: int | None = None) -> str:
    m = archive.member(name)
    if size is not None and m.size != size:
        raise FormatError(f"{archive.path}: {name} is {m.size} bytes, its descriptor says size {size}")
    ident = _layer_ident(name, expected)
    count = archive.progress.counter(ident, "Loading layer", m.size)
    with store.lock(shared=True):
        digest = store.blobs.ingest(archive.open(name), expected, progress=count)  # type: ignore[arg-type]
    archive.progress.layer(ident, "Loading layer", m.size, m.size)
    return digest


def _load_plain_layer(store: Store, archive: _Archive, name: str, diff_id: str) -> str | None:
    """Store a plain (uncompressed) layer member as blob and unpacked layer at once
    (:func:`lamina.store.load_in_place.add_plain_layer`); None, having done nothing, for any other member."""
    m = archive.member(name)
    fileno = getattr(archive.tar.fileobj, "fileno", None)
    if store.has_layer(diff_id) or m.sparse or fileno is None:
        return None
    fd = fileno()
    if detect(os.pread(fd, 6, m.offset_data)) is not None:
        return None
    ident = _layer_ident(name, None)
    count = archive.progress.counter(ident, "Loading layer", m.size)
    digest = load_in_place.add_plain_layer(store, fd, m.offset_data, m.size, diff_id, progress=count)
    archive.progress.layer(ident, "Loading layer", m.size, m.size)
    return digest


def _layer_ident(name: str, expected: str | None) -> str:
    # docker names a layer by the hex in its archive name; so does lamina, where there is one.
    found = re.search(r"[0-9a-f]{64}", expected or name)
    return found.group() if found else hashlib.sha256(name.encode()).hexdigest()


def _load_docker(store: Store, archive: _Archive) -> list[tuple[Image, list[str]]]:
    _raw, doc = archive.read_json("manifest.json", ARCHIVE_MANIFEST_LIMIT)
    entries = DockerArchiveEntry.parse_all(doc, f"{archive.path}: manifest.json")
    loaded = []
    for entry in entries:
        config_bytes, config = archive.read_json(entry.config)
        diff_ids = config_diff_ids(config, f"{archive.path}: {entry.config}")
        if len(diff_ids) != len(entry.layers):
            raise FormatError(f"{archive.path}: {entry.config} lists {len(diff_ids)} diff_ids for "
                              f"{len(entry.layers)} layers")
        tags = [str(Reference.parse(t)) for t in entry.repo_tags]
        descs = []
        for name, diff_id in zip(entry.layers, diff_ids, strict=True):
            digest = _load_plain_layer(store, archive, name, diff_id) or \
                _ingest_member(store, archive, name, None)
            descs.append({"mediaType": _layer_media_type(store, digest), "digest": digest,
                          "size": store.blobs.size(digest)})
            if descs[-1]["mediaType"] == OCI_LAYER_TAR and digest != diff_id:
                raise LayerError(f"{archive.path}: {name} does not match diff_id {diff_id}")
        config_digest = store.put_blob(config_bytes)
        oci_manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                        "layers": descs}
        image = store.import_image_from_manifest(canonical_json(oci_manifest), config_bytes, tags,
                                                 progress=None)
        loaded.append((image, tags))
    return loaded


def _load_oci(store: Store, archive: _Archive) -> list[tuple[Image, list[str]]]:
    _raw, doc = archive.read_json("index.json")
    index = Index.parse(doc, f"{archive.path}: index.json")
    if not index.manifests:
        raise FormatError(f"{archive.path}: index.json lists no images")
    loaded = []
    for desc in index.manifests:
        annotations = desc.annotations
        chosen = _choose_manifest(archive, desc)
        manifest_bytes, doc = _read_blob_json(archive, chosen)
        manifest = ImageManifest.parse(doc, f"{archive.path}: manifest {chosen.digest}")
        config_bytes, config = _read_blob_json(archive, manifest.config)
        config_diff_ids(config, f"{archive.path}: config {manifest.config.digest}")
        for layer in manifest.layers:
            if not store.has_blob(layer.digest):
                _ingest_member(store, archive, _blob_name(layer.digest), layer.digest, size=layer.size)
            elif store.blobs.size(layer.digest) != layer.size:
                raise FormatError(f"{archive.path}: layer {layer.digest} is {store.blobs.size(layer.digest)} "
                                  f"bytes, its descriptor says {layer.size}")
        store.put_blob(manifest_bytes)
        tags = _oci_names(annotations)
        image = store.import_image_from_manifest(manifest_bytes, config_bytes, tags)
        loaded.append((image, tags))
    return loaded


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest_hex(digest)}"


def _read_blob_json(archive: _Archive, desc: Descriptor) -> tuple[bytes, Any]:
    """A JSON blob of the layout, checked against its descriptor's digest and size."""
    data, doc = archive.read_json(_blob_name(desc.digest))
    if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise FormatError(f"{archive.path}: blob {desc.digest} does not match its digest")
    if len(data) != desc.size:
        raise FormatError(f"{archive.path}: blob {desc.digest} is {len(data)} bytes, its descriptor says "
                          f"size {desc.size}")
    return data, doc


# An index may name other indexes (containerd and BuildKit write one for attestations); deeper
# than this is no image anyone made.
MAX_INDEX_DEPTH = 4


def _choose_manifest(archive: _Archive, desc: Descriptor, depth: int = 0) -> Descriptor:
    """The image manifest ``desc`` stands for: itself, or the host's platform in the index it names."""
    if desc.media_type not in INDEX_TYPES:
        return desc
    if depth == MAX_INDEX_DEPTH:
        raise FormatError(f"{archive.path}: indexes nested more than {MAX_INDEX_DEPTH} deep")
    _data, doc = _read_blob_json(archive, desc)
    index = Index.parse(doc, f"{archive.path}: index {desc.digest}")
    want = host_platform()
    # Only the entry for this platform is followed, so a crafted index costs one path, not a tree.
    entry = choose_manifest(index.manifests, want)
    if entry is None:
        raise FormatError(f"{archive.path}: index {desc.digest} has no image for {want} "
                          f"(it offers: {offered(index.manifests)})")
    return _choose_manifest(archive, entry, depth + 1)


def _oci_names(annotations: dict[str, str]) -> list[str]:
    for key in (CONTAINERD_NAME, REF_NAME):
        name = annotations.get(key)
        if not name:
            continue
        # A bare ref.name like "latest" is a tag without a repository: it names no image we can use.
        if "/" not in name and ":" not in name and key == REF_NAME:
            continue
        try:
            return [str(Reference.parse(name))]
        except UsageError:
            log.info("ignoring unusable image name %r in the archive", name)
    return []
