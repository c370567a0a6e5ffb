"""Lazy images: the layer tree from verified TOCs, range reads against lying, stalling and vanishing
registries, and ``lamina mount HOST/REPO:TAG`` compared with podman's own mount of the same image."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import FakeRegistry, run_registry
from test_store_estargz import BIG, plain_tar, registry
from test_store_interop import podman, run_podman

from lamina.errors import FormatError, RegistryError
from lamina.lazy import remote
from lamina.lazy.remote import ChunkCache, ChunkUnavailable, RemoteLayer
from lamina.lazy.tree import LazyTree
from lamina.lazy.whole import WholeLayer
from lamina.store.estargz import TOC_DIGEST_ANNOTATION, write_estargz
from lamina.store.image_schema import Descriptor
from lamina.store.registry import RegistryClient

__all__ = ["podman", "registry"]  # the fixtures

REPO = "lazy/app"


def estargz_blob(tar: bytes | None = None) -> tuple[bytes, Descriptor]:
    out = io.BytesIO()
    blob = write_estargz(io.BytesIO(tar or plain_tar()), out, chunk_size=256 * 1024)
    data = out.getvalue()
    return data, Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob.digest, blob.size,
                            annotations=blob.annotations())


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with FakeRegistry().serve() as registry:
        yield registry


def open_layer(fake: FakeRegistry, descriptor: Descriptor, tmp_path: Path, timeout: float = 5.0) -> RemoteLayer:
    client = RegistryClient(fake.address, tls_verify=False, timeout=timeout)
    return RemoteLayer(client, REPO, descriptor, ChunkCache(tmp_path / "chunks"))


# ----- the tree, from TOCs, without a mount -----


def test_tree_attributes_and_contents_are_the_tars(fake: FakeRegistry, tmp_path: Path) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    layer = open_layer(fake, descriptor, tmp_path)
    tree = LazyTree([layer.open_toc()], [layer])
    layer_root = tree.lookup(1, "0")
    with tarfile.open(fileobj=io.BytesIO(plain_tar())) as tar:
        for member in tar:
            node = layer_root
            for part in member.name.split("/"):
                node = tree.lookup(node.inode, part)
            attrs = node.attributes()
            if member.islnk():
                continue  # the target's node, checked below
            assert (stat.S_IMODE(attrs.mode), attrs.uid, attrs.gid) == (member.mode, member.uid, member.gid), member.name
            if member.isreg():
                expected = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert attrs.size == len(expected) and stat.S_ISREG(attrs.mode)
                assert tree.read(node.inode, 0, 1 << 30) == expected
            elif member.issym():
                assert stat.S_ISLNK(attrs.mode) and node.entry.link_name == member.linkname
            elif member.ischr():
                assert attrs.rdev == os.makedev(1, 3)
    # A hard link is the same node; the landmark is not shown.
    bin_dir = tree.lookup(layer_root.inode, "bin")
    assert tree.lookup(bin_dir.inode, "ln") is tree.lookup(bin_dir.inode, "sh")
    assert tree.lookup(bin_dir.inode, "sh").attributes().nlink == 2
    assert ".no.prefetch.landmark" not in dict(tree.listing(layer_root.inode))
    # Reads across chunk boundaries, and past the end.
    big = tree.lookup(tree.lookup(layer_root.inode, "etc").inode, "big")
    assert tree.read(big.inode, 256 * 1024 - 10, 30) == BIG[256 * 1024 - 10:256 * 1024 + 20]
    assert tree.read(big.inode, len(BIG) - 2, 100) == BIG[-2:]


def test_listing_fetches_no_contents_and_a_chunk_is_fetched_once(fake: FakeRegistry, tmp_path: Path) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    layer = open_layer(fake, descriptor, tmp_path)
    tree = LazyTree([layer.open_toc()], [layer])
    assert layer.stats.requests == 2  # the footer, the TOC
    for inode in list(tree.nodes):
        tree.node(inode).attributes()
        if tree.node(inode).is_dir:
            list(tree.listing(inode))
    assert layer.stats.requests == 2
    etc = tree.lookup(tree.lookup(1, "0").inode, "etc")
    big = tree.lookup(etc.inode, "big")
    tree.read(big.inode, 0, 4096)
    tree.read(big.inode, 4096, 4096)
    assert layer.stats.requests == 3
    assert fake.range_requests[-1].startswith(f"bytes={big.chunks[0].offset}-")
    # A second mount of the same image reads the chunk from the store's cache.
    again = open_layer(fake, descriptor, tmp_path)
    tree2 = LazyTree([again.open_toc()], [again])
    assert tree2.read(big.inode, 0, 10) == BIG[:10] and again.stats.requests == 2


# ----- hostile registries -----


def test_a_toc_that_does_not_match_the_annotation_is_refused(fake: FakeRegistry, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    lying = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size,
                       annotations={TOC_DIGEST_ANNOTATION: "sha256:" + "a" * 64})
    with pytest.raises(FormatError, match="TOC digest"):
        open_layer(fake, lying, tmp_path).open_toc()
    assert len(fake.range_requests) == 4  # footer and TOC, twice: then refused
    assert [r.levelname for r in caplog.records if r.levelname == "WARNING"] == ["WARNING"]
    caplog.clear()  # the refusal's one line was expected


def test_a_toc_damaged_once_on_the_way_is_fetched_again(fake: FakeRegistry, tmp_path: Path) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    layer = open_layer(fake, descriptor, tmp_path)
    fetch = layer._range
    calls: list[int] = []

    def flip_the_first_toc(start: int, end: int) -> bytes:
        calls.append(start)
        piece = fetch(start, end)
        middle = len(piece) // 2
        return piece[:middle] + bytes([piece[middle] ^ 1]) + piece[middle + 1:] if len(calls) == 2 else piece

    layer._range = flip_the_first_toc  # type: ignore[method-assign]
    assert "bin/sh" in layer.open_toc().entries
    assert len(calls) == 4


def test_a_chunk_that_does_not_verify_is_fetched_twice_then_refused(fake: FakeRegistry, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    layer = open_layer(fake, descriptor, tmp_path)
    tree = LazyTree([layer.open_toc()], [layer])
    sh = tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "bin").inode, "sh")
    # A valid gzip member of other bytes of the same length, where the payload's member starts: only
    # the chunk digest can tell (the TOC, the footer and every other member are untouched).
    forged = gzip.compress(b"#!/bin/busybox sh\n" * 49 + b"rm -rf / # evil!!\n", mtime=0)
    damaged = bytearray(data)
    damaged[sh.chunks[0].offset:sh.chunks[0].offset + len(forged)] = forged
    fake.blob_override[descriptor.digest] = bytes(damaged)
    before = len(fake.range_requests)
    with pytest.raises(ChunkUnavailable, match="bin/sh"):
        tree.read(sh.inode, 0, 100)
    assert len(fake.range_requests) - before == 2
    assert not (tmp_path / "chunks" / sh.chunks[0].digest[7:]).exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "fetched twice" in warnings[0], warnings
    caplog.clear()  # the warnings were expected
    # Asked again at once (the kernel retries a failed read), it is refused without a fetch or a log.
    with pytest.raises(ChunkUnavailable):
        tree.read(sh.inode, 0, 100)
    assert len(fake.range_requests) - before == 2 and not caplog.records
    # Once the registry serves the right bytes again, the same read succeeds (after the hold).
    del fake.blob_override[descriptor.digest]
    monkeypatch.setattr(remote, "REFUSED_CHUNK_HOLD_S", 0.0)
    assert tree.read(sh.inode, 0, 18) == b"#!/bin/busybox sh\n"


def test_a_stalled_registry_is_an_error_within_the_deadline(fake: FakeRegistry, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    monkeypatch.setattr(remote, "REQUEST_DEADLINE_S", 1.0)
    layer = open_layer(fake, descriptor, tmp_path, timeout=1.0)
    tree = LazyTree([layer.open_toc()], [layer])
    big = tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "etc").inode, "big")
    fake.blob_delay = 10.0
    started = time.monotonic()
    with pytest.raises(ChunkUnavailable):
        tree.read(big.inode, 0, 10)
    assert time.monotonic() - started < 5


def test_a_vanished_registry_is_an_error_and_cached_files_still_read(tmp_path: Path) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    data, descriptor = estargz_blob()
    (tmp_path / "blob").write_bytes(data)
    with run_registry(tmp_path / "registry") as running:
        client = RegistryClient(running.address, tls_verify=False, timeout=1.0)
        client.upload_blob(REPO, descriptor.digest, tmp_path / "blob")
        layer = RemoteLayer(client, REPO, descriptor, ChunkCache(tmp_path / "chunks"))
        tree = LazyTree([layer.open_toc()], [layer])
        sh = tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "bin").inode, "sh")
        tree.read(sh.inode, 0, 10)
    big = tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "etc").inode, "big")
    started = time.monotonic()
    with pytest.raises(ChunkUnavailable):
        tree.read(big.inode, 0, 10)
    assert time.monotonic() - started < 5
    assert tree.read(sh.inode, 0, 18) == b"#!/bin/busybox sh\n"


def test_a_registry_without_ranges_is_refused_rather_than_downloaded(fake: FakeRegistry, tmp_path: Path) -> None:
    data, descriptor = estargz_blob()
    fake.add_blob(data)
    fake.ranges = False
    with pytest.raises(Exception, match="does not serve ranges"):
        open_layer(fake, descriptor, tmp_path).open_toc()


def test_prefetch_fetches_the_prioritized_files_and_nothing_else(fake: FakeRegistry, tmp_path: Path) -> None:
    out = io.BytesIO()
    blob = write_estargz(io.BytesIO(plain_tar()), out, chunk_size=256 * 1024, prioritized=["etc/big"])
    fake.add_blob(out.getvalue())
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob.digest, blob.size,
                            annotations=blob.annotations())
    layer = open_layer(fake, descriptor, tmp_path)
    toc = layer.open_toc()
    tree = LazyTree([toc], [layer])
    assert layer.prefetch(toc, threading.Event()) > 0
    assert all((tmp_path / "chunks" / c.digest[7:]).exists() for c in toc.chunks_of("etc/big"))
    requests = layer.stats.requests
    etc = tree.lookup(tree.lookup(1, "0").inode, "etc")
    assert tree.read(tree.lookup(etc.inode, "big").inode, 0, len(BIG)) == BIG
    assert layer.stats.requests == requests
    sh = toc.chunks_of("bin/sh")[0]
    assert not (tmp_path / "chunks" / sh.digest[7:]).exists()
    stop = threading.Event()
    stop.set()
    assert open_layer(fake, descriptor, tmp_path / "other").prefetch(toc, stop) == 0
    unprioritized, unprioritized_blob = estargz_blob()
    fake.add_blob(unprioritized)
    plain_layer = open_layer(fake, unprioritized_blob, tmp_path / "third")
    assert plain_layer.prefetch(plain_layer.open_toc(), threading.Event()) == 0


def test_a_plain_layer_is_fetched_whole_verified_and_read_from_its_tar(fake: FakeRegistry, tmp_path: Path) -> None:
    tar = plain_tar()
    blob = gzip.compress(tar)
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", fake.add_blob(blob), len(blob))
    fake.blob_override[descriptor.digest] = gzip.compress(tar.replace(b"#!/bin/busybox sh", b"#!/bin/evil!!! sh"))
    client = RegistryClient(fake.address, tls_verify=False, timeout=5)
    with pytest.raises(RegistryError, match="refused"):
        WholeLayer(client, REPO, descriptor, tmp_path / "tars").open_toc()
    assert not list((tmp_path / "tars").iterdir())
    del fake.blob_override[descriptor.digest]
    layer = WholeLayer(RegistryClient(fake.address, tls_verify=False, timeout=5), REPO, descriptor, tmp_path / "tars")
    tree = LazyTree([layer.open_toc()], [layer])
    etc = tree.lookup(tree.lookup(1, "0").inode, "etc")
    assert tree.read(tree.lookup(etc.inode, "big").inode, 1000, 50) == BIG[1000:1050]
    assert tree.lookup(etc.inode, ".wh..wh..opq").attributes().size == 0
    layer.close()


def test_a_plain_layer_that_climbs_out_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    evil = tarfile.TarInfo("a/../../escape")
    evil.size = 1
    blob = gzip.compress(plain_tar([(evil, b"x")]))
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", fake.add_blob(blob), len(blob))
    layer = WholeLayer(RegistryClient(fake.address, tls_verify=False, timeout=5), REPO, descriptor, tmp_path / "tars")
    with pytest.raises(FormatError, match="unusable name"):
        layer.open_toc()


# ----- through the kernel, against podman's mount of the same image -----


def tree_of(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, tuple[object, ...]]:
    """Every path under ``root``: type and permission bits, owner, size, link target, content digest."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            st = path.lstat()
            detail: object = None
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0, detail)
    return found


def range_gets(registry: object) -> int:
    return sum(1 for method, path, status in registry.access_log()  # type: ignore[attr-defined]
               if method == "GET" and "/blobs/" in path and status == 206)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("estargz", [True, False], ids=["estargz", "gzip"])
def test_lazy_mount_shows_what_podman_mounts(podman: object, registry: object, lamina_cmd: object,
                                             tmp_path: Path, estargz: bool) -> None:
    """eStargz layers are read by range (two per layer to mount, none to list); plain gzip layers
    are fetched whole (no ranges); either way the tree is the one podman mounts after a pull."""
    from test_store_interop import lamina_image_with_two_layers

    lamina_image_with_two_layers(lamina_cmd, tmp_path)  # type: ignore[arg-type]
    remote_ref = f"{registry.address}/lazy/app:1"  # type: ignore[attr-defined]
    push_format = ["--compression-format", "estargz"] if estargz else []
    lamina_cmd("push", "--tls-verify=false", *push_format, "interop/app:1", remote_ref)  # type: ignore[operator]
    run_podman(podman, "pull", "--tls-verify=false", remote_ref)
    podman_root = Path(run_podman(podman, "image", "mount", remote_ref).stdout.decode().strip())
    other = tmp_path / "empty-store"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = range_gets(registry)
    started = time.monotonic()
    trace = tmp_path / "trace"
    lamina_cmd("mount", "--trace", str(trace), remote_ref, str(mountpoint), root=other)  # type: ignore[operator]
    ready = time.monotonic() - started
    try:
        assert range_gets(registry) - before == (4 if estargz else 0)  # a footer and a TOC per layer
        listing = tree_of(mountpoint)
        # Listing and stat of every file fetched no contents; reading them (for digests) did.
        expected = tree_of(podman_root, skip=frozenset({"stargz.index.json", ".no.prefetch.landmark"}))
        assert listing == expected
        assert (mountpoint / "srv/hello").read_text() == "hello from lamina\n"
        assert not (mountpoint / "etc/group").exists()
        narrated = trace.read_text()
        if estargz:
            assert range_gets(registry) - before > 4
            assert "TOC" in narrated and " srv/hello bytes 0+18 " in narrated
        else:
            assert range_gets(registry) == before and narrated.count("not eStargz") == 2
    finally:
        lamina_cmd("umount", str(mountpoint), root=other)  # type: ignore[operator]
        run_podman(podman, "image", "unmount", remote_ref, check=False)
    assert ready < 30
    assert not list((other / "mounts").iterdir())
    assert "lamina-lazy" not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.root
@pytest.mark.slow
def test_lazy_mount_of_an_image_with_a_lying_toc_fails_cleanly(registry: object, lamina_cmd: object,
                                                              tmp_path: Path) -> None:
    address = registry.address  # type: ignore[attr-defined]
    remote_ref = f"{address}/lazy/liar:1"
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", remote_ref)  # type: ignore[operator]
    with RegistryClient(address, tls_verify=False) as client:
        manifest = json.loads(client.get_manifest("lazy/liar", "1").data)
        manifest["layers"][0]["annotations"][TOC_DIGEST_ANNOTATION] = "sha256:" + "b" * 64
        client.put_manifest("lazy/liar", "2", json.dumps(manifest).encode(), manifest["mediaType"])
    other = tmp_path / "empty-store"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = lamina_cmd("mount", f"{address}/lazy/liar:2", str(mountpoint), root=other, check=False)  # type: ignore[operator]
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "TOC digest" in result.stderr, result.stderr
    assert not list((other / "mounts").iterdir())
    assert str(mountpoint) not in Path("/proc/self/mountinfo").read_text()



@pytest.mark.unprivileged
@pytest.mark.slow
def test_lazy_mount_as_an_unprivileged_user(unpriv: object, registry: object, lamina_cmd: object) -> None:
    """Rootless: the layer server and unionfs both run as the user; owners are the TOC's, and a
    0700 root-owned directory of the image is still listed (as ``lamina mount`` shows the store's)."""
    remote_ref = f"{registry.address}/lazy/bb:1"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", remote_ref)  # type: ignore[operator]
    user = unpriv
    mountpoint = user.workdir / "mnt"  # type: ignore[attr-defined]
    user.run(["mkdir", str(mountpoint)])  # type: ignore[attr-defined]
    mounted = user.lamina("mount", remote_ref, str(mountpoint))  # type: ignore[attr-defined]
    assert mounted.returncode == 0, mounted.stderr
    try:
        seen = user.run(["sh", "-c", f"stat -c '%u:%g %a' {mountpoint}/root {mountpoint}/bin/busybox; "  # type: ignore[attr-defined]
                                     f"sha256sum < {mountpoint}/bin/busybox"])
        assert seen.returncode == 0, seen.stderr
        digest = hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
        assert seen.stdout.split("\n")[:3] == ["0:0 700", "0:0 755", f"{digest}  -"]
    finally:
        done = user.lamina("umount", str(mountpoint))  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr
    assert "lamina-lazy" not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.root
@pytest.mark.slow
def test_lazy_mount_prefetches_what_push_prioritized(registry: object, lamina_cmd: object, tmp_path: Path) -> None:
    remote_ref = f"{registry.address}/lazy/bb:prefetch"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz",  # type: ignore[operator]
               "--estargz-prioritize", "/bin/busybox", "lamina/busybox", remote_ref)
    mountpoint, trace = tmp_path / "mnt", tmp_path / "trace"
    mountpoint.mkdir()
    other = tmp_path / "empty-store"
    lamina_cmd("mount", "--trace", str(trace), remote_ref, str(mountpoint), root=other)  # type: ignore[operator]
    try:
        deadline = time.monotonic() + 30
        while "prefetch layer" not in trace.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "prefetch layer" in trace.read_text()
        before = range_gets(registry)
        assert hashlib.sha256((mountpoint / "bin/busybox").read_bytes()).digest() == \
            hashlib.sha256(Path("/bin/busybox").read_bytes()).digest()
        assert range_gets(registry) == before  # already there
    finally:
        lamina_cmd("umount", str(mountpoint), root=other)  # type: ignore[operator]
