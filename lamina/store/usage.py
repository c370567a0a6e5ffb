"""Who still needs what in the store: the one question garbage collection asks every other owner.

The image store knows its own images. Containers (:mod:`runner.state`), the build cache
(:mod:`builder.cache`) and live ``lamina mount``s (:mod:`lamina.inspector.mounts`) keep their own
records, in their own formats, and may need images, blobs or layers that no tag names any more.
The store does not read those records: it asks each owner, through :class:`DigestOwner`, what it
still needs, and keeps that. The application (:func:`lamina.application.open_store`) tells the
store who the owners are; a store opened without owners protects only its own images.

Error handling: an owner answers from what it can read; a record it cannot read protects nothing
(as a broken image record protects nothing), and is reported by ``lamina system check``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lamina.errors import StoreError
from lamina.store.blobs import remove_stale_temps, remove_tree, temp_name

if TYPE_CHECKING:
    from lamina.store.store import Image, Store

log = logging.getLogger(__name__)


@dataclass
class Needs:
    """What one owner still needs from the store."""

    # image ID (hex) -> who uses it, as shown to the user ("<container id>", "mount:<id>"). An image
    # in use is not removed by rmi or prune, and its config blob is kept even if its record goes.
    images: dict[str, list[str]] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)   # digests ("sha256:<hex>")
    layers: set[str] = field(default_factory=set)  # diff_ids ("sha256:<hex>")

    def use_image(self, image_id: str, user: str) -> None:
        self.images.setdefault(image_id.removeprefix("sha256:"), []).append(user)


class DigestOwner(Protocol):
    """Anything that keeps records naming the store's images, blobs or layers."""

    def store_needs(self) -> Needs:
        """What this owner's records name now (read afresh at each call)."""
        ...


OwnerFactory = Callable[[], Sequence[DigestOwner]]


class Usage:
    """The store's view of its users: which images are in use, and what garbage collection keeps.

    ``owners`` is called when a question is first asked, so opening a store for a command that never
    asks (``lamina images``) does not import the owners' packages.
    """

    def __init__(self, store: Store, owners: OwnerFactory) -> None:
        self._store = store
        self._owners = owners

    def _needs(self) -> list[Needs]:
        return [owner.store_needs() for owner in self._owners()]

    def users_of(self, image_id: str) -> list[str]:
        """Who uses the image (containers first, then live mounts), as the owners name them."""
        image_id = image_id.removeprefix("sha256:")
        return [user for needs in self._needs() for user in needs.images.get(image_id, [])]

    def images_in_use(self) -> set[str]:
        return {image_id for needs in self._needs() for image_id in needs.images}

    def dangling_images(self) -> list[Image]:
        """Untagged images nobody uses: what ``system prune`` removes."""
        in_use = self.images_in_use()
        return [image for image in self._store.images() if not image.tags and image.id not in in_use]

    def roots(self) -> tuple[set[str], set[str]]:
        """(blob digests, layer diff_ids) that must be kept: the images' own, and the owners'."""
        store = self._store
        blobs: set[str] = set()
        diff_ids: set[str] = set()
        for image_id in store.image_ids():
            try:
                record = json.loads((store.images_dir / f"{image_id}.json").read_bytes())
                blobs.add(record["manifest"])
                manifest = json.loads(store.blobs.read(record["manifest"]))
                blobs.add(manifest["config"]["digest"])
                blobs.update(d["digest"] for d in manifest.get("layers", []))
                config = json.loads(store.blobs.read(manifest["config"]["digest"]))
                diff_ids.update(config.get("rootfs", {}).get("diff_ids", []))
            except (OSError, ValueError, KeyError, StoreError) as e:
                log.info("image %s is broken (%s); its objects are not protected", image_id[:12], e)
        for needs in self._needs():
            blobs.update(needs.blobs)
            diff_ids.update(needs.layers)
            blobs.update("sha256:" + image_id for image_id in needs.images)
        # A kept layer keeps the gzipped copy a push made of it (compressed once, reused).
        from lamina.store.outbound import kept_gzip_blobs

        blobs.update(kept_gzip_blobs(store, diff_ids))
        return blobs, diff_ids

    def collect_garbage(self) -> tuple[int, int, int]:
        """Remove unreferenced blobs, layers and stale temporary files: (blobs, layers, bytes freed).

        The caller holds the store's exclusive lock.
        """
        store = self._store
        keep_blobs, keep_layers = self.roots()
        freed = n_blobs = n_layers = 0
        for digest in list(store.blobs.all_digests()):
            if digest not in keep_blobs:
                with contextlib.suppress(OSError):
                    freed += store.blobs.size(digest)
                store.blobs.remove(digest)
                n_blobs += 1
        for entry in list(os.scandir(store.layers_dir)):
            if "sha256:" + entry.name not in keep_layers:
                freed += store.layer_content_size("sha256:" + entry.name) if len(entry.name) == 64 else 0
                # Rename first so a crash mid-removal never leaves a half-deleted layer visible.
                doomed = temp_name(store.tmp_dir, "doomed")
                os.rename(entry.path, doomed)
                try:
                    remove_tree(doomed)
                except OSError as e:  # already out of sight; the next prune retries
                    log.info("cannot remove %s yet: %s", doomed, e)
                n_layers += 1
        remove_stale_temps(store.tmp_dir)
        return n_blobs, n_layers, freed
