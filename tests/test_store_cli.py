"""The store's verbs through the real command line: images, tag, rmi, inspect, history, import, save,
load, system df/prune/check; bad input gives one line and docker's exit code (1; 125 for a bad flag)
with the store untouched."""

from __future__ import annotations

import gzip
import io
import json
import re
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import docker_error_code

Cli = Callable[..., subprocess.CompletedProcess[str]]


def rootfs_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


def store_snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tmp" not in p.parts and p.name != "lock")


def test_images_tag_inspect_history(lamina_cmd: Cli, tmp_path: Path) -> None:
    out = lamina_cmd("inspect", "--format", "{{.Id}}", "lamina/busybox").stdout.strip()
    image_id = out.removeprefix("sha256:")
    lamina_cmd("tag", "lamina/busybox", "mine:1", "localhost:5000/mine")
    listing = lamina_cmd("images").stdout.splitlines()
    assert listing[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    rows = {tuple(line.split()[:3]) for line in listing[1:]}
    assert rows == {("lamina/busybox", "latest", image_id[:12]), ("mine", "1", image_id[:12]),
                    ("localhost:5000/mine", "latest", image_id[:12])}
    assert "ago" in listing[1] and "MB" in listing[1]
    assert lamina_cmd("images", "-q").stdout.split() == [image_id[:12]]
    rows_json = [json.loads(line) for line in lamina_cmd("images", "--format", "json").stdout.splitlines()]
    assert {(r["Repository"], r["Tag"], r["ID"]) for r in rows_json} == rows  # docker's: one object a line
    assert lamina_cmd("images", "mine").stdout.count("\n") == 2
    inspected = json.loads(lamina_cmd("inspect", "mine:1").stdout)[0]
    assert inspected["Id"] == "sha256:" + image_id and inspected["Config"]["Cmd"] == ["sh"]
    assert inspected["RootFS"]["Layers"][0].startswith("sha256:")
    history = lamina_cmd("history", "mine:1").stdout.splitlines()
    assert history[0].split()[:3] == ["IMAGE", "CREATED", "CREATED"] and "busybox-static" in history[1]
    missing = lamina_cmd("inspect", "nope:1", check=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "nope:1" in missing.stderr


def test_rmi_untags_then_deletes_and_refuses_images_in_use(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    tar = rootfs_tar(tmp_path / "r.tar", {"bin/x": b"x"})
    image_id = lamina_cmd("import", str(tar), "one:1").stdout.strip().removeprefix("sha256:")
    lamina_cmd("tag", "one:1", "two:1")
    assert lamina_cmd("rmi", "two:1").stdout.strip() == "Untagged: two:1"
    refused = lamina_cmd("rmi", image_id[:12], check=False)
    assert refused.returncode == 0, refused.stderr  # only one name left: deleting by ID is fine
    image_id = lamina_cmd("import", str(tar), "one:1").stdout.strip().removeprefix("sha256:")
    container = root / "containers" / "c1"
    container.mkdir(parents=True)
    (container / "container.json").write_text(json.dumps({"image_id": image_id}))
    in_use = lamina_cmd("rmi", "one:1", check=False)
    assert in_use.returncode == 1 and "in use" in in_use.stderr
    forced = lamina_cmd("rmi", "-f", "one:1")
    assert "Untagged: one:1" in forced.stdout
    assert image_id[:12] in lamina_cmd("images", "-q").stdout, "still there, untagged, for the container"
    assert lamina_cmd("system", "check").returncode == 0


def test_import_with_changes_and_compression(lamina_cmd: Cli, tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path / "r.tar.gz", {"bin/app": b"#!/bin/sh\necho app\n", "etc/conf": b"c"})
    out = lamina_cmd("import", str(tar), "imported:v1", "--change", 'CMD ["/bin/app", "--flag"]',
                     "-c", "ENV A=1 B=two", "-c", "WORKDIR /srv", "-c", "EXPOSE 8080",
                     "-c", "ENTRYPOINT /bin/sh -c", "-m", "from a test")
    assert out.stdout.startswith("sha256:")
    cfg = json.loads(lamina_cmd("inspect", "imported:v1").stdout)[0]
    assert cfg["Config"]["Cmd"] == ["/bin/app", "--flag"]
    assert cfg["Config"]["Env"] == ["A=1", "B=two"] and cfg["Config"]["WorkingDir"] == "/srv"
    assert cfg["Config"]["ExposedPorts"] == {"8080/tcp": {}}
    assert cfg["Config"]["Entrypoint"] == ["/bin/sh", "-c", "/bin/sh -c"]
    assert cfg["History"][0]["comment"] == "from a test"
    bad = lamina_cmd("import", str(tar), "x", "-c", "RUN rm -rf /", check=False)
    assert bad.returncode == 1 and "unsupported instruction 'RUN'" in bad.stderr


def test_save_load_round_trip_both_formats_compressed_or_not(lamina_cmd: Cli, tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path / "r.tar", {"hello": b"world"})
    image_id = lamina_cmd("import", str(tar), "rt:1").stdout.strip()
    # docker's SIZE: the content's bytes, not the tar's (headers and 10 KiB of padding)
    assert lamina_cmd("images", "--format", "{{.Size}}", "rt:1").stdout.strip() == "5B"
    assert lamina_cmd("history", "rt:1").stdout.splitlines()[1].split()[-1] == "5B"
    for fmt in ("docker-archive", "oci-archive"):
        archive = tmp_path / f"{fmt}.tar"
        if fmt == "docker-archive":
            lamina_cmd("save", "--format", fmt, "-o", str(archive), "rt:1")
        else:  # through stdout, as `lamina save IMAGE > FILE`
            with open(archive, "wb") as out:
                subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_path / "lamina-root"),
                                "save", "--format", fmt, "rt:1"], stdout=out, check=True)
        with tarfile.open(archive) as t:
            names = t.getnames()
        assert ("manifest.json" in names) if fmt == "docker-archive" else ("index.json" in names)
        for variant in (archive, tmp_path / f"{fmt}.tar.gz"):
            if variant.suffix == ".gz":
                variant.write_bytes(gzip.compress(archive.read_bytes()))
            other = tmp_path / f"other-{variant.name}"
            if variant.suffix == ".gz":  # through stdin, as `lamina load < FILE`
                with open(variant, "rb") as stdin:
                    loaded = subprocess.run([sys.executable, "-m", "lamina", "--root", str(other), "load"],
                                            stdin=stdin, capture_output=True, text=True, check=True)
            else:
                loaded = lamina_cmd("load", "-i", str(variant), root=other)
            *layers, last = loaded.stdout.splitlines()
            assert last == "Loaded image: rt:1"
            # docker's load: a line per layer, "<id>: Loading layer" with its size, plain in a pipe.
            assert layers and all(re.fullmatch(r"[0-9a-f]{12}: Loading layer  \S+B/\S+B", line) for line in layers), layers
            got = json.loads(lamina_cmd("inspect", "rt:1", root=other).stdout)[0]
            assert got["Id"] == image_id
            layer_dir = Path(got["GraphDriver"]["Data"]["LowerDir"])
            assert (layer_dir / "hello").read_bytes() == b"world"
            assert lamina_cmd("system", "check", root=other).stdout.strip().endswith("ok")


def test_bad_input_is_one_line_docker_exit_code_and_leaves_the_store_untouched(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    lamina_cmd("tag", "lamina/busybox", "keep:1")
    before = store_snapshot(root)
    link = tarfile.TarInfo("evil")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc"
    hostile = rootfs_tar(tmp_path / "evil.tar", {}, [link])
    with tarfile.open(hostile, "a") as t:
        info = tarfile.TarInfo("evil/cron.d/x")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    not_archive = tmp_path / "junk.tar"
    not_archive.write_bytes(b"junk" * 100)
    cases = [
        ("import", str(hostile), "evil:1"),
        ("load", "-i", str(not_archive)),
        ("load", "-i", str(tmp_path / "missing.tar")),
        ("tag", "keep:1", "Not/Valid"),
        ("save", "-o", str(tmp_path / "x.tar"), "--format", "zip", "keep:1"),
        ("rmi", "no-such-image"),
        ("images", "--bogus"),
    ]
    bad_flags = {cases[-3], cases[-1]}  # found by the flag parser: 125 for every docker command
    for args in cases:
        result = lamina_cmd(*args, check=False)
        expected = 125 if args in bad_flags else docker_error_code(args)
        assert result.returncode == expected, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lamina: error:"), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert "symlink" in lamina_cmd(*cases[0], check=False).stderr
    assert store_snapshot(root) == before
    assert not (tmp_path / "x.tar").exists()
    assert not os.path.exists("/etc/cron.d/x")


def test_system_df_prune_check(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    tar = rootfs_tar(tmp_path / "r.tar", {"a": b"1"})
    lamina_cmd("import", str(tar))  # untagged: dangling
    lamina_cmd("tag", "lamina/busybox", "kept")
    df = lamina_cmd("system", "df").stdout
    assert df.splitlines()[0].split()[:3] == ["TYPE", "TOTAL", "ACTIVE"] and "Images" in df
    pruned = lamina_cmd("system", "prune").stdout
    assert "Deleted 1 images" in pruned
    assert len(lamina_cmd("images", "-q").stdout.split()) == 1
    assert lamina_cmd("system", "check").stdout.strip().endswith(": ok")
    (root / "blobs/sha256" / ("0" * 64)).write_bytes(b"corrupt")
    check = lamina_cmd("system", "check", check=False)
    assert check.returncode == 1 and "does not match its digest" in check.stdout


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_hostile_or_lying_archives_are_refused(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    lamina_cmd("images")
    before = store_snapshot(root)
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    bad_layer = layer.getvalue()
    import hashlib
    diff_id = "sha256:" + hashlib.sha256(bad_layer).hexdigest()
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    cases = {
        "escaping-layer": _archive(tmp_path / "a.tar", {
            "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l.tar"]}]).encode(),
            "c.json": config, "l.tar": bad_layer}),
        "path-outside-archive": _archive(tmp_path / "b.tar", {
            "manifest.json": json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()}),
        "wrong-diff-id": _archive(tmp_path / "c.tar", {
            "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l.tar"]}]).encode(),
            "c.json": config.replace(diff_id.encode(), b"sha256:" + b"1" * 64), "l.tar": bad_layer}),
        "oci-lying-blob": _archive(tmp_path / "d.tar", {
            "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
            "index.json": json.dumps({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": "sha256:" + "2" * 64, "size": 2}]}).encode(),
            "blobs/sha256/" + "2" * 64: b"{}"}),
    }
    for case, archive in cases.items():
        result = lamina_cmd("load", "-i", str(archive), check=False)
        assert result.returncode == 1, (case, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, case
        assert "x:1" not in lamina_cmd("images").stdout
    assert not (tmp_path / "escape").exists() and not (root.parent / "escape").exists()
    lamina_cmd("system", "prune")
    assert store_snapshot(root) == before


@pytest.mark.fuse
def test_inspect_finds_containers_and_rmi_respects_them(lamina_cmd: Cli, tmp_path: Path) -> None:
    """With the runner: `inspect` falls through to containers; a container's image cannot be removed."""
    ran = lamina_cmd("run", "--name", "keeper", "lamina/busybox", "true", check=False)
    if ran.returncode != 0:
        pytest.fail(f"lamina run failed: {ran.stderr}")
    image_id = lamina_cmd("inspect", "--format", "{{.Id}}", "lamina/busybox").stdout.strip()
    container = json.loads(lamina_cmd("inspect", "keeper").stdout)[0]
    shown = container.get("Image") or container["image_id"]  # docker's field name, or the record's
    assert "sha256:" + shown.removeprefix("sha256:") == image_id
    refused = lamina_cmd("rmi", "lamina/busybox", check=False)
    assert refused.returncode == 1 and "in use" in refused.stderr
    lamina_cmd("rm", "keeper")
    assert "Deleted: " + image_id in lamina_cmd("rmi", "lamina/busybox").stdout
    assert lamina_cmd("images", "-q").stdout == ""


@pytest.mark.parametrize("seconds, text", [
    (0.5, "Less than a second"), (1, "1 second"), (42, "42 seconds"), (90, "About a minute"),
    (120, "2 minutes"), (3600, "About an hour"), (3 * 3600, "3 hours"), (3 * 86400, "3 days"),
    (20 * 86400, "2 weeks"), (100 * 86400, "3 months"), (800 * 86400, "2 years"),
])
def test_human_duration_like_docker(seconds: float, text: str) -> None:
    from lamina.commands.formatting import human_duration

    assert human_duration(seconds) == text


def test_human_size_like_docker() -> None:
    from lamina.store.progress import human_size

    assert [human_size(n) for n in (0, 999, 1000, 2_140_160, 5.5e9)] == ["0B", "999B", "1kB", "2.14MB", "5.5GB"]


def test_build_cache_pins_layers_until_prune_all(lamina_cmd: Cli, tmp_path: Path) -> None:
    from builder.cache import BuildCache
    from lamina.layout import Layout
    from lamina.store import Store

    layout = Layout(tmp_path / "lamina-root")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "cached").write_text("step output")
    layer = Store.open(layout).commit_layer(upper)
    # A step entry as the builder writes it (builder/build.py).
    BuildCache(layout.build_cache).put("ab" * 32, {
        "history": {"created_by": "RUN make"},
        "layer": {"diff_id": layer.diff_id, "digest": layer.digest, "size": layer.size,
                  "media_type": layer.media_type}})
    entry = layout.build_cache / "steps" / "ab" / ("ab" * 32 + ".json")
    assert entry.is_file()
    lamina_cmd("system", "prune")
    assert layer.path.exists(), "a build cache entry keeps its layer"
    lamina_cmd("system", "prune", "-a")
    assert not layer.path.exists() and not entry.exists()
    assert lamina_cmd("system", "check").returncode == 0


def test_files_in_a_run_cache_mount_pin_nothing(lamina_cmd: Cli, tmp_path: Path) -> None:
    """A RUN --mount=type=cache directory holds whatever the build's commands wrote: a JSON file there
    naming a digest must not keep that layer from prune (only the cache's step entries count)."""
    from builder.cache import BuildCache
    from lamina.layout import Layout
    from lamina.store import Store

    layout = Layout(tmp_path / "lamina-root")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "loose").write_text("no image, no step entry")
    layer = Store.open(layout).commit_layer(upper)
    planted = BuildCache(layout.build_cache).mount_dir("npm") / "package-lock.json"
    planted.parent.mkdir(parents=True)
    planted.write_text(json.dumps({"integrity": layer.diff_id, "resolved": layer.digest}))
    lamina_cmd("system", "prune")
    assert not layer.path.exists(), "a file in a cache mount kept a layer alive"
    assert planted.exists(), "cache mounts survive prune"


def test_concurrent_imports_tags_and_prune_leave_a_consistent_store(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    lamina_cmd("images")
    tars = [rootfs_tar(tmp_path / f"r{i}.tar", {f"file{i}": os.urandom(300_000), "shared": b"s"})
            for i in range(4)]
    base = [sys.executable, "-m", "lamina", "--root", str(root)]
    procs = [subprocess.Popen([*base, "import", str(t), f"conc:{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, t in enumerate(tars)]
    procs.append(subprocess.Popen([*base, "system", "prune"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    procs.append(subprocess.Popen([*base, "tag", "lamina/busybox", "conc:base"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    listing = lamina_cmd("images", "conc").stdout
    rows = {tuple(line.split()[:2]) for line in listing.splitlines()[1:]}
    assert rows == {("conc", tag) for tag in ("0", "1", "2", "3", "base")}
    assert lamina_cmd("system", "check").stdout.strip().endswith(": ok")


def test_oci_archive_with_a_multi_platform_index_loads_the_host_platform(lamina_cmd: Cli, tmp_path: Path) -> None:
    import hashlib

    from lamina.store.store import host_arch

    tar = rootfs_tar(tmp_path / "r.tar", {"native": b"yes"})
    image_id = lamina_cmd("import", str(tar), "multi:1").stdout.strip()
    saved = tmp_path / "saved.tar"
    lamina_cmd("save", "--format", "oci-archive", "-o", str(saved), "multi:1")
    with tarfile.open(saved) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
    desc = json.loads(members["index.json"])["manifests"][0]
    desc.pop("annotations")
    other = dict(desc, digest="sha256:" + "9" * 64, platform={"os": "linux", "architecture": "s390x-none"})
    native = dict(desc, platform={"os": "linux", "architecture": host_arch()})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [other, native]}).encode()
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    members["blobs/sha256/" + index_digest[7:]] = index
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": len(index),
        "annotations": {"org.opencontainers.image.ref.name": "localhost/multi:2"}}]}).encode()
    archive = _archive(tmp_path / "multi.tar", members)
    out = lamina_cmd("load", "-q", "-i", str(archive), root=tmp_path / "other").stdout
    assert out == "Loaded image: localhost/multi:2\n"  # -q: only the names, as docker's
    got = lamina_cmd("inspect", "--format", "{{.Id}}", "localhost/multi:2", root=tmp_path / "other").stdout
    assert got.strip() == image_id
