"""The image store under ``--root``: blobs, unpacked layers, images and tags.

Layout::

    lock                    flock: shared for writers that only add, exclusive for delete/prune/check
    tags.lock               flock: serialises read-modify-write of images/tags.json
    tmp/                    temporary files, named "<pid>.<random>.<kind>" (stale ones are removed)
    blobs/sha256/<hex>      content-addressed blobs (layer tars, configs, manifests)
    layers/<diffhex>/diff   an unpacked layer in unionfs's on-disk format (a lowerdir)
    layers/<diffhex>/layer.json
    images/<idhex>.json     an image record: which manifest blob and config blob make the image
    images/tags.json        {"registry/repository:tag": "<idhex>"}

Privacy: the root and every directory in it that holds content are 0700, and a store found open
to other users is closed on first use (:mod:`store.private`): layers hold setuid-root files and
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
import fcntl
import json
import logging
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lamina.errors import FormatError, ImageNotFound, StoreError, UsageError
from lamina.store import private
from lamina.store.blobs import (
    BlobStore,
    digest_hex,
    fsync_dir,
    remove_stale_temps,
    remove_tree,
    temp_name,
)
from lamina.store.layer_pack import pack_layer
from lamina.store.layer_unpack import Limits, unpack_layer
from lamina.store.reference import Reference, looks_like_id
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
_DIGEST_IN_TEXT = re.compile(r"sha256:([0-9a-f]{64})")
# root realpath -> [fd, flock mode, depth]: the store locks this process holds.
_HELD_LOCKS: dict[str, list[int]] = {}
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


def _has_blob_safe(blobs: BlobStore, digest: str) -> bool:
    try:
        return blobs.has(digest)
    except FormatError:
        return False


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def write_file_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` by temp file + fsync + rename (+ fsync of the directory)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(tmp_dir, "json")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
    """An image store rooted at ``root``; see the module docstring for layout and guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.tmp_dir = root / "tmp"
        self.layers_dir = root / "layers"
        self.images_dir = root / "images"
        self.tags_file = self.images_dir / "tags.json"

    @classmethod
    def open(cls, root: Path) -> Store:
        """Open (creating its layout when missing) the store at ``root``."""
        root = Path(root)
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            private.make_private_dir(root)
            private.tighten(root)
            for sub in private.CONTENT_DIRS:
                private.make_private_dir(root / sub)
        except OSError as e:
            raise StoreError(f"cannot create the store at {root}: {e.strerror}") from None
        return cls(root)

    # --- locking ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Hold the store lock (exclusive unless ``shared``); re-entrant within this process.

        Re-entrancy is per process and root, not per Store object: flock locks taken through two
        open files of one process would otherwise block each other.
        Resource handling: the lock is released when the outermost ``with`` ends. A nested request
        for a stronger lock than the one held is an error (upgrading flock is not atomic).
        """
        want = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        key = os.path.realpath(self.root)
        held = _HELD_LOCKS.get(key)
        if held is not None:
            if want == fcntl.LOCK_EX and held[1] == fcntl.LOCK_SH:
                raise StoreError("internal error: exclusive store lock requested while holding a shared one")
            held[2] += 1
            try:
                yield
            finally:
                held[2] -= 1
            return
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, want | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for the lock on the store %s", self.root)
                fcntl.flock(fd, want)
            _HELD_LOCKS[key] = [fd, want, 1]
            yield
        finally:
            _HELD_LOCKS.pop(key, None)
            os.close(fd)

    @contextlib.contextmanager
    def _tags_lock(self) -> Iterator[None]:
        fd = os.open(self.root / "tags.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
        with self.lock(shared=True):
            if expected_diff_id is not None and self.has_layer(expected_diff_id):
                return expected_diff_id, self.layer_tar_size(expected_diff_id)
            work = temp_name(self.tmp_dir, "layer")
            private.make_private_dir(work)
            try:
                result = unpack_layer(self.blobs.path(blob_digest), work / "diff", self.tmp_dir, Limits(),
                                      expected_diff_id=expected_diff_id, progress=progress,
                                      source_digest=blob_digest)
                self._install_layer(work, result.diff_id, result.tar_size, result.content_size)
                return result.diff_id, result.tar_size
            finally:
                if work.exists():
                    remove_tree(work)

    def _install_layer(self, work: Path, diff_id: str, size: int, content_size: int) -> None:
        """Publish ``work`` (holding a complete ``diff/``) as ``layers/<diffhex>`` by one rename."""
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

    def commit_layer(self, diff_dir: Path, progress: Any = None, adopt: bool = False) -> Layer:
        """Turn an upper directory (unionfs on-disk format) into a stored layer.

        The directory is written as a deterministic gzip-compressed OCI layer tar (whiteouts as
        ``.wh.`` entries, owner overrides in the headers) into the blob store, then unpacked from
        that blob into ``layers/`` (so the stored layer is exactly what the tar says). ``diff_dir``
        itself is only read, unless ``adopt``: the caller then promises that ``diff_dir`` was made by
        :func:`store.layer_unpack.unpack_layer` in this store's ``tmp`` (so it already is what
        unpacking the tar would give) and hands it over; it is moved into place, not unpacked again.
        """
        with self.lock(shared=True):
            with self.blobs.writer() as w:
                result = pack_layer(Path(diff_dir), w, compress=True, progress=progress)
            assert result.digest is not None
            if adopt and not self.has_layer(result.diff_id):
                work = temp_name(self.tmp_dir, "layer")
                private.make_private_dir(work)
                try:
                    os.rename(diff_dir, work / "diff")
                    self._install_layer(work, result.diff_id, result.tar_size, result.content_size)
                finally:
                    if work.exists():
                        remove_tree(work)
            diff_id, _tar_size = self.ensure_layer(result.digest, result.diff_id)
            return Layer(diff_id=diff_id, digest=result.digest, path=self.layer_dir(diff_id),
                         size=self.layer_content_size(diff_id), media_type=OCI_LAYER_GZIP)

    def layer_stack(self, image: Image) -> LayerStack:
        """The image's unpacked layer directories, as a stack (read it top_down() for a lowerdir)."""
        return LayerStack.from_bottom_up(layer.path for layer in image.layers)

    # --- images ----------------------------------------------------------------------------------

    def _read_tags(self) -> dict[str, str]:
        try:
            data = json.loads(self.tags_file.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise StoreError(f"{self.tags_file} is corrupt (run `lamina system check`)") from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_tags(self, tags: dict[str, str]) -> None:
        write_file_atomic(self.tags_file, canonical_json(dict(sorted(tags.items()))), self.tmp_dir)

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
            tags = self._read_tags()
        names = sorted(Reference.parse(k).familiar for k, v in tags.items() if v == image_id)
        return Image(id=image_id, config=config, manifest=manifest, manifest_digest=manifest_digest,
                     layers=layers, tags=names)

    def images(self) -> list[Image]:
        tags = self._read_tags()
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
        tags = self._read_tags()
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
            self._set_tags([Reference.parse(t) for t in tags], image_id)
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

    def _set_tags(self, refs: list[Reference], image_id: str) -> None:
        for ref in refs:
            if ref.tag is None:
                raise UsageError(f"cannot tag with a digest reference: {ref}")
        with self._tags_lock():
            tags = self._read_tags()
            for ref in refs:
                tags[ref.tagged_key] = image_id
            self._write_tags(tags)

    def tag(self, image: Image, ref: str) -> None:
        with self.lock(shared=True):
            self._set_tags([Reference.parse(ref)], image.id)

    def untag(self, ref: str) -> str:
        """Remove one tag; return the ID it pointed at. Raises ImageNotFound when not a tag."""
        key = Reference.parse(ref).tagged_key
        with self.lock(shared=True), self._tags_lock():
            tags = self._read_tags()
            image_id = tags.pop(key, None)
            if image_id is None:
                raise ImageNotFound(ref)
            self._write_tags(tags)
            return image_id

    # --- use, deletion, garbage collection -------------------------------------------------------

    def containers_using(self, image_id: str) -> list[str]:
        """IDs of containers made from the image, and ``mount:<id>`` for live `lamina mount`s of it."""
        image_id = image_id.removeprefix("sha256:")
        users = []
        for path in sorted((self.root / "containers").glob("*/container.json")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_bytes())
                if str(data.get("image_id", "")).removeprefix("sha256:") == image_id:
                    users.append(path.parent.name)
        for path, data in self._live_mounts():
            if str(data.get("image_id", "")).removeprefix("sha256:") == image_id:
                users.append("mount:" + path.parent.name)
        return users

    def _live_mounts(self) -> list[tuple[Path, dict[str, Any]]]:
        """The inspector's `lamina mount` records whose unionfs server is still alive."""
        live = []
        for path in sorted((self.root / "mounts").glob("*/state.json")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_bytes())
                pid = data.get("pid")
                if isinstance(data, dict) and isinstance(pid, int) and pid > 0 and os.path.exists(f"/proc/{pid}"):
                    live.append((path, data))
        return live

    def image_in_use(self, image_id: str) -> bool:
        return bool(self.containers_using(image_id.removeprefix("sha256:")))

    def delete_image(self, image: Image) -> None:
        """Remove an image and all its tags, then whatever only it referenced."""
        with self.lock():
            with self._tags_lock():
                tags = self._read_tags()
                remaining = {k: v for k, v in tags.items() if v != image.id}
                if remaining != tags:
                    self._write_tags(remaining)
            with contextlib.suppress(FileNotFoundError):
                (self.images_dir / f"{image.id}.json").unlink()
            self.gc()

    delete = delete_image  # the name the brief uses

    def _gc_roots(self) -> tuple[set[str], set[str]]:
        """(blob digests, layer diff_ids) that must be kept."""
        blobs: set[str] = set()
        diff_ids: set[str] = set()
        for image_id in self.image_ids():
            try:
                record = json.loads((self.images_dir / f"{image_id}.json").read_bytes())
                blobs.add(record["manifest"])
                manifest = json.loads(self.blobs.read(record["manifest"]))
                blobs.add(manifest["config"]["digest"])
                blobs.update(d["digest"] for d in manifest.get("layers", []))
                config = json.loads(self.blobs.read(manifest["config"]["digest"]))
                diff_ids.update(config.get("rootfs", {}).get("diff_ids", []))
            except (OSError, ValueError, KeyError, StoreError) as e:
                log.info("image %s is broken (%s); its objects are not protected", image_id[:12], e)
        # The runner's containers and the builder's cache may name layers or blobs: keep anything a
        # JSON file there mentions.
        named = [*self.root.glob("containers/*/*.json"), *self.root.glob("build-cache/**/*.json"),
                 *(path for path, _ in self._live_mounts())]
        for path in named:
            with contextlib.suppress(OSError):
                for hex_ in _DIGEST_IN_TEXT.findall(path.read_text(errors="replace")):
                    blobs.add("sha256:" + hex_)
                    diff_ids.add("sha256:" + hex_)
        return blobs, diff_ids

    def gc(self) -> tuple[int, int, int]:
        """Remove unreferenced blobs, layers and stale temporary files: (blobs, layers, bytes freed)."""
        with self.lock():
            keep_blobs, keep_layers = self._gc_roots()
            freed = n_blobs = n_layers = 0
            for digest in list(self.blobs.all_digests()):
                if digest not in keep_blobs:
                    with contextlib.suppress(OSError):
                        freed += self.blobs.size(digest)
                    self.blobs.remove(digest)
                    n_blobs += 1
            for entry in list(os.scandir(self.layers_dir)):
                if "sha256:" + entry.name not in keep_layers:
                    freed += self.layer_content_size("sha256:" + entry.name) if len(entry.name) == 64 else 0
                    # Rename first so a crash mid-removal never leaves a half-deleted layer visible.
                    doomed = temp_name(self.tmp_dir, "doomed")
                    os.rename(entry.path, doomed)
                    try:
                        remove_tree(doomed)
                    except OSError as e:  # already out of sight; the next prune retries
                        log.info("cannot remove %s yet: %s", doomed, e)
                    n_layers += 1
            remove_stale_temps(self.tmp_dir)
            return n_blobs, n_layers, freed

    def dangling_images(self) -> list[Image]:
        return [image for image in self.images() if not image.tags and not self.image_in_use(image.id)]

    # --- verification ----------------------------------------------------------------------------

    def check(self, verify_blobs: bool = True) -> list[str]:
        """Verify the store; return a list of problems (empty when clean).

        Checks blob digests, that every image's manifest, config and layer blobs exist, that its
        layers are unpacked, and that every tag names an existing image. Stale temporary files of
        crashed writers are removed (they are never visible, only wasted space). Directories that
        were open to other users (those :meth:`open` tightened) are reported, and every layer,
        container and mount directory is made private too (see :mod:`store.private`).
        """
        problems = private.tightened_by_this_process(self.root)
        with self.lock():
            problems.extend(private.foreign_owner(self.root))
            private.tighten_objects(self.root)
            remove_stale_temps(self.tmp_dir)
            if verify_blobs:
                for digest in self.blobs.all_digests():
                    if not self.blobs.verify(digest):
                        problems.append(f"blob {digest}: content does not match its digest")
            for entry in os.scandir(self.layers_dir):
                if not re.fullmatch(r"[0-9a-f]{64}", entry.name):
                    problems.append(f"layers/{entry.name}: not a layer directory name")
                elif not os.path.isdir(os.path.join(entry.path, "diff")) or \
                        not os.path.isfile(os.path.join(entry.path, "layer.json")):
                    problems.append(f"layers/{entry.name}: incomplete layer")
            ids = set(self.image_ids())
            for image_id in sorted(ids):
                problems.extend(self._check_image(image_id))
            try:
                tags = self._read_tags()
            except StoreError as e:
                problems.append(str(e))
                tags = {}
            for name, image_id in sorted(tags.items()):
                if image_id not in ids:
                    problems.append(f"tag {name}: names missing image {image_id[:12]}")
        return problems

    def _check_image(self, image_id: str) -> list[str]:
        where = f"image {image_id[:12]}"
        try:
            record = json.loads((self.images_dir / f"{image_id}.json").read_bytes())
            manifest_digest = record["manifest"]
        except (OSError, ValueError, KeyError):
            return [f"{where}: unreadable record"]
        if not self.blobs.has(manifest_digest):
            return [f"{where}: manifest blob {manifest_digest} missing"]
        try:
            manifest = json.loads(self.blobs.read(manifest_digest))
            config_digest = manifest["config"]["digest"]
            if digest_hex(config_digest) != image_id:
                return [f"{where}: manifest names another config {config_digest}"]
            if not self.blobs.has(config_digest):
                return [f"{where}: config blob {config_digest} missing"]
            config = json.loads(self.blobs.read(config_digest))
            diff_ids = config["rootfs"]["diff_ids"]
            descs = manifest["layers"]
        except (ValueError, KeyError, TypeError, StoreError, FormatError) as e:
            return [f"{where}: malformed manifest or config ({e})"]
        problems = []
        if len(diff_ids) != len(descs):
            problems.append(f"{where}: {len(descs)} layers in the manifest, {len(diff_ids)} diff_ids")
        for desc in descs:
            if not _has_blob_safe(self.blobs, desc.get("digest", "")):
                problems.append(f"{where}: layer blob {desc.get('digest')} missing")
        for diff_id in diff_ids:
            if not self.has_layer(diff_id):
                problems.append(f"{where}: layer {diff_id} not unpacked")
        return problems

