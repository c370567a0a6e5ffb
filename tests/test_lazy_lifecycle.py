"""A lazy mount's life: the trace of its fetches, lying and stalling registries seen through the
kernel, registry auth, ``umount`` stopping the layer server, and ``system df``/``prune`` of what
lazy mounts keep in the store."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import FakeRegistry, bcrypt_hash, oci_image, run_registry
from test_lazy_mount import estargz_blob, open_layer
from test_store_estargz import BIG, registry

from lamina.lazy.remote import ChunkCache, ChunkUnavailable, RemoteLayer
from lamina.lazy.tree import LazyTree
from lamina.store.estargz import (
    FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
    parse_footer,
    parse_toc,
    toc_json_from_member,
)
from lamina.store.image_schema import Descriptor
from lamina.store.registry import RegistryClient

__all__ = ["registry"]  # the fixture

REPO = "lazy/app"


def _etc(tree: LazyTree, name: str) -> int:
    return tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "etc").inode, name).inode


# ----- the trace, without a mount -----


def test_the_trace_narrates_every_fetch_and_its_verification(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines: list[str] = []
    data, descriptor = estargz_blob()
    with FakeRegistry().serve() as fake:
        fake.add_blob(data)
        layer = RemoteLayer(RegistryClient(fake.address, tls_verify=False, timeout=5), REPO, descriptor,
                            ChunkCache(tmp_path / "chunks", tmp_path / "tocs"), lines.append)
        toc = layer.open_toc()
        tree = LazyTree([toc], [layer])
        assert tree.read(_etc(tree, "big"), len(BIG) - 2, 10) == BIG[-2:]
        first, last = toc.chunks_of("etc/big")[0], toc.chunks_of("etc/big")[-1]
        assert re.fullmatch(rf"layer {descriptor.digest[7:19]}: TOC \d+ bytes at {toc.toc_offset}, \d+ entries, verified",
                            lines[0]), lines
        assert lines[1] == (f"fetch layer {descriptor.digest[7:19]} etc/big bytes {last.chunk_offset}+{last.size} "
                            f"(blob offset {last.offset}, {last.end - last.offset} compressed): verified "
                            f"{last.digest[:19]}")
        assert tree.read(_etc(tree, "big"), 0, 10) == BIG[:10]
        assert lines[2].startswith(f"fetch layer {descriptor.digest[7:19]} etc/big bytes 0+{first.size} ")
        assert len(lines) == 3
        # A lying registry: the mismatch, the second fetch and the refusal are narrated.
        sh = toc.chunks_of("bin/sh")[0]
        damaged = bytearray(data)
        damaged[sh.offset + 20] ^= 0xFF
        fake.blob_override[descriptor.digest] = bytes(damaged)
        with pytest.raises(ChunkUnavailable):
            tree.read(tree.lookup(tree.lookup(tree.lookup(1, "0").inode, "bin").inode, "sh").inode, 0, 10)
        assert [line.rsplit(": ", 1)[1] for line in lines[3:]] == ["fetching again", "not served"]
        assert all(" bin/sh bytes 0+" in line and "does not verify" in line for line in lines[3:])
        assert [r.levelname for r in caplog.records if r.levelname == "WARNING"] == ["WARNING"]
        caplog.clear()  # the refusal's one warning was expected
        # The TOC was kept: a second reader verifies it again and asks the registry for nothing.
        before = len(fake.range_requests)
        again = RemoteLayer(RegistryClient(fake.address, tls_verify=False, timeout=5), REPO, descriptor,
                            ChunkCache(tmp_path / "chunks", tmp_path / "tocs"), lines.append)
        assert again.open_toc().entries.keys() == toc.entries.keys()
        assert len(fake.range_requests) == before and lines[-1].endswith("entries, verified")


def test_a_kept_toc_that_no_longer_verifies_is_dropped_and_fetched(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    data, descriptor = estargz_blob()
    with FakeRegistry().serve() as fake:
        fake.add_blob(data)
        cache = ChunkCache(tmp_path / "chunks", tmp_path / "tocs")
        RemoteLayer(RegistryClient(fake.address, tls_verify=False, timeout=5), REPO, descriptor, cache).open_toc()
        kept = tmp_path / "tocs" / descriptor.digest[7:]
        kept.write_bytes(kept.read_bytes().replace(b'"bin/sh"', b'"bin/zz"'))
        layer = open_layer(fake, descriptor, tmp_path)
        layer.cache = cache
        before = len(fake.range_requests)
        toc = layer.open_toc()
        assert "bin/sh" in toc.entries and len(fake.range_requests) == before + 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][0].startswith("kept TOC")
    caplog.clear()


# ----- through the kernel -----


@pytest.fixture
def fake_image() -> Iterator[tuple[FakeRegistry, bytes, Descriptor]]:
    """A one-layer eStargz image in a FakeRegistry (which can lie and stall) as lazy/app:1."""
    data, descriptor = estargz_blob()
    config, manifest = oci_image([data])
    document = json.loads(manifest)
    document["layers"][0]["annotations"] = descriptor.annotations
    with FakeRegistry().serve() as fake:
        fake.add_blob(data)
        fake.add_blob(config)
        fake.add_manifest(REPO, "1", document["mediaType"], json.dumps(document).encode())
        yield fake, data, descriptor


def _read(path: Path, timeout: float = 60) -> tuple[int, bytes, float]:
    """(status, stdout, seconds) of ``cat PATH`` in a process of its own (a hung read cannot hang the test)."""
    started = time.monotonic()
    done = subprocess.run(["cat", str(path)], capture_output=True, timeout=timeout)
    return done.returncode, done.stdout, time.monotonic() - started


def _server_log(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (root / "mounts").glob("lazy-*/server.log"))


@pytest.mark.root
@pytest.mark.slow
def test_a_lying_registry_gives_eio_and_one_log_line_through_the_mount(fake_image: object, lamina_cmd: object,
                                                                      tmp_path: Path) -> None:
    fake, data, descriptor = fake_image  # type: ignore[misc]
    mnt, root = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()
    lamina_cmd("mount", f"{fake.address}/{REPO}:1", str(mnt), root=root)  # type: ignore[operator]
    try:
        status, out, _ = _read(mnt / "etc/big")
        assert status == 0 and out == BIG
        # Other bytes where bin/sh's member starts: a valid gzip member only its digest can refuse.
        offset = parse_footer(data[-FOOTER_SIZE:], len(data))
        toc = parse_toc(toc_json_from_member(data[offset:-FOOTER_SIZE]), descriptor.annotations[TOC_DIGEST_ANNOTATION],
                        offset)
        sh = toc.chunks_of("bin/sh")[0]
        forged = gzip.compress(b"#!/bin/busybox sh\n" * 49 + b"rm -rf / # evil!!\n", mtime=0)
        damaged = bytearray(data)
        damaged[sh.offset:sh.offset + len(forged)] = forged
        fake.blob_override[descriptor.digest] = bytes(damaged)
        before = len(fake.range_requests)
        status, out, _ = _read(mnt / "bin/sh")
        assert status != 0 and out == b""
        assert len(fake.range_requests) - before == 2  # fetched once more, then refused
        lines = [line for line in _server_log(root).splitlines() if "not served" in line]
        assert len(lines) == 1 and "bin/sh" in lines[0], _server_log(root)
        # Once the registry serves the right bytes again, the file reads (after REFUSED_CHUNK_HOLD_S).
        del fake.blob_override[descriptor.digest]
        deadline = time.monotonic() + 30
        while (result := _read(mnt / "bin/sh"))[0] != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert result[0] == 0 and result[1].startswith(b"#!/bin/busybox sh")
    finally:
        lamina_cmd("umount", str(mnt), root=root)  # type: ignore[operator]


@pytest.mark.root
@pytest.mark.slow
def test_a_stalled_registry_gives_eio_within_the_deadline_and_cached_files_still_read(
        fake_image: object, lamina_cmd: object, tmp_path: Path) -> None:
    fake, _data, _descriptor = fake_image  # type: ignore[misc]
    mnt, root = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()
    lamina_cmd("mount", f"{fake.address}/{REPO}:1", str(mnt), root=root, env={"LAMINA_LAZY_DEADLINE": "2"})  # type: ignore[operator]
    try:
        assert _read(mnt / "bin/sh")[0] == 0
        fake.blob_delay = 60.0
        status, _, took = _read(mnt / "etc/big")
        assert status != 0 and took < 15, took
        status, out, took = _read(mnt / "bin/sh")
        assert status == 0 and out.startswith(b"#!/bin/busybox sh") and took < 2
        assert sorted(os.listdir(mnt / "etc"))  # lookups and listings never needed the registry
    finally:
        fake.blob_delay = 0.0
        lamina_cmd("umount", str(mnt), root=root)  # type: ignore[operator]


@pytest.mark.root
@pytest.mark.slow
def test_a_lazy_mount_uses_the_credentials_of_login(lamina_cmd: object, tmp_path: Path) -> None:
    """Basic auth (htpasswd) on the Distribution registry: without credentials one line and nothing
    left; after ``lamina login`` the mount works, its layer server using the same credentials."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    if bcrypt_hash("pw") is None:
        pytest.skip("neither htpasswd nor crypt's blowfish is available to write an htpasswd file")
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    mnt, root = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()
    with run_registry(tmp_path / "registry", htpasswd={"carol": "pw"}) as running:
        remote = f"{running.address}/private/bb:1"
        lamina_cmd("push", "--tls-verify=false", "--creds", "carol:pw", "--compression-format", "estargz",  # type: ignore[operator]
                   "lamina/busybox", remote, env=env)
        refused = lamina_cmd("mount", remote, str(mnt), root=root, env=env, check=False)  # type: ignore[operator]
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
        assert not list((root / "mounts").iterdir())
        lamina_cmd("login", "--tls-verify=false", "-u", "carol", "--password-stdin", running.address,  # type: ignore[operator]
                   input="pw\n", env=env)
        lamina_cmd("mount", remote, str(mnt), root=root, env=env)  # type: ignore[operator]
        try:
            assert _read(mnt / "bin/busybox")[1] == Path("/bin/busybox").read_bytes()
        finally:
            lamina_cmd("umount", str(mnt), root=root, env=env)  # type: ignore[operator]


def _layer_server_pids(root: Path) -> list[int]:
    """The layer servers of lazy mounts in the store at ``root`` (their records name them)."""
    pids = [int(path.read_text()) for path in (root / "mounts").glob("lazy-*/server.pid")]
    assert all(b"lamina.lazy.serve" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids)
    return pids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("lazy", [False, True], ids=["umount", "umount-lazy"])
def test_umount_stops_the_layer_server(registry: object, lamina_cmd: object, tmp_path: Path, lazy: bool) -> None:
    remote = f"{registry.address}/lazy/bb:1"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", remote)  # type: ignore[operator]
    mnt, root = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()
    lamina_cmd("mount", remote, str(mnt), root=root)  # type: ignore[operator]
    [pid] = _layer_server_pids(root)
    busy = open(mnt / "bin/busybox", "rb") if lazy else None  # kept open across the umount
    try:
        lamina_cmd("umount", *(["--lazy"] if lazy else []), str(mnt), root=root)  # type: ignore[operator]
        if busy is not None:
            assert busy.read(4) == b"\x7fELF"  # a detached mount still serves who holds it
            assert not _gone(pid)
    finally:
        if busy is not None:
            busy.close()
    deadline = time.monotonic() + 10  # umount waits for it, but a loaded machine may reap it late
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), "the layer server outlived its mount"
    assert "lamina-lazy" not in Path("/proc/self/mountinfo").read_text()
    if lazy:
        lamina_cmd("system", "prune", "-f", root=root)  # type: ignore[operator]
    assert not list((root / "mounts").iterdir())


@pytest.mark.root
@pytest.mark.slow
def test_system_df_counts_and_prune_removes_lazy_state_nothing_uses(registry: object, lamina_cmd: object,
                                                                    tmp_path: Path) -> None:
    remote = f"{registry.address}/lazy/bb:1"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", remote)  # type: ignore[operator]
    mnt, root = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()

    def images_row() -> dict[str, str]:
        rows = [json.loads(line) for line in lamina_cmd("system", "df", "--format", "json", root=root).stdout.splitlines()]  # type: ignore[operator]
        return next(row for row in rows if row["Type"] == "Images")

    lamina_cmd("mount", remote, str(mnt), root=root)  # type: ignore[operator]
    try:
        assert (mnt / "bin/busybox").read_bytes()[:4] == b"\x7fELF"
        chunks = list((root / "lazy" / "chunks").iterdir())
        assert chunks and list((root / "lazy" / "tocs").iterdir())
        # Something nothing uses: a chunk of another image.
        (root / "lazy" / "chunks" / ("0" * 64)).write_bytes(b"x" * 100_000)
        used = images_row()
        assert used["Size"] != "0B" and used["Reclaimable"].startswith("1")  # ~100 kB of it
        pruned = lamina_cmd("system", "prune", "-f", root=root).stdout  # type: ignore[operator]
        assert "Deleted 1 cached lazy layer files" in pruned
        assert sorted((root / "lazy" / "chunks").iterdir()) == sorted(chunks)
        assert (mnt / "bin/busybox").read_bytes()[:4] == b"\x7fELF"
    finally:
        lamina_cmd("umount", str(mnt), root=root)  # type: ignore[operator]
    pruned = lamina_cmd("system", "prune", "-f", root=root).stdout  # type: ignore[operator]
    assert "cached lazy layer files" in pruned
    assert not list((root / "lazy" / "chunks").iterdir()) and not list((root / "lazy" / "tocs").iterdir())
    assert images_row()["Size"] == "0B"


def test_prune_keeps_everything_when_a_live_record_cannot_be_read(tmp_path: Path) -> None:
    from lamina.layout import Layout
    from lamina.lazy import state

    layout = Layout(tmp_path)
    layout.lazy_chunks.mkdir(parents=True)
    (layout.lazy_chunks / ("a" * 64)).write_bytes(b"a")
    (layout.mounts / "lazy-x").mkdir(parents=True)
    (layout.mounts / "lazy-x" / "spec.json").write_text("{not json")
    # A live process that looks like a layer server (its command line names the module).
    server = subprocess.Popen(["sh", "-c", "sleep 60", "lamina.lazy.serve"])
    # Popen may return while the kernel is still building the new program's argv (vfork resumes
    # the parent first): until then /proc/PID/cmdline is empty.
    deadline = time.monotonic() + 10
    while b"lamina.lazy.serve" not in Path(f"/proc/{server.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in server never showed its command line"
        time.sleep(0.01)
    try:
        (layout.mounts / "lazy-x" / "server.pid").write_text(str(server.pid))
        assert state.prune(layout) == (0, 0)
    finally:
        server.kill()
        server.wait()
    assert state.prune(layout)[0] == 1  # its server is gone: so is what it used


def test_prune_keeps_what_the_layer_server_of_a_lazy_container_uses(tmp_path: Path) -> None:
    """Containers run from lazy images have layer servers of their own (``ROOT/lazy/run/*``)."""
    from lamina.layout import Layout
    from lamina.lazy import state

    layout = Layout(tmp_path)
    used, unused = "b" * 64, "c" * 64
    layout.lazy_chunks.mkdir(parents=True)
    for chunk in (used, unused):
        (layout.lazy_chunks / chunk).write_bytes(b"x")
    layout.lazy_tocs.mkdir(parents=True)
    toc = {"version": 1, "entries": [{"name": "f", "type": "reg", "size": 1, "chunkDigest": f"sha256:{used}"}]}
    (layout.lazy_tocs / ("d" * 64)).write_bytes(b"100\n" + json.dumps(toc).encode())
    (tmp_path / "lazy" / "run" / "x").mkdir(parents=True)
    (tmp_path / "lazy" / "run" / "x" / "spec.json").write_text(json.dumps({"layers": [{"digest": "sha256:" + "d" * 64}]}))
    assert state.prune(layout)[0] == 1
    assert sorted(os.listdir(layout.lazy_chunks)) == [used] and os.listdir(layout.lazy_tocs) == ["d" * 64]



def _waiting_layer_servers() -> list[int]:
    """Preforked layer servers of this checkout still waiting for work."""
    here = str(Path(__file__).resolve().parent.parent)
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except (OSError, ValueError):
            continue
        if cmdline[-3:-1] == [b"lamina.lazy.serve", b"--stdin"] and cwd == here and not _gone(int(entry)):
            found.append(int(entry))
    return found


@pytest.mark.root
@pytest.mark.slow
def test_a_mount_of_a_pulled_image_named_by_its_registry_leaves_no_layer_server(registry: object, lamina_cmd: object,
                                                                                tmp_path: Path) -> None:
    """The layer server started on a guess (the name looks like a registry's) goes when the image is
    in the store after all: the mount is unionfs over the store's layers, and nothing waits."""
    remote = f"{registry.address}/lazy/pulled:1"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "lamina/busybox", remote)  # type: ignore[operator]
    lamina_cmd("pull", "--tls-verify=false", remote)  # type: ignore[operator]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lamina_cmd("mount", remote, str(mnt))  # type: ignore[operator]
    try:
        assert not list((tmp_path / "lamina-root" / "mounts").glob("lazy-*"))
        deadline = time.monotonic() + 10
        while _waiting_layer_servers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _waiting_layer_servers()
    finally:
        lamina_cmd("umount", str(mnt))  # type: ignore[operator]
