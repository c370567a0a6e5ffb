"""``load`` of a docker-archive's plain layers: the blob is copied and the layer unpacked from the
archive at once (lamina.store.load_in_place), and the result must be what the old way gave: the blob,
then the layer unpacked from it."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from settle_scenario import make_upper, snapshot
from test_store_cli import _archive

from lamina.errors import LayerError
from lamina.store import archive, load_in_place
from lamina.store.layer_pack import IdMap, pack_layer
from lamina.store.layer_unpack import FileRegion, unpack_layer
from lamina.store.store import Store


def _docker_archive(path: Path, layer: bytes, diff_id: str | None = None) -> Path:
    diff_id = diff_id or "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"os": "linux", "architecture": "amd64",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    members = {"manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["loaded:1"],
                                             "Layers": ["abc/layer.tar"]}]).encode(),
               "c.json": config, "abc/layer.tar": layer}
    return _archive(path, members)


def _scenario_layer(tmp_path: Path) -> bytes:
    make_upper(tmp_path / "upper")
    out = io.BytesIO()
    pack_layer(tmp_path / "upper", out, compress=False, idmap=IdMap())
    return out.getvalue()


def test_loaded_layer_is_the_blob_unpacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _scenario_layer(tmp_path)
    store = Store.open(tmp_path / "root")
    used = []
    original = load_in_place.add_plain_layer
    monkeypatch.setattr(load_in_place, "add_plain_layer", lambda *a, **k: used.append(a) or original(*a, **k))
    [(image, tags)] = archive.load(store, _docker_archive(tmp_path / "a.tar", layer))
    assert used, "the plain layer was not loaded in place"
    assert tags == ["docker.io/library/loaded:1"]
    [stored] = image.layers
    assert stored.digest == stored.diff_id == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert store.blob_path(stored.digest).read_bytes() == layer
    unpack_layer(store.blob_path(stored.digest), tmp_path / "unpacked", tmp_path / "tmp")
    assert snapshot(stored.path) == snapshot(tmp_path / "unpacked")
    assert store.layer_tar_size(stored.diff_id) == len(layer)
    assert store.check() == []


def test_layer_that_is_not_its_diff_id_leaves_nothing(tmp_path: Path) -> None:
    layer = _scenario_layer(tmp_path)
    store = Store.open(tmp_path / "root")
    wrong = "sha256:" + "1" * 64
    with pytest.raises(LayerError, match="does not match its diff_id"):
        archive.load(store, _docker_archive(tmp_path / "a.tar", layer, wrong))
    assert os.listdir(store.layers_dir) == []
    assert list(store.blobs.all_digests()) == []
    assert os.listdir(store.tmp_dir) == []


def test_file_region_reads_only_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        region = io.BufferedReader(FileRegion(fd, 2, 6))
        region.seek(2)
        assert region.read() == b"2345"
        assert region.seek(3) == 3 and region.read(2) == b"34"
        with pytest.raises(OSError):
            region.seek(7)
        with pytest.raises(OSError):
            region.seek(1)
    finally:
        os.close(fd)
