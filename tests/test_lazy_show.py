"""Showing a lazy image: ``which`` and ``layers`` from its TOCs (no file contents fetched, counted on
the Distribution registry's side), compared with the same commands on the image pulled normally."""

from __future__ import annotations

import io
import json
import os
import subprocess
import re
import tarfile
import time
from pathlib import Path

import pytest
from test_e2e_bad_input import tar_bytes
from test_store_estargz import registry

from lamina.inspector.analysis import LayerInput, analyze
from lamina.inspector.toc_layers import scan_toc
from lamina.store.estargz import FOOTER_SIZE, parse_footer, parse_toc, toc_json_from_member, write_estargz
from lamina.store.registry import RegistryClient

__all__ = ["registry"]  # the fixture

_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (200|206) (\d+)')


def blob_bytes(log_path: Path) -> list[tuple[str, int, int]]:
    """``(digest, status, bytes)`` of every blob GET the registry answered."""
    return [(m.group(1), int(m.group(2)), int(m.group(3)))
            for m in _BLOB_GET.finditer(log_path.read_text(errors="replace"))]


def toc_bytes(address: str, repository: str, tag: str) -> tuple[int, list[str]]:
    """The bytes a reader needs for the image's TOCs (footer + TOC member per layer), and its layers."""
    with RegistryClient(address, tls_verify=False) as client:
        manifest = json.loads(client.get_manifest(repository, tag).data)
        total = 0
        for layer in manifest["layers"]:
            size = layer["size"]
            footer = client.fetch_blob_range(repository, layer["digest"], size - FOOTER_SIZE, size,
                                             deadline=time.monotonic() + 30)
            total += size - parse_footer(footer, size)
    return total, [layer["digest"] for layer in manifest["layers"]]


def _toc_of(tar: bytes):  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    blob = write_estargz(io.BytesIO(tar), out, chunk_size=4096)
    data = out.getvalue()
    offset = parse_footer(data[-FOOTER_SIZE:], len(data))
    return parse_toc(toc_json_from_member(data[offset:-FOOTER_SIZE]), blob.annotations()[
        "containerd.io/snapshot/stargz/toc.digest"], offset)


def _unpack(tar: bytes, into: Path) -> None:
    into.mkdir()
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into)  # our own tar: trusted


def test_a_toc_scan_is_the_scan_of_the_unpacked_layer(tmp_path: Path) -> None:
    """Whiteouts, opaque directories, implied parents, hard links and symlinks: the analysis of TOCs
    equals the analysis of the same tars unpacked (the landmark eStargz adds is not counted)."""
    lower = tar_bytes([("etc/", "dir", ""), ("etc/group", "file", b"root:x:0:\n"), ("etc/passwd", "file", b"root::0:0\n"),
                       ("var/cache/a/b", "file", b"x" * 5000), ("var/cache/c", "file", b"y" * 300),
                       ("bin/sh", "file", b"#!" + b"z" * 9000), ("bin/ln", "hardlink", "bin/sh")])
    upper = tar_bytes([("etc/.wh.group", "file", b""), ("var/cache/.wh..wh..opq", "file", b""),
                       ("var/cache/new", "file", b"n" * 10), ("bin/sh", "file", b"#!new"), ("bin/vi", "symlink", "busybox"),
                       ("usr/deep/implied/file", "file", b"f" * 70)])
    tars = [lower, upper]
    dirs = []
    for index, tar in enumerate(tars):
        _unpack(tar, tmp_path / f"l{index}")
        dirs.append(tmp_path / f"l{index}")
    on_disk = analyze([LayerInput(d) for d in dirs])
    from_tocs = analyze([LayerInput(d, scan=scan_toc(_toc_of(tar))) for d, tar in zip(dirs, tars, strict=True)])
    for mine, theirs in zip(from_tocs.layers, on_disk.layers, strict=True):
        fields = ("size", "files", "added", "changed", "deleted", "wasted", "whiteouts", "opaque_dirs")
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert sorted(from_tocs.paths) == sorted(on_disk.paths)
    for path, history in on_disk.paths.items():
        other = from_tocs.paths[path]
        assert (other.events, other.visible, [(c.layer, c.kind, c.size) for c in other.copies]) == \
            (history.events, history.visible, [(c.layer, c.kind, c.size) for c in history.copies]), path


@pytest.mark.slow
def test_which_and_layers_of_a_registry_image_read_only_tocs(registry: object, lamina_cmd: object,
                                                             tmp_path: Path) -> None:
    """From an empty store, ``which`` and ``layers`` (and ``--html``) of an eStargz image fetch the
    footer and TOC of each layer (once) and the config, nothing else; they answer what the same
    commands answer for the same image pulled normally."""
    from test_store_interop import lamina_image_with_two_layers

    run = lamina_cmd  # type: ignore[assignment]
    address, log_path = registry.address, registry.log_path  # type: ignore[attr-defined]
    lamina_image_with_two_layers(run, tmp_path)  # type: ignore[arg-type]
    run("push", "--tls-verify=false", "--compression-format", "estargz", "interop/app:1", f"{address}/show/app:esgz")  # type: ignore[operator]
    run("push", "--tls-verify=false", "interop/app:1", f"{address}/show/app:gzip")  # type: ignore[operator]
    needed, layer_digests = toc_bytes(address, "show/app", "esgz")
    pulled = tmp_path / "pulled"
    run("pull", "--tls-verify=false", f"{address}/show/app:gzip", root=pulled)  # type: ignore[operator]

    lazy = tmp_path / "empty-store"
    before = len(blob_bytes(log_path))
    remote = f"{address}/show/app:esgz"
    layers = json.loads(run("layers", "--json", remote, root=lazy).stdout)  # type: ignore[operator]
    which = {path: json.loads(run("which", "--json", remote, path, root=lazy).stdout)  # type: ignore[operator]
             for path in ("/srv/hello", "/bin/sh", "/etc")}
    gone = run("which", remote, "/etc/group", root=lazy).stdout  # type: ignore[operator]
    run("layers", "--html", str(tmp_path / "layers.html"), remote, root=lazy)  # type: ignore[operator]
    fetched = blob_bytes(log_path)[before:]
    ranges = [(digest, size) for digest, status, size in fetched if status == 206]
    whole = [digest for digest, status, _ in fetched if status == 200]
    assert {digest for digest, _ in ranges} == set(layer_digests)
    # Footer + TOC per layer, once: the later commands verify the TOCs the store kept. No contents.
    assert sum(size for _, size in ranges) == needed
    assert not set(whole) & set(layer_digests)  # only the config came whole
    assert not (lazy / "lazy" / "chunks").exists() or not list((lazy / "lazy" / "chunks").iterdir())

    local = f"{address}/show/app:gzip"
    expected = json.loads(run("layers", "--json", local, root=pulled).stdout)  # type: ignore[operator]
    ignore = {"diff_id"}  # eStargz layers are other tars: other diff ids
    assert [{k: v for k, v in layer.items() if k not in ignore} for layer in layers["layers"]] == \
        [{k: v for k, v in layer.items() if k not in ignore} for layer in expected["layers"]]
    assert (layers["total_bytes"], layers["wasted_bytes"], layers["dive"]) == \
        (expected["total_bytes"], expected["wasted_bytes"], expected["dive"])
    for path, answer in which.items():
        theirs = json.loads(run("which", "--json", local, path, root=pulled).stdout)  # type: ignore[operator]
        strip = json.loads(re.sub(r'"diff_id": "sha256:[0-9a-f]{64}"', '"diff_id": ""', json.dumps(answer)))
        assert strip == json.loads(re.sub(r'"diff_id": "sha256:[0-9a-f]{64}"', '"diff_id": ""', json.dumps(theirs)))
    assert "/etc/group: not in the image (deleted)" in gone
    assert "srv" in (tmp_path / "layers.html").read_text()


VERIFIER = os.environ.get("ESTARGZ_VERIFY")


@pytest.mark.skipif(not VERIFIER, reason="ESTARGZ_VERIFY (stargz-snapshotter's estargz verifier) not set")
def test_the_lazy_tree_and_the_toc_scan_agree_with_stargz_snapshotters_reader(tmp_path: Path) -> None:
    """stargz-snapshotter's own reader lists each layer (type, path, permissions, owner, size, link
    target; hard links as their target): the lazy filesystem's tree shows the same, and the
    analysis's scan has the same files, with the ``.wh.`` markers decoded."""
    from test_store_estargz import plain_tar

    from lamina.lazy.tree import LazyTree

    whiteouts = tar_bytes([("etc/.wh.group", "file", b""), ("var/cache/.wh..wh..opq", "file", b""),
                           ("var/cache/new", "file", b"n" * 10), ("bin/vi", "symlink", "busybox"),
                           ("usr/deep/implied/file", "file", b"f" * 70)])
    for index, tar in enumerate([plain_tar(), whiteouts]):
        out = io.BytesIO()
        blob = write_estargz(io.BytesIO(tar), out, chunk_size=4096)
        (tmp_path / f"{index}.esgz").write_bytes(out.getvalue())
        assert VERIFIER is not None
        listed = subprocess.run([VERIFIER, str(tmp_path / f"{index}.esgz"), blob.toc_digest], capture_output=True,
                                text=True, timeout=60, check=True).stdout
        theirs = {}
        for line in listed.splitlines():
            kind, name, mode, uid, gid, size, *link = line.split(" ")
            if name and name not in (".no.prefetch.landmark", ".prefetch.landmark"):
                theirs[name] = (kind, int(mode, 8) & 0o777, int(uid), int(gid), int(size) if kind == "reg" else 0,
                                link[0] if kind == "symlink" else "")
        toc = _toc_of(tar)
        tree = LazyTree([toc], [])
        mine = {}
        pending = [("", tree.lookup(1, "0"))]
        while pending:
            path, node = pending.pop()
            for name, child in tree.listing(node.inode):
                child_path = f"{path}/{name}".lstrip("/")
                a = child.attributes()
                kind = {"reg": "reg", "dir": "dir", "symlink": "symlink", "char": "char", "block": "block",
                        "fifo": "fifo"}[child.entry.type]
                mine[child_path] = (kind, a.mode & 0o777, a.uid, a.gid, a.size if kind == "reg" else 0,
                                    child.entry.link_name if kind == "symlink" else "")
                if child.is_dir:
                    pending.append((child_path, child))
        assert mine == theirs
        scan = scan_toc(toc)
        markers = {name for name in theirs if name.rsplit("/", 1)[-1].startswith(".wh.")}
        files = {path.lstrip("/"): (kind, size) for path, kind, size, _, _ in scan.entries}
        expected = {name: ({"reg": "file", "dir": "dir", "symlink": "symlink"}.get(kind, "other"),
                           size if kind == "reg" else len(link.encode()) if kind == "symlink" else 0)
                    for name, (kind, _, _, _, size, link) in theirs.items() if name not in markers}
        assert files == expected
        assert len(scan.whiteouts) + len(scan.opaque_dirs) == len(markers)


@pytest.mark.unprivileged
@pytest.mark.slow
def test_which_layers_trace_and_prune_as_an_unprivileged_user(unpriv_nosubids: object, registry: object,
                                                              lamina_cmd: object) -> None:
    """Rootless: the TOC-based verbs, a traced lazy mount, its umount and the prune of its caches."""
    remote = f"{registry.address}/show/bb:1"  # type: ignore[attr-defined]
    lamina_cmd("push", "--tls-verify=false", "--compression-format", "estargz", "lamina/busybox", remote)  # type: ignore[operator]
    user = unpriv_nosubids
    layers = user.lamina("layers", "--json", remote)  # type: ignore[attr-defined]
    assert layers.returncode == 0, layers.stderr
    assert json.loads(layers.stdout)["layers"][0]["added"] > 200
    which = user.lamina("which", remote, "/bin/busybox")  # type: ignore[attr-defined]
    assert which.returncode == 0 and "provided by layer 1 of 1" in which.stdout, which.stderr
    mnt, trace = user.workdir / "mnt", user.workdir / "trace"  # type: ignore[attr-defined]
    user.run(["mkdir", str(mnt)])  # type: ignore[attr-defined]
    mounted = user.lamina("mount", "--trace", str(trace), remote, str(mnt))  # type: ignore[attr-defined]
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert user.run(["sh", "-c", f"cat {mnt}/bin/busybox > /dev/null"]).returncode == 0  # type: ignore[attr-defined]
    finally:
        done = user.lamina("umount", str(mnt))  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr
    assert "TOC from the store" in trace.read_text() and " bin/busybox bytes 0+" in trace.read_text()
    pruned = user.lamina("system", "prune", "-f")  # type: ignore[attr-defined]
    assert pruned.returncode == 0 and "cached lazy layer files" in pruned.stdout, pruned.stderr
