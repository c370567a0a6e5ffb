"""The image store under ``--root``: blobs, unpacked layers, images and tags.

Its part of the root (named by :class:`lamina.layout.Layout`)::

    lock                    flock: shared for writers that only add, exclusive for delete/prune/check
    tags.lock               flock: serialises read-modify-write of images/tags.json
    tmp/                    temporary files, named "<pid>.<random>.<kind>" (stale ones are removed)
    blobs/sha256/<hex>      content-addressed blobs (layer tars, configs, manifests)
    layers/<diffhex>/diff   an unpacked layer in unionfs's on-disk format (a lowerdir)
    layers/<diffhex>/layer.json
    images/<idhex>.json     an image record: which manifest blob and config blob make the image
    images/tags.json        {"registry/repository:tag": "<idhex>"} (:mod:`lamina.store.tags`)

The store's other concerns live beside it: locking (:mod:`lamina.store.locks`), who else needs its
digests and garbage collection (:mod:`lamina.store.usage`), verification (:mod:`lamina.store.check`).

Privacy: the root and every directory in it that holds content are 0700, and a store found open
to other users is closed on first use (:mod:`lamina.store.private`): layers hold setuid-root files and
device nodes that no other local user may reach.

Crash safety: every object appears by one ``rename`` of something fully written and fsynced (a blob
file, a layer directory, a record, the tag index), in dependency order (blobs, then layers, then the
image record, then tags). A kill -9 at any point leaves only unreferenced objects and temporary
files, which ``prune``/``check`` remove; nothing half-written is ever visible under its final name.

Locking: adding things (blobs, layers, images, tags) takes the shared lock, since those operations
only ever add complete objects; deleting (rmi, prune) takes the exclusive lock, so it can never
remove a blob another process has just written and is about to reference.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lamina.errors import FormatError, ImageNotFound, StoreError, UsageError
from lamina.layout import Layout
from lamina.store import private
from lamina.store.blobs import BlobStore, digest_hex, fsync_dir, remove_tree, temp_name
from lamina.store.files import canonical_json, write_file_atomic
from lamina.store.locks import hold_store_lock
from lamina.store.reference import Reference, looks_like_id
from lamina.store.tags import TagIndex

if TYPE_CHECKING:
    from lamina.store.usage import OwnerFactory, Usage
from lamina.timeparse import parse_time
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_TO_OCI_LAYER = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER_TAR,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": OCI_LAYER_ZSTD,
}
DEFAULT_BASE_KEY = "docker.io/lamina/busybox:latest"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


def host_arch() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Fields of an image config's "config" object and the JSON types the OCI image spec gives them.
# A config that breaks them would make every later `lamina run` of the image fail, so it is refused
# when the image enters the store (load, pull), not when it is used.
_STRING_LIST_FIELDS = ("Cmd", "Entrypoint", "Env", "Shell", "OnBuild")
_STRING_FIELDS = ("User", "WorkingDir", "StopSignal")
_OBJECT_FIELDS = ("ExposedPorts", "Volumes", "Labels", "Healthcheck")


def validate_image_config(config: Any) -> None:
    """Raise FormatError unless ``config`` has the shape of an OCI image config."""
    if not isinstance(config, dict):
        raise FormatError("image config is not a JSON object")
    runtime = config.get("config")
    if runtime is None:
        return
    if not isinstance(runtime, dict):
        raise FormatError("image config: 'config' is not an object")
    for name in _STRING_LIST_FIELDS:
        value = runtime.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise FormatError(f"image config: {name} must be a list of strings")
        if value is not None and any("\0" in v for v in value):
            raise FormatError(f"image config: {name} contains a NUL byte")
    for name in _STRING_FIELDS:
        value = runtime.get(name)
        if value is not None and not isinstance(value, str):
            raise FormatError(f"image config: {name} must be a string")
    for name in _OBJECT_FIELDS:
        value = runtime.get(name)
        if value is not None and not isinstance(value, dict):
            raise FormatError(f"image config: {name} must be an object")
    for entry in runtime.get("Env") or []:
        if "=" not in entry:
            raise FormatError(f"image config: Env entry {entry!r} is not NAME=VALUE")


@dataclass
class Layer:
    diff_id: str
    digest: str  # the blob this image's manifest names (compressed or not)
    path: Path  # the unpacked layer directory (a lowerdir)
    size: int  # bytes of file content in the layer (docker's SIZE; the tar is bigger: headers, padding)
    media_type: str = OCI_LAYER_GZIP


@dataclass
class Image:
    id: str  # hex of the config digest
    config: dict[str, Any]
    manifest: dict[str, Any]
    manifest_digest: str
    layers: list[Layer]
    tags: list[str] = field(default_factory=list)  # familiar forms, e.g. "busybox:latest"

    @property
    def digest(self) -> str:
        return "sha256:" + self.id

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def created(self) -> dt.datetime | None:
        return parse_time(self.config.get("created"))


class Store:
    """An image store in ``layout``; see the module docstring for layout and guarantees.

    ``owners`` names the other holders of the store's digests (containers, the build cache, live
    mounts; see :mod:`lamina.store.usage`); without them only the store's own images are protected.
    """

    def __init__(self, layout: Layout | Path, owners: OwnerFactory = tuple) -> None:
        self.layout = Layout.of(layout)
        self.root = self.layout.root
        self.blobs = BlobStore(self.layout.blobs, self.layout.tmp)
        self.tmp_dir = self.layout.tmp
        self.layers_dir = self.layout.layers
        self.images_dir = self.layout.images
        self.tags = TagIndex(self.layout)
        self._owners = owners
        self._usage: Usage | None = None

    @classmethod
    def open(cls, where: Layout | Path, owners: OwnerFactory = tuple) -> Store:
        """Open (creating its directories when missing) the store at ``where``."""
        layout = Layout.of(where)
        root = layout.root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            private.make_private_dir(root)
            private.tighten(layout)
            for sub in Layout.CONTENT_DIRS:
                private.make_private_dir(root / sub)
        except OSError as e:
            raise StoreError(f"cannot create the store at {root}: {e.strerror}") from None
        return cls(layout, owners)

    @property
    def usage(self) -> Usage:
        """Who uses what in the store (:mod:`lamina.store.usage`, imported when first asked)."""
        if self._usage is None:
            from lamina.store.usage import Usage

            self._usage = Usage(self, self._owners)
        return self._usage

    def lock(self, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """The store lock (exclusive unless ``shared``), re-entrant within this process (see
        :func:`lamina.store.locks.hold_store_lock`)."""
        return hold_store_lock(self.layout.store_lock, shared)

    # --- blobs (also used by the registry client) ------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.blobs.has(digest)

    def blob_path(self, digest: str) -> Path:
        return self.blobs.path(digest)

    def ingest_blob(self, source: BinaryIO | Path | str, expected_digest: str | None = None) -> Path:
        """Copy a stream or file into the blob store, verifying its digest; return the blob's path.

        Error handling: a digest mismatch raises :class:`FormatError` and stores nothing.
        """
        with self.lock(shared=True):
            digest = self.blobs.ingest(source, expected_digest)
        return self.blobs.path(digest)

    def put_blob(self, data: bytes) -> str:
        with self.lock(shared=True):
            return self.blobs.put_bytes(data)

    def manifest_bytes(self, image: Image) -> bytes:
        return self.blobs.read(image.manifest_digest)

    # --- layers ----------------------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / digest_hex(diff_id) / "diff"

    def has_layer(self, diff_id: str) -> bool:
        return (self.layers_dir / digest_hex(diff_id) / "layer.json").is_file()

    def _layer_info(self, diff_id: str) -> dict[str, Any]:
        try:
            info = json.loads((self.layers_dir / digest_hex(diff_id) / "layer.json").read_bytes())
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def layer_tar_size(self, diff_id: str) -> int:
        """Bytes of the layer's uncompressed tar."""
        return int(self._layer_info(diff_id).get("size", 0))

    def layer_content_size(self, diff_id: str) -> int:
        """Bytes of regular-file content in the layer (what docker shows as its SIZE)."""
        info = self._layer_info(diff_id)
        return int(info.get("content_size", info.get("size", 0)))

    def ensure_layer(self, blob_digest: str, expected_diff_id: str | None = None,
                     progress: Any = None) -> tuple[str, int]:
        """Unpack the layer blob ``blob_digest`` unless its layer exists; return (diff_id, tar size).

        Error handling: a hostile tar or a diff_id mismatch raises :class:`LayerError`; nothing is
        left in ``layers/``.
        """
        # Imported here: the packer and unpacker bring every decompressor, which commands that only
        # read the store (images, run) need not load.
        from lamina.store.layer_unpack import Limits, unpack_layer

        with self.lock(shared=True):
            if expected_diff_id is not None and self.has_layer(expected_diff_id):
                return expected_diff_id, self.layer_tar_size(expected_diff_id)
            work = temp_name(self.tmp_dir, "layer")
            private.make_private_dir(work)
            try:
                result = unpack_layer(self.blobs.path(blob_digest), work / "diff", self.tmp_dir, Limits(),
                                      expected_diff_id=expected_diff_id, progress=progress,
                                      source_digest=blob_digest)
                self.install_layer(work, result.diff_id, result.tar_size, result.content_size)
                return result.diff_id, result.tar_size
            finally:
                if work.exists():
                    remove_tree(work)

    def install_layer(self, work: Path, diff_id: str, size: int, content_size: int) -> None:
        """Publish ``work`` (a directory in ``tmp`` holding a complete ``diff/``) as
        ``layers/<diffhex>`` by one rename."""
        info = {"diff_id": diff_id, "size": size, "content_size": content_size, "created": now_rfc3339()}
        (work / "layer.json").write_bytes(canonical_json(info))
        final = self.layers_dir / digest_hex(diff_id)
        if final.exists():
            return
        try:
            os.rename(work, final)
            fsync_dir(self.layers_dir)
        except OSError as e:
            if not final.exists():  # anything but losing a race to another writer
                raise StoreError(f"cannot move layer into place: {e.strerror}") from None

    def commit_layer(self, diff_dir: Path, progress: Any = None, adopt: bool = False,
                     settle: bool = False) -> Layer:
        """Turn an upper directory (unionfs on-disk format) into a stored layer.

        The directory is written as a deterministic, uncompressed OCI layer tar (whiteouts as
        ``.wh.`` entries, owner overrides in the headers) into the blob store: its digest is its
        diff_id, as containers-storage keeps local layers; it is compressed only on the way out
        (:mod:`lamina.store.outbound`). The layer directory is then unpacked from that blob (so the
        stored layer is exactly what the tar says). ``diff_dir`` itself is only read, unless
        ``adopt``: the caller then promises that ``diff_dir`` was made by
        :func:`store.layer_unpack.unpack_layer` in this store's ``tmp`` (so it already is what
        unpacking the tar would give) and hands it over; it is moved into place, not unpacked again.
        ``settle`` (implies ``adopt``): ``diff_dir`` is a finished RUN step's upper, which the walk
        that packs it also makes what unpacking the tar would give (:mod:`store.layer_settle`),
        and which is then moved into place. Left where it was when the layer was already stored
        (settled, so its user may remove it) or when packing failed (half settled: discard it).
        """
        from lamina.store.layer_pack import pack_layer

        with self.lock(shared=True):
            with self.blobs.writer() as w:
                result = pack_layer(Path(diff_dir), w, compress=False, progress=progress, settle=settle)
            if (adopt or settle) and not self.has_layer(result.diff_id):
                work = temp_name(self.tmp_dir, "layer")
                private.make_private_dir(work)
                try:
                    os.rename(diff_dir, work / "diff")
                    self.install_layer(work, result.diff_id, result.tar_size, result.content_size)
                finally:
                    if work.exists():
                        remove_tree(work)
            diff_id, _tar_size = self.ensure_layer(result.diff_id, result.diff_id)
            return Layer(diff_id=diff_id, digest=diff_id, path=self.layer_dir(diff_id),
                         size=self.layer_content_size(diff_id), media_type=OCI_LAYER_TAR)

    def layer_stack(self, image: Image) -> LayerStack:
        """The image's unpacked layer directories, as a stack (read it top_down() for a lowerdir)."""
        return LayerStack.from_bottom_up(layer.path for layer in image.layers)

    # --- images ----------------------------------------------------------------------------------

    def image_ids(self) -> list[str]:
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if re.fullmatch(r"[0-9a-f]{64}\.json", n))

    def load_image(self, image_id: str, tags: dict[str, str] | None = None) -> Image:
        """The image with the full hex ``image_id``; raises ImageNotFound or StoreError."""
        record_path = self.images_dir / f"{image_id}.json"
        try:
            record = json.loads(record_path.read_bytes())
        except FileNotFoundError:
            raise ImageNotFound(image_id) from None
        except ValueError:
            raise StoreError(f"image record {record_path} is corrupt (run `lamina system check`)") from None
        manifest_digest = record["manifest"]
        manifest = json.loads(self.blobs.read(manifest_digest))
        config = json.loads(self.blobs.read(manifest["config"]["digest"]))
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        layers = []
        for diff_id, desc in zip(diff_ids, manifest.get("layers", []), strict=False):
            layers.append(Layer(diff_id=diff_id, digest=desc["digest"], path=self.layer_dir(diff_id),
                                size=self.layer_content_size(diff_id),
                                media_type=_DOCKER_TO_OCI_LAYER.get(desc.get("mediaType", ""),
                                                                    desc.get("mediaType", OCI_LAYER_TAR))))
        if tags is None:
            tags = self.tags.read()
        names = sorted(Reference.parse(k).familiar for k, v in tags.items() if v == image_id)
        return Image(id=image_id, config=config, manifest=manifest, manifest_digest=manifest_digest,
                     layers=layers, tags=names)

    def images(self) -> list[Image]:
        tags = self.tags.read()
        result = []
        for image_id in self.image_ids():
            try:
                result.append(self.load_image(image_id, tags))
            except (ImageNotFound, StoreError, KeyError, ValueError) as e:
                log.warning("skipping broken image %s: %s", image_id[:12], e)
        return result

    def resolve_image(self, ref_or_id: str) -> Image:
        """Find an image by tag (``busybox``, ``busybox:1``, full reference) or by ID (prefix).

        Error handling: :class:`ImageNotFound` when nothing matches; :class:`UsageError` for an
        ambiguous ID prefix.
        """
        tags = self.tags.read()
        ref: Reference | None = None
        with contextlib.suppress(UsageError):
            ref = Reference.parse(ref_or_id)
        if ref is not None and ref.tag is not None:
            image_id = tags.get(ref.tagged_key)
            if image_id is not None:
                return self.load_image(image_id, tags)
        if ref is not None and ref.digest is not None:
            for image_id in self.image_ids():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    record = json.loads((self.images_dir / f"{image_id}.json").read_bytes())
                    if record.get("manifest") == ref.digest or record.get("repo_digest") == ref.digest:
                        return self.load_image(image_id, tags)
        if looks_like_id(ref_or_id):
            prefix = ref_or_id.removeprefix("sha256:")
            matches = [i for i in self.image_ids() if i.startswith(prefix)]
            if len(matches) == 1:
                return self.load_image(matches[0], tags)
            if len(matches) > 1:
                raise UsageError(f"image ID prefix {ref_or_id!r} is ambiguous ({len(matches)} images)")
        if ref is not None and ref.digest is None and ref.tagged_key == DEFAULT_BASE_KEY:
            # The embedded base is built on first use, so `FROM lamina/busybox` works offline.
            from lamina.store.base import ensure_default_base
            return ensure_default_base(self)
        raise ImageNotFound(ref_or_id)

    def _finish_config(self, layers: list[Layer], config: dict[str, Any], base: Image | None) -> dict[str, Any]:
        cfg = copy.deepcopy(config)
        cfg.setdefault("created", now_rfc3339())
        cfg.setdefault("architecture", base.config.get("architecture") if base else host_arch())
        cfg.setdefault("os", base.config.get("os", "linux") if base else "linux")
        cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        history = cfg.get("history")
        if history is None:
            history = copy.deepcopy(base.config.get("history", [])) if base else []
        non_empty = sum(1 for h in history if not h.get("empty_layer"))
        for _ in range(len(layers) - non_empty):
            history.append({"created": cfg["created"], "created_by": "lamina"})
        cfg["history"] = history
        return cfg

    def create_image(self, layers: list[Layer], config: dict[str, Any], tags: list[str] | None = None,
                     base: Image | None = None) -> Image:
        """Record an image made of ``layers`` (bottom to top) and ``config``; tag it.

        ``rootfs.diff_ids`` is computed; ``created``, ``architecture``, ``os`` and missing history
        entries are filled in. Every layer's blob and directory must already be in the store.
        """
        with self.lock(shared=True):
            for layer in layers:
                if not self.blobs.has(layer.digest) or not self.has_layer(layer.diff_id):
                    raise StoreError(f"layer {layer.diff_id} is not in the store")
            cfg = self._finish_config(layers, config, base)
            config_bytes = canonical_json(cfg)
            config_digest = self.blobs.put_bytes(config_bytes)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                            "size": self.blobs.size(layer.digest)} for layer in layers],
            }
            manifest_digest = self.blobs.put_bytes(canonical_json(manifest))
            return self._record_image(config_digest, manifest_digest, tags or [])

    def _record_image(self, config_digest: str, manifest_digest: str, tags: list[str],
                      extra: dict[str, Any] | None = None) -> Image:
        image_id = digest_hex(config_digest)
        record_path = self.images_dir / f"{image_id}.json"
        if not record_path.exists():
            record = {"id": config_digest, "manifest": manifest_digest, "added": now_rfc3339(), **(extra or {})}
            write_file_atomic(record_path, canonical_json(record), self.tmp_dir)
        if tags:
            self.tags.set([Reference.parse(t) for t in tags], image_id)
        return self.load_image(image_id)

    def import_image_from_manifest(self, manifest_bytes: bytes, config_bytes: bytes, tags: list[str],
                                   progress: Any = None) -> Image:
        """Record an image whose layer blobs are already in the store (pull, load).

        The manifest is kept byte for byte (its digest stays the registry's); missing layers are
        unpacked and checked against the config's diff_ids.
        Error handling: FormatError for a malformed manifest/config, LayerError for a bad layer.
        """
        try:
            manifest = json.loads(manifest_bytes)
            config = json.loads(config_bytes)
            descs = manifest["layers"]
            diff_ids = config["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise FormatError("malformed image manifest or config") from None
        validate_image_config(config)
        if len(descs) != len(diff_ids):
            raise FormatError(f"manifest lists {len(descs)} layers but the config {len(diff_ids)} diff_ids")
        with self.lock(shared=True):
            config_digest = self.blobs.put_bytes(config_bytes)
            if manifest.get("config", {}).get("digest") != config_digest:
                raise FormatError(f"manifest names config {manifest.get('config', {}).get('digest')}, "
                                  f"but the config's digest is {config_digest}")
            for desc, diff_id in zip(descs, diff_ids, strict=True):
                if not self.blobs.has(desc["digest"]):
                    raise StoreError(f"layer blob {desc['digest']} is not in the store")
                self.ensure_layer(desc["digest"], diff_id, progress=progress)
            manifest_digest = self.blobs.put_bytes(manifest_bytes)
            return self._record_image(config_digest, manifest_digest, tags)

    # --- tags ------------------------------------------------------------------------------------

    def tag(self, image: Image, ref: str) -> None:
        with self.lock(shared=True):
            self.tags.set([Reference.parse(ref)], image.id)

    def untag(self, ref: str) -> str:
        """Remove one tag; return the ID it pointed at. Raises ImageNotFound when not a tag."""
        with self.lock(shared=True):
            return self.tags.remove(ref)

    # --- use, deletion, garbage collection -------------------------------------------------------

    def containers_using(self, image_id: str) -> list[str]:
        """Who uses the image, as its owners name them: container IDs, ``mount:<id>`` for live mounts."""
        return self.usage.users_of(image_id)

    def image_in_use(self, image_id: str) -> bool:
        return bool(self.usage.users_of(image_id))

    def dangling_images(self) -> list[Image]:
        return self.usage.dangling_images()

    def delete_image(self, image: Image) -> None:
        """Remove an image and all its tags, then whatever only it referenced."""
        with self.lock():
            self.tags.remove_image(image.id)
            with contextlib.suppress(FileNotFoundError):
                (self.images_dir / f"{image.id}.json").unlink()
            self.gc()

    delete = delete_image  # the name the brief uses

    def gc(self) -> tuple[int, int, int]:
        """Remove unreferenced blobs, layers and stale temporary files: (blobs, layers, bytes freed)."""
        with self.lock():
            return self.usage.collect_garbage()

    # --- verification ----------------------------------------------------------------------------

    def check(self, verify_blobs: bool = True) -> list[str]:
        """Verify the store; the problems found, one line each (see :mod:`lamina.store.check`)."""
        from lamina.store.check import check_store

        return check_store(self, verify_blobs)
