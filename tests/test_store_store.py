"""The Store API the builder, runner and registry client use: blobs, layers, images, tags, gc, check."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lamina.application import open_store
from lamina.errors import FormatError, ImageNotFound, LayerError, StoreError, UsageError
from lamina.store import Store
from lamina.store.base import DEFAULT_BASE, ensure_default_base
from lamina.store.blobs import sha256_bytes
from unionfs.core import ondisk


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "root")


def upper_with(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    upper = tmp_path / name
    upper.mkdir()
    for rel, data in files.items():
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        (upper / rel).write_bytes(data)
    return upper


def test_ingest_blob_verifies_digest_and_leaves_nothing_on_mismatch(store: Store, tmp_path: Path) -> None:
    data = b"hello blob"
    good = sha256_bytes(data)
    path = store.ingest_blob(io.BytesIO(data), good)
    assert path == store.blob_path(good) and path.read_bytes() == data and store.has_blob(good)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FormatError, match="digest mismatch"):
        store.ingest_blob(io.BytesIO(b"lies"), wrong)
    assert not store.has_blob(wrong) and not store.has_blob(sha256_bytes(b"lies"))
    assert os.listdir(store.tmp_dir) == []
    f = tmp_path / "file"
    f.write_bytes(b"from a path")
    assert store.ingest_blob(f, sha256_bytes(b"from a path")).read_bytes() == b"from a path"
    with pytest.raises(FormatError):
        store.blob_path("sha256:../../etc/passwd")


def test_commit_create_resolve_and_layer_stack(store: Store, tmp_path: Path) -> None:
    base = ensure_default_base(store)
    assert base.tags == ["lamina/busybox:latest"]
    assert (store.layer_stack(base).bottom_up()[0] / "bin/busybox").is_file()
    upper = upper_with(tmp_path, "upper", {"app/hello.txt": b"hi\n"})
    fd = os.open(upper, os.O_RDONLY)
    ondisk.make_whiteout(fd, "tmp")
    os.close(fd)
    layer = store.commit_layer(upper)
    assert layer.path.is_dir() and (layer.path / "app/hello.txt").read_bytes() == b"hi\n"
    assert store.commit_layer(upper).digest == layer.digest, "deterministic: same upper, same blob"
    config = {"config": {"Cmd": ["cat", "/app/hello.txt"]},
              "history": base.config["history"] + [{"created_by": "COPY hello.txt /app/"}]}
    image = store.create_image(base.layers + [layer], config, tags=["app:1", "localhost:5000/app"], base=base)
    assert image.config["rootfs"]["diff_ids"] == [base.layers[0].diff_id, layer.diff_id]
    assert image.config["architecture"] and image.config["os"] == "linux"
    for name in ("app:1", "docker.io/library/app:1", "localhost:5000/app:latest", image.id[:6],
                 "sha256:" + image.id):
        assert store.resolve_image(name).id == image.id
    assert sorted(image.tags) == ["app:1", "localhost:5000/app:latest"]
    assert store.layer_stack(image).top_down() == (layer.path, base.layers[0].path)
    assert store.manifest_bytes(image) == store.blob_path(image.manifest_digest).read_bytes()
    assert store.check() == []
    with pytest.raises(ImageNotFound):
        store.resolve_image("app:2")
    with pytest.raises(ImageNotFound):
        store.resolve_image("feedface")


def test_history_is_completed_when_missing(store: Store, tmp_path: Path) -> None:
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}})
    assert len(image.config["history"]) == 1 and image.tags == []


def test_tag_untag_delete_and_gc(store: Store, tmp_path: Path) -> None:
    l1 = store.commit_layer(upper_with(tmp_path, "u1", {"shared": b"s"}))
    l2 = store.commit_layer(upper_with(tmp_path, "u2", {"only-b": b"b"}))
    a = store.create_image([l1], {"config": {"Cmd": ["a"]}}, tags=["a"])
    b = store.create_image([l1, l2], {"config": {"Cmd": ["b"]}}, tags=["b"])
    store.tag(a, "a:extra")
    assert sorted(store.resolve_image("a").tags) == ["a:extra", "a:latest"]
    assert store.untag("a:extra") == a.id
    with pytest.raises(ImageNotFound):
        store.untag("a:extra")
    store.delete_image(b)
    assert not l2.path.exists() and not store.has_blob(l2.digest), "b's own layer goes"
    assert l1.path.exists() and store.has_blob(l1.digest), "the shared layer stays"
    assert store.resolve_image("a").id == a.id and store.check() == []
    with pytest.raises(ImageNotFound):
        store.resolve_image("b")


def test_image_in_use_and_gc_keeps_what_containers_name(tmp_path: Path) -> None:
    store = open_store(tmp_path / "root")  # the store, told who else owns its digests
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}}, tags=["used"])
    assert not store.image_in_use(image.id)
    container = store.root / "containers" / "c1"
    container.mkdir(parents=True)
    (container / "container.json").write_text(json.dumps({"image_id": image.id}))
    assert store.image_in_use(image.id) and store.image_in_use("sha256:" + image.id)
    stray = store.commit_layer(upper_with(tmp_path, "u2", {"g": b"2"}))  # referenced by nothing
    blobs, layers, _ = store.gc()
    assert (blobs, layers) == (1, 1) and not stray.path.exists()
    assert layer.path.exists()


def test_duplicate_import_and_manifest_mismatch(store: Store, tmp_path: Path) -> None:
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}}, tags=["x"])
    manifest = store.manifest_bytes(image)
    config = store.blob_path(image.digest).read_bytes()
    again = store.import_image_from_manifest(manifest, config, ["docker.io/library/y:2"])
    assert again.id == image.id and sorted(again.tags) == ["x:latest", "y:2"]
    with pytest.raises(FormatError, match="config"):
        store.import_image_from_manifest(manifest, config.replace(b"{", b'{"x":1,', 1), [])
    doc = json.loads(manifest)
    doc["layers"][0]["digest"] = "sha256:" + "1" * 64
    with pytest.raises(StoreError, match="not in the store"):
        store.import_image_from_manifest(json.dumps(doc).encode(), config, [])


def test_import_from_manifest_unpacks_missing_layers_and_checks_diff_ids(store: Store, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    tar_bytes = buf.getvalue()
    digest = sha256_bytes(tar_bytes)
    store.ingest_blob(io.BytesIO(tar_bytes), digest)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": sha256_bytes(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": digest, "size": len(tar_bytes)}]}).encode()
    image = store.import_image_from_manifest(manifest, config, ["pulled:1"])
    assert (image.layers[0].path / "hello").read_bytes() == b"hi"
    lying = config.replace(digest.encode(), b"sha256:" + b"2" * 64)
    lying_manifest = manifest.replace(sha256_bytes(config).encode(), sha256_bytes(lying).encode())
    with pytest.raises(LayerError, match="diff_id"):
        store.import_image_from_manifest(lying_manifest, lying, ["liar:1"])
    with pytest.raises(ImageNotFound):
        store.resolve_image("liar:1")


def test_bad_tag_is_a_usage_error(store: Store, tmp_path: Path) -> None:
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    with pytest.raises(UsageError):
        store.create_image([layer], {"config": {}}, tags=["Bad Name"])


def test_check_reports_corruption(store: Store, tmp_path: Path) -> None:
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}}, tags=["x"])
    os.chmod(store.blob_path(layer.digest), 0o644)
    store.blob_path(layer.digest).write_bytes(b"flipped")
    import shutil
    shutil.rmtree(layer.path.parent)
    problems = store.check()
    assert any("does not match its digest" in p for p in problems)
    assert any(f"layer {layer.diff_id} not unpacked" in p for p in problems)
    assert image.id  # the image itself is still listed


def test_exclusive_lock_blocks_another_process(store: Store) -> None:
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    with store.lock():
        held = subprocess.run([sys.executable, "-c", code, str(store.root / "lock")], capture_output=True)
        assert held.returncode != 0 and b"BlockingIOError" in held.stderr
        with store.lock(shared=True):  # re-entrant
            pass
        with Store.open(store.root).lock(shared=True):  # also through another Store object
            pass
    free = subprocess.run([sys.executable, "-c", code, str(store.root / "lock")], capture_output=True)
    assert free.returncode == 0
    assert fcntl.LOCK_EX


def test_default_base_is_reproducible(tmp_path: Path) -> None:
    a = ensure_default_base(Store.open(tmp_path / "a"))
    b = Store.open(tmp_path / "b").resolve_image(DEFAULT_BASE)
    assert a.id == b.id and a.layers[0].digest == b.layers[0].digest
    root = a.layers[0].path
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert "nobody" in (root / "etc/passwd").read_text()


def test_ingest_from_the_store_tmp_dir_adopts_the_file_without_copying(store: Store) -> None:
    data = b"downloaded layer"
    tmp = store.tmp_dir / f"{os.getpid()}.abc.pull"
    tmp.write_bytes(data)
    inode = os.stat(tmp).st_ino
    path = store.ingest_blob(tmp, sha256_bytes(data))
    assert os.stat(path).st_ino == inode and not tmp.exists()
    liar = store.tmp_dir / f"{os.getpid()}.def.pull"
    liar.write_bytes(b"something else")
    with pytest.raises(FormatError, match="digest mismatch"):
        store.ingest_blob(liar, "sha256:" + "3" * 64)
    assert not store.has_blob("sha256:" + "3" * 64)


def test_a_live_lamina_mount_counts_as_use(tmp_path: Path) -> None:
    store = open_store(tmp_path / "root")
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}}, tags=["mounted"])
    record = store.root / "mounts" / "m1" / "state.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"image_id": image.id, "pid": os.getpid()}))
    assert store.image_in_use(image.id) and store.containers_using(image.id) == ["mount:m1"]
    store.untag("mounted")
    store.gc()
    assert layer.path.exists(), "a mounted image's layers are kept"
    record.write_text(json.dumps({"image_id": image.id, "pid": 2**22 + 1}))  # no such pid
    assert not store.image_in_use(image.id)


def test_stale_temporaries_are_removed_and_unremovable_ones_skipped(store: Store) -> None:
    dead = store.tmp_dir / f"{2**22 + 7}.abc.blob"
    dead.write_bytes(b"half")
    mine = store.tmp_dir / f"{os.getpid()}.abc.blob"
    mine.write_bytes(b"in progress")
    stuck = store.tmp_dir / f"{2**22 + 8}.abc.build-step"
    (stuck / "sub").mkdir(parents=True)
    (stuck / "sub" / "f").write_text("x")
    from unittest import mock

    real_rmtree = __import__("shutil").rmtree

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        if "build-step" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, *args, **kwargs)

    with mock.patch("lamina.store.blobs.shutil.rmtree", refuse):
        assert store.check() == []
    assert not dead.exists() and mine.exists() and stuck.exists()


def _prune_against(root: Path) -> subprocess.Popen[str]:
    """Start `lamina system prune` on ``root``; return once it has finished or waits for the lock.

    Whichever it is, a prune that could run in the gap the caller is in has then run there.
    """
    prune = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "--log-level", "info",
                              "system", "prune"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert prune.stderr is not None
    for line in prune.stderr:
        if "waiting for the lock" in line:
            break
    return prune


def test_a_prune_between_new_layer_and_new_image_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default base and a loaded archive: their fresh, unreferenced objects survive a prune."""
    root = tmp_path / "root"
    store = Store.open(root)
    prunes: list[subprocess.Popen[str]] = []
    real_commit = Store.commit_layer

    def commit_then_prune(self: Store, *args: object, **kwargs: object) -> object:
        layer = real_commit(self, *args, **kwargs)  # type: ignore[arg-type]
        prunes.append(_prune_against(root))
        return layer

    monkeypatch.setattr(Store, "commit_layer", commit_then_prune)
    image = ensure_default_base(store)
    monkeypatch.undo()
    assert [p.wait(timeout=60) for p in prunes] == [0]
    assert all(path.is_dir() for path in store.layer_stack(store.resolve_image(DEFAULT_BASE)).top_down())

    from lamina.store.archive import DOCKER_ARCHIVE, SaveItem, load, save
    from lamina.store.reference import Reference
    archive = tmp_path / "base.tar"
    save(store, [SaveItem(image, [Reference.parse(DEFAULT_BASE)])], archive, DOCKER_ARCHIVE)
    other = Store.open(tmp_path / "other")
    real_put = Store.put_blob

    def put_then_prune(self: Store, data: bytes) -> str:
        prunes.append(_prune_against(other.root))  # the layer blob is in, nothing names it yet
        return real_put(self, data)

    monkeypatch.setattr(Store, "put_blob", put_then_prune)
    [(loaded, _tags)] = load(other, archive)
    monkeypatch.undo()
    assert [p.wait(timeout=60) for p in prunes[1:]] == [0]
    assert loaded.id == image.id
    assert other.check() == []


def test_the_store_asks_its_owners_and_reads_no_other_records(tmp_path: Path) -> None:
    """What containers and mounts need reaches the store only through the owners it is given."""
    from lamina.store.usage import Needs

    class Holder:
        def __init__(self) -> None:
            self.needs = Needs()

        def store_needs(self) -> Needs:
            return self.needs

    holder = Holder()
    store = Store.open(tmp_path / "root", owners=lambda: [holder])
    layer = store.commit_layer(upper_with(tmp_path, "u", {"f": b"1"}))
    image = store.create_image([layer], {"config": {}}, tags=["held"])
    container = store.root / "containers" / "c1"
    container.mkdir(parents=True)
    (container / "container.json").write_text(json.dumps({"image_id": image.id}))
    assert not store.image_in_use(image.id), "another package's record is not the store's to read"
    holder.needs.use_image("sha256:" + image.id, "c1")
    assert store.containers_using(image.id) == ["c1"] and store.dangling_images() == []
    loose = store.commit_layer(upper_with(tmp_path, "u2", {"g": b"2"}))
    holder.needs.layers.add(loose.diff_id)
    holder.needs.blobs.add(loose.digest)
    assert store.gc() == (0, 0, 0)
    assert loose.path.exists() and store.has_blob(loose.digest)
    holder.needs = Needs()
    assert store.gc()[:2] == (1, 1) and not loose.path.exists()


def test_the_store_imports_none_of_its_users() -> None:
    import ast

    users = ("runner", "builder", "lamina.inspector", "lamina.commands", "lamina.application", "lamina.cli")
    package = Path(__file__).resolve().parent.parent / "lamina" / "store"
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if any(n == u or n.startswith(u + ".") for u in users)]
    assert found == []
