"""``lamina system check``: verify a store and report every problem, one line each.

Checks blob digests, that every image's manifest, config and layer blobs exist, that its layers are
unpacked, and that every tag names an existing image. Stale temporary files of crashed writers are
removed (they are never visible, only wasted space). Directories that were open to other users
(those :meth:`Store.open` tightened) are reported, and every layer, container and mount directory is
made private too (see :mod:`lamina.store.private`).
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

from lamina.errors import FormatError, StoreError
from lamina.store import private
from lamina.store.blobs import BlobStore, digest_hex, remove_stale_temps

if TYPE_CHECKING:
    from lamina.store.store import Store


def check_store(store: Store, verify_blobs: bool = True) -> list[str]:
    """The store's problems (empty when clean); takes the exclusive store lock."""
    layout = store.layout
    problems = private.tightened_by_this_process(layout)
    with store.lock():
        problems.extend(private.foreign_owner(layout))
        private.tighten_objects(layout)
        remove_stale_temps(layout.tmp)
        if verify_blobs:
            for digest in store.blobs.all_digests():
                if not store.blobs.verify(digest):
                    problems.append(f"blob {digest}: content does not match its digest")
        for entry in os.scandir(layout.layers):
            if not re.fullmatch(r"[0-9a-f]{64}", entry.name):
                problems.append(f"layers/{entry.name}: not a layer directory name")
            elif not os.path.isdir(os.path.join(entry.path, "diff")) or \
                    not os.path.isfile(os.path.join(entry.path, "layer.json")):
                problems.append(f"layers/{entry.name}: incomplete layer")
        ids = set(store.image_ids())
        for image_id in sorted(ids):
            problems.extend(_check_image(store, image_id))
        try:
            tags = store.tags.read()
        except StoreError as e:
            problems.append(str(e))
            tags = {}
        for name, image_id in sorted(tags.items()):
            if image_id not in ids:
                problems.append(f"tag {name}: names missing image {image_id[:12]}")
    return problems


def _has_blob_safe(blobs: BlobStore, digest: str) -> bool:
    try:
        return blobs.has(digest)
    except FormatError:
        return False


def _check_image(store: Store, image_id: str) -> list[str]:
    where = f"image {image_id[:12]}"
    try:
        record = json.loads((store.images_dir / f"{image_id}.json").read_bytes())
        manifest_digest = record["manifest"]
    except (OSError, ValueError, KeyError):
        return [f"{where}: unreadable record"]
    if not store.blobs.has(manifest_digest):
        return [f"{where}: manifest blob {manifest_digest} missing"]
    try:
        manifest = json.loads(store.blobs.read(manifest_digest))
        config_digest = manifest["config"]["digest"]
        if digest_hex(config_digest) != image_id:
            return [f"{where}: manifest names another config {config_digest}"]
        if not store.blobs.has(config_digest):
            return [f"{where}: config blob {config_digest} missing"]
        config = json.loads(store.blobs.read(config_digest))
        diff_ids = config["rootfs"]["diff_ids"]
        descs = manifest["layers"]
    except (ValueError, KeyError, TypeError, StoreError, FormatError) as e:
        return [f"{where}: malformed manifest or config ({e})"]
    problems = []
    if len(diff_ids) != len(descs):
        problems.append(f"{where}: {len(descs)} layers in the manifest, {len(diff_ids)} diff_ids")
    for desc in descs:
        if not _has_blob_safe(store.blobs, desc.get("digest", "")):
            problems.append(f"{where}: layer blob {desc.get('digest')} missing")
    for diff_id in diff_ids:
        if not store.has_layer(diff_id):
            problems.append(f"{where}: layer {diff_id} not unpacked")
    return problems
