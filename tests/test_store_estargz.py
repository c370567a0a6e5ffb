"""eStargz: the writer against the spec's rules and stargz-snapshotter's own reader, the TOC and
chunk reader against hostile blobs, and ``lamina push --compression-format estargz`` pulled and run
by podman.

The outside verifier is stargz-snapshotter's Go ``estargz`` package, built outside the repository
(a small main that opens the blob, verifies the TOC digest and every chunk digest and lists the
tree); ``ESTARGZ_VERIFY`` names the binary. Without it those checks are skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_interop import podman

from lamina.errors import FormatError, LayerError
from lamina.store.estargz import (
    FOOTER_SIZE,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    EStargzBlob,
    compressed_bound,
    decode_chunk,
    footer_bytes,
    parse_footer,
    parse_toc,
    toc_json_from_member,
    write_estargz,
)

VERIFIER = os.environ.get("ESTARGZ_VERIFY")
__all__ = ["podman"]  # the fixture
BIG = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: chunked at 256 KiB


def plain_tar(extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None = None, **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("bin", type=tarfile.DIRTYPE, mode=0o755, mtime=1_600_000_000)
        add("bin/sh", b"#!/bin/busybox sh\n" * 50, mode=0o4755, uid=1, gid=2, uname="u", gname="g")
        add("bin/ln", type=tarfile.LNKTYPE, linkname="bin/sh")
        add("bin/sym", type=tarfile.SYMTYPE, linkname="sh")
        add("etc", type=tarfile.DIRTYPE, mode=0o755)
        add("etc/.wh..wh..opq", b"")
        add("etc/empty", b"")
        add("etc/big", BIG, mode=0o600)
        add("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("fifo", type=tarfile.FIFOTYPE)
        xattr = tarfile.TarInfo("xattr")
        xattr.pax_headers, xattr.size = {"SCHILY.xattr.user.note": "value"}, 3
        tar.addfile(xattr, io.BytesIO(b"abc"))
        for info, data in extra or []:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def convert(tar: bytes, **kwargs: object) -> tuple[bytes, EStargzBlob]:
    out = io.BytesIO()
    blob = write_estargz(io.BytesIO(tar), out, chunk_size=256 * 1024, **kwargs)  # type: ignore[arg-type]
    return out.getvalue(), blob


def read_toc(blob: bytes, toc_digest: str) -> tuple[int, object]:
    offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc_json = toc_json_from_member(blob[offset:len(blob) - FOOTER_SIZE])
    return offset, parse_toc(toc_json, toc_digest, offset)


def tar_listing(data: bytes) -> list[tuple[str, str, bytes | None]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            content = tar.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            out.append((member.name, member.type.decode(), content))
    return out


def test_blob_is_a_gzip_tar_with_the_original_entries_then_the_toc() -> None:
    tar = plain_tar()
    blob, result = convert(tar)
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob)
    uncompressed = gzip.decompress(blob)
    assert result.diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
    assert result.uncompressed_size == len(uncompressed)
    listing = tar_listing(uncompressed)
    assert listing[0][0] == NO_PREFETCH_LANDMARK and listing[0][2] == b"\x0f"
    assert listing[-1][0] == TOC_NAME
    assert listing[1:-1] == tar_listing(tar)
    assert result.annotations() == {TOC_DIGEST_ANNOTATION: result.toc_digest,
                                    UNCOMPRESSED_SIZE_ANNOTATION: str(len(uncompressed))}


def test_footer_is_the_51_byte_empty_member_naming_the_toc() -> None:
    blob, result = convert(plain_tar())
    footer = blob[-FOOTER_SIZE:]
    offset = parse_footer(footer, len(blob))
    assert footer == footer_bytes(offset)
    assert gzip.decompress(footer) == b""
    assert footer[16:38] == b"%016xSTARGZ" % offset
    # The TOC member starts exactly there and holds the TOC tar header first.
    assert gzip.decompress(blob[offset:-FOOTER_SIZE])[:len(TOC_NAME)] == TOC_NAME.encode()


def test_toc_and_every_chunk_verify_and_decode() -> None:
    tar = plain_tar()
    blob, result = convert(tar)
    _, toc = read_toc(blob, result.toc_digest)
    originals = {name: data for name, _, data in tar_listing(tar) if data is not None}
    for name, data in originals.items():
        chunks = toc.chunks_of(name)  # type: ignore[attr-defined]
        pieces = [decode_chunk(blob[c.offset:c.offset + compressed_bound(c)], c, name) for c in chunks]
        assert b"".join(pieces) == data, name
    assert len(toc.chunks_of("etc/big")) == 5  # type: ignore[attr-defined]
    entry = toc.entries["bin/sh"]  # type: ignore[attr-defined]
    assert (entry.mode, entry.uid, entry.gid, entry.size) == (0o4755, 1, 2, 50 * 18)
    assert toc.entries["xattr"].xattrs == {"user.note": b"value"}  # type: ignore[attr-defined]
    assert toc.entries["dev"].type == "char" and toc.entries["bin/sym"].link_name == "sh"  # type: ignore[attr-defined]
    raw = json.loads(toc_json_from_member(blob[toc.toc_offset:-FOOTER_SIZE]))  # type: ignore[attr-defined]
    for entry in raw["entries"]:
        if entry["type"] in ("reg", "chunk") and (entry["type"] == "chunk" or entry.get("size")):
            assert entry["chunkDigest"].startswith("sha256:") and entry["offset"] > 0
            # The spec: a gzip header starts at every payload.
            assert blob[entry["offset"]:entry["offset"] + 2] == b"\x1f\x8b"


def test_prioritized_files_come_first_with_what_they_need_then_the_landmark() -> None:
    blob, _ = convert(plain_tar(), prioritized=["/bin/ln", "etc/big"])
    names = [name for name, _, _ in tar_listing(gzip.decompress(blob))]
    # bin/ln needs its target bin/sh; etc/big needs etc and etc's opaque marker before it.
    assert names[:names.index(PREFETCH_LANDMARK) + 1] == [
        "bin", "bin/sh", "bin/ln", "etc", "etc/.wh..wh..opq", "etc/big", PREFETCH_LANDMARK]
    assert NO_PREFETCH_LANDMARK not in names
    assert names[-1] == TOC_NAME


def test_a_wrong_toc_digest_is_refused_before_parsing() -> None:
    blob, result = convert(plain_tar())
    offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc_json = toc_json_from_member(blob[offset:-FOOTER_SIZE])
    with pytest.raises(FormatError, match="TOC digest"):
        parse_toc(toc_json, "sha256:" + "0" * 64, offset)
    tampered = toc_json.replace(b'"uid": 1', b'"uid": 0')
    assert tampered != toc_json
    with pytest.raises(FormatError, match="TOC digest"):
        parse_toc(tampered, result.toc_digest, offset)


def test_a_chunk_that_does_not_match_its_digest_is_refused() -> None:
    blob, result = convert(plain_tar())
    _, toc = read_toc(blob, result.toc_digest)
    chunk = toc.chunks_of("bin/sh")[0]  # type: ignore[attr-defined]
    good = blob[chunk.offset:chunk.offset + compressed_bound(chunk)]
    other = gzip.compress(b"#!/bin/busybox sh\n" * 49 + b"#!/bin/busybox sH\n")
    with pytest.raises(FormatError, match="digest"):
        decode_chunk(other, chunk, "bin/sh")
    with pytest.raises(FormatError, match="gzip"):
        decode_chunk(b"\x1f\x8b" + good[2:10] + b"garbage" * 10, chunk, "bin/sh")
    with pytest.raises(FormatError):
        decode_chunk(good[:15], chunk, "bin/sh")


@pytest.mark.parametrize("change", [
    lambda e: e.update(offset=10 ** 12),
    lambda e: e.update(chunkOffset=5),
    lambda e: e.update(chunkSize=e["size"] * 2),
    lambda e: e.update(name="../escape"),
    lambda e: e.update(name="bin/./../../escape"),
    lambda e: e.update(name="bin/nul\0name"),
    lambda e: e.update(type="socket"),
    lambda e: e.update(chunkDigest="md5:00"),
    lambda e: e.update(mode=-1),
])
def test_inconsistent_tocs_are_refused_even_with_the_right_digest(change: object) -> None:
    blob, result = convert(plain_tar())
    offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    document = json.loads(toc_json_from_member(blob[offset:-FOOTER_SIZE]))
    entry = next(e for e in document["entries"] if e["name"] == "bin/sh")
    change(entry)  # type: ignore[operator]
    toc_json = json.dumps(document).encode()
    with pytest.raises(FormatError):
        parse_toc(toc_json, "sha256:" + hashlib.sha256(toc_json).hexdigest(), offset)


def test_garbage_footers_are_refused() -> None:
    blob, _ = convert(plain_tar())
    for footer in (b"\0" * FOOTER_SIZE, gzip.compress(b"")[:FOOTER_SIZE], footer_bytes(len(blob) * 2),
                   blob[-FOOTER_SIZE:].replace(b"STARGZ", b"STARGY")):
        with pytest.raises(FormatError):
            parse_footer(footer.ljust(FOOTER_SIZE, b"\0"), len(blob))


def test_a_layer_that_is_already_estargz_or_sparse_is_refused() -> None:
    blob, _ = convert(plain_tar())
    with pytest.raises(LayerError, match=TOC_NAME):
        convert(gzip.decompress(blob))
    sparse = tarfile.TarInfo("sparse")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(LayerError):
        convert(plain_tar([(sparse, None)]))


# ----- the outside reader -----


@pytest.mark.skipif(not VERIFIER, reason="ESTARGZ_VERIFY (stargz-snapshotter's estargz verifier) not set")
@pytest.mark.parametrize("prioritized", [[], ["bin/ln", "etc/big"]])
def test_stargz_snapshotters_reader_verifies_and_lists_the_same_tree(tmp_path: Path, prioritized: list[str]) -> None:
    blob, result = convert(plain_tar(), prioritized=prioritized)
    path = tmp_path / "layer.esgz"
    path.write_bytes(blob)
    assert VERIFIER is not None
    ok = subprocess.run([VERIFIER, str(path), result.toc_digest], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    listed = {line.split(" ")[1]: line.split(" ") for line in ok.stdout.splitlines()}
    assert listed["etc/big"][5] == str(len(BIG)) and listed["bin/sh"][3:5] == ["1", "2"]
    assert listed["bin/sym"][6] == "sh"
    landmark = PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK
    assert set(listed) == {"", "bin", "bin/sh", "bin/ln", "bin/sym", "etc", "etc/.wh..wh..opq", "etc/empty",
                           "etc/big", "dev", "fifo", "xattr", landmark}
    wrong = subprocess.run([VERIFIER, str(path), "sha256:" + "1" * 64], capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "invalid TOC JSON" in wrong.stderr
    # A flipped byte inside a payload member fails the reference reader's chunk check too.
    _, toc = read_toc(blob, result.toc_digest)
    chunk = toc.chunks_of("etc/big")[2]  # type: ignore[attr-defined]
    damaged = bytearray(blob)
    damaged[chunk.offset + 40] ^= 0xFF
    path.write_bytes(bytes(damaged))
    bad = subprocess.run([VERIFIER, str(path), result.toc_digest], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


# ----- push, and podman as the outside consumer -----


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[object]:
    from registry_server import run_registry

    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    with run_registry(tmp_path / "registry") as running:
        yield running


@pytest.mark.root
@pytest.mark.slow
def test_podman_pulls_and_runs_an_image_lamina_pushed_as_estargz(podman: object, registry: object,
                                                                 lamina_cmd: object, tmp_path: Path) -> None:
    from test_store_interop import lamina_image_with_two_layers, run_podman

    from lamina.store.registry import RegistryClient

    lamina_image_with_two_layers(lamina_cmd, tmp_path)  # type: ignore[arg-type]
    address = registry.address  # type: ignore[attr-defined]
    remote = f"{address}/lazy/app:1"
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "interop/app:1", remote)  # type: ignore[operator]
    with RegistryClient(address, tls_verify=False) as client:
        manifest = client.get_manifest("lazy/app", "1").image()
        for layer in manifest.layers:
            assert layer.media_type.endswith("gzip")
            blob = client.fetch_small_blob("lazy/app", layer.digest, tmp_path, max_size=64 << 20)
            offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
            parse_toc(toc_json_from_member(blob[offset:-FOOTER_SIZE]), layer.annotations[TOC_DIGEST_ANNOTATION],
                      offset)
            assert layer.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(gzip.decompress(blob)))
    run_podman(podman, "pull", "--tls-verify=false", remote)
    # An eStargz-agnostic runtime extracts the TOC and the landmark as ordinary files, as the spec
    # expects; everything else is the image as lamina holds it.
    script = ("cat /srv/hello; test ! -e /etc/group && stat -c '%u:%g %a' /srv/owned; "
              "ls /stargz.index.json /.no.prefetch.landmark")
    out = run_podman(podman, "run", "--rm", "--network=none", remote, "sh", "-c", script).stdout.decode()
    assert out.splitlines() == ["hello from lamina", "1000:1000 600", "/.no.prefetch.landmark", "/stargz.index.json"]
    run_podman(podman, "rmi", "-f", remote)
    # lamina pulls it back (its config's diff_ids are the eStargz tars').
    pulled = lamina_cmd("pull", "--tls-verify=false", "-q", remote, root=tmp_path / "other")  # type: ignore[operator]
    assert pulled.returncode == 0


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_keep_their_extended_headers(tar_format: int) -> None:
    """Headers are copied byte for byte, GNU long-name and PAX records included."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tar_format) as tar:
        info = tarfile.TarInfo("d/" + "x" * 150)
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("d/" + "l" * 120)
        link.type, link.linkname = tarfile.SYMTYPE, "y" * 130
        tar.addfile(link)
    blob, result = convert(raw.getvalue())
    assert tar_listing(gzip.decompress(blob))[1:-1] == tar_listing(raw.getvalue())
    _, toc = read_toc(blob, result.toc_digest)
    assert toc.entries["d/" + "l" * 120].link_name == "y" * 130  # type: ignore[attr-defined]
    chunk = toc.chunks_of("d/" + "x" * 150)[0]  # type: ignore[attr-defined]
    assert decode_chunk(blob[chunk.offset:chunk.offset + compressed_bound(chunk)], chunk, "x") == b"hello"
