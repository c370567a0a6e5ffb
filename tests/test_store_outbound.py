"""Local layers are plain tars; gzip is made on the way out, once, and lives as long as its layer."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lamina.store import Store
from lamina.store.blobs import sha256_bytes
from lamina.store.outbound import gzipped_layer, outbound_manifest


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "root")


def committed(store: Store, tmp_path: Path, name: str, data: bytes):  # type: ignore[no-untyped-def]
    upper = tmp_path / name
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / name).write_bytes(data)
    return store.commit_layer(upper)


def test_a_committed_layer_is_a_plain_tar_whose_digest_is_its_diff_id(store: Store, tmp_path: Path) -> None:
    layer = committed(store, tmp_path, "a", b"A" * 5000)
    assert layer.digest == layer.diff_id and layer.media_type == "application/vnd.oci.image.layer.v1.tar"
    blob = store.blob_path(layer.digest).read_bytes()
    assert sha256_bytes(blob) == layer.diff_id and blob[:2] != b"\x1f\x8b"
    # GNU tar, the outside reader, sees the file.
    listing = subprocess.run(["tar", "-tvf", str(store.blob_path(layer.digest))], capture_output=True, text=True,
                             check=True).stdout
    assert "etc/a" in listing


def test_gzip_is_made_once_and_is_the_same_tar(store: Store, tmp_path: Path) -> None:
    layer = committed(store, tmp_path, "a", bytes(range(256)) * 4000)
    digest, size = gzipped_layer(store, layer.digest)
    path = store.blob_path(digest)
    assert path.stat().st_size == size and sha256_bytes(path.read_bytes()) == digest
    assert sha256_bytes(gzip.decompress(path.read_bytes())) == layer.diff_id
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", str(path)], check=False).returncode == 0
    inode = path.stat().st_ino
    seen: list[int] = []
    assert gzipped_layer(store, layer.digest, seen.append) == (digest, size)
    assert path.stat().st_ino == inode  # not written again
    assert sum(seen) == store.blobs.size(layer.digest)


def test_outbound_manifest_names_gzip_and_leaves_compressed_manifests_alone(store: Store, tmp_path: Path) -> None:
    layers = [committed(store, tmp_path, name, name.encode() * 1000) for name in ("a", "b")]
    image = store.create_image(layers, {"config": {"Cmd": ["/bin/sh"]}}, tags=["x:1"])
    local = store.manifest_bytes(image)
    sent = outbound_manifest(store, local)
    manifest = json.loads(sent)
    assert manifest["config"] == image.manifest["config"]
    assert [d["mediaType"] for d in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 2
    assert [d["digest"] for d in manifest["layers"]] == [gzipped_layer(store, layer.digest)[0] for layer in layers]
    assert store.has_blob(sha256_bytes(sent))
    assert outbound_manifest(store, sent) == sent  # already compressed: byte for byte
    assert outbound_manifest(store, local) == sent  # deterministic, from the cache


def test_gc_keeps_the_gzip_of_a_kept_layer_and_drops_it_with_the_layer(store: Store, tmp_path: Path) -> None:
    kept, dropped = committed(store, tmp_path, "a", b"a" * 3000), committed(store, tmp_path, "b", b"b" * 3000)
    keep_image = store.create_image([kept], {}, tags=["keep:1"])
    drop_image = store.create_image([dropped], {}, tags=["drop:1"])
    kept_gz, _ = gzipped_layer(store, kept.digest)
    dropped_gz, _ = gzipped_layer(store, dropped.digest)
    store.untag("drop:1")
    store.delete_image(drop_image)
    assert store.has_blob(kept_gz) and store.has_layer(kept.diff_id)
    assert not store.has_blob(dropped_gz) and not store.has_blob(dropped.digest)
    assert store.check() == []
    assert keep_image.layers[0].digest == kept.digest


def test_heartbeat_is_silent_when_short_and_speaks_while_long() -> None:
    import time

    from lamina.store.progress import Heartbeat

    said: list[str] = []
    with Heartbeat(said.append, "Committing layer", first_after=0.5, every=0.05):
        pass
    assert said == []
    with Heartbeat(said.append, "Committing layer", first_after=0.05, every=0.05) as beat:
        time.sleep(0.12)
        beat(3_000_000)
        time.sleep(0.12)
    assert said[0] == "Committing layer ..." and said[-1] == "Committing layer: 3MB"
    count = len(said)
    time.sleep(0.12)
    assert len(said) == count  # stopped with the block
