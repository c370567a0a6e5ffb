"""`lamina pull` and `lamina push` against Debian's registry on 127.0.0.1, skopeo, and a lying registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import run_with_a_terminal
from registry_server import (
    FakeRegistry,
    RunningRegistry,
    bcrypt_hash,
    digest_of,
    layer_blob,
    oci_image,
    pulled_id,
    run_registry,
)

from lamina.store.registry import RegistryClient
from lamina.store.registry_manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, host_platform

pytestmark = pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path / "registry") as running:
        yield running


def upload_image(client: RegistryClient, repository: str, tag: str | None, layers: list[bytes],
                 tmp: Path, arch: str | None = None) -> tuple[str, str]:
    """Upload a ``layers`` image straight through the protocol client; returns (manifest, config) digests."""
    config, manifest = oci_image(layers, arch)
    for blob in [*layers, config]:
        path = tmp / "upload"
        path.write_bytes(blob)
        if not client.has_blob(repository, digest_of(blob)):
            client.upload_blob(repository, digest_of(blob), path)
    digest = client.put_manifest(repository, tag or digest_of(manifest), manifest, OCI_MANIFEST)
    return digest, digest_of(config)


def open_store(root: Path):  # type: ignore[no-untyped-def]
    from lamina.store import Store

    return Store.open(root)


def store_state(root: Path) -> list[str]:
    """Every file and directory under the store (but its lock and temporary directory)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name != "lock" and "tmp" not in p.relative_to(root).parts[:1])


def test_pull_fetches_only_missing_layers(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    a = layer_blob({"etc/a": b"A\n"})
    b = layer_blob({"etc/b": b"B\n"})
    c = layer_blob({"etc/c": b"C\n"})
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config1 = upload_image(client, "app/one", "v1", [a, b], tmp_path)
        manifest2, config2 = upload_image(client, "app/two", "v1", [a, b, c], tmp_path)

    first = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/app/one:v1")
    assert pulled_id(lamina_cmd, first) == config1[7:]
    assert "Copying" not in first.stderr  # not a terminal: no progress
    assert sorted(registry.blob_gets()) == sorted([digest_of(a), digest_of(b), config1])

    before = len(registry.blob_gets())
    second = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/app/two:v1")
    assert pulled_id(lamina_cmd, second) == config2[7:]
    assert sorted(registry.blob_gets()[before:]) == sorted([digest_of(c), config2])

    store = open_store(tmp_path / "lamina-root")
    image = store.resolve_image(f"{registry.address}/app/two:v1")
    assert image.id == config2[7:]
    assert [layer.digest for layer in image.layers] == [digest_of(a), digest_of(b), digest_of(c)]
    assert (image.layers[2].path / "etc" / "c").read_bytes() == b"C\n"

    # Pulling again, by tag or by digest, downloads no blob at all.
    before = len(registry.blob_gets())
    lamina_cmd("pull", "-q", "--tls-verify=false", f"{registry.address}/app/two:v1")
    by_digest = lamina_cmd("pull", "-q", "--tls-verify=false", f"{registry.address}/app/two@{manifest2}")
    assert pulled_id(lamina_cmd, by_digest) == config2[7:]
    assert registry.blob_gets()[before:] == []
    assert lamina_cmd("system", "check").stdout.strip().endswith("ok")


def make_store_images(root: Path, busybox_rootfs: Path, tmp: Path):  # type: ignore[no-untyped-def]
    """Two lamina-made images in a store at ``root``: busybox, and busybox plus one layer."""
    store = open_store(root)
    base_layer = store.commit_layer(busybox_rootfs)
    base = store.create_image([base_layer], {"config": {"Cmd": ["/bin/sh"]}}, tags=["local/base:1"])
    extra = tmp / "extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc" / "motd").write_bytes(b"pushed by lamina\n")
    top_layer = store.commit_layer(extra)
    child = store.create_image([base_layer, top_layer], {"config": {"Cmd": ["/bin/cat", "/etc/motd"]}},
                               tags=["local/child:1"], base=base)
    return store, base, child


def blob_uploads(registry: RunningRegistry, since: int = 0) -> int:
    """Blob uploads completed (the final PUT of each upload session)."""
    return sum(1 for m, p, s in registry.access_log()[since:] if m == "PUT" and "/blobs/uploads/" in p)


def test_push_then_pull_roundtrip_and_skopeo(registry: RunningRegistry, tmp_path: Path, lamina_cmd,  # type: ignore[no-untyped-def]
                                             busybox_rootfs: Path) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed (the outside reader of what lamina pushed)")
    src_root, dst_root = tmp_path / "src", tmp_path / "dst"
    store, base, child = make_store_images(src_root, busybox_rootfs, tmp_path)
    # Local layers are plain tars (their digest is their diff_id), as podman keeps them.
    assert [(layer.media_type, layer.digest) for layer in child.layers] == \
        [("application/vnd.oci.image.layer.v1.tar", layer.diff_id) for layer in child.layers]

    base_dest = f"{registry.address}/lamina/base:1"
    pushed = lamina_cmd("push", "--tls-verify=false", "local/base:1", base_dest, root=src_root)
    assert blob_uploads(registry) == 2  # the layer and the config
    base_sent = registry_manifest(base_dest)
    assert pushed.stdout.strip().splitlines()[-1] == f"1: digest: sha256:{hashlib.sha256(base_sent).hexdigest()} size: {len(base_sent)}"
    # docker's push lines for an uploaded layer (piped: a byte count at most every 5 s).
    sent_layer = json.loads(base_sent)["layers"][0]["digest"][7:19]
    assert list(dict.fromkeys(line.split(": ", 1)[1].split("  ")[0] for line in pushed.stdout.splitlines()
                              if line.startswith(f"{sent_layer}: "))) == ["Preparing", "Pushing", "Pushed"], pushed.stdout

    # The child shares the base layer: only its own layer and config go up; the base layer is
    # mounted from the repository lamina pushed it to, by the digest of the gzip made for the first
    # push (compressed once, not again).
    dest = f"{registry.address}/lamina/child:1"
    before = len(registry.access_log())
    lamina_cmd("push", "--tls-verify=false", "local/child:1", dest, root=src_root)
    assert blob_uploads(registry, before) == 2
    child_sent = json.loads(registry_manifest(dest))
    sent_digests = [desc["digest"] for desc in child_sent["layers"]]
    assert sent_digests[0] == json.loads(base_sent)["layers"][0]["digest"]
    mounts = [(p, s) for m, p, s in registry.access_log()[before:] if m == "POST" and "mount=" in p]
    assert len(mounts) == 1 and mounts[0][1] == 201 and sent_digests[0][7:] in mounts[0][0]
    # Within one repository, a new tag of a known image uploads nothing but the manifest.
    before = len(registry.access_log())
    lamina_cmd("push", "--tls-verify=false", "local/child:1", f"{registry.address}/lamina/child:2", root=src_root)
    assert [m for m, p, s in registry.access_log()[before:] if m in ("POST", "PATCH", "PUT")] == ["PUT"]

    # What went up is a valid image with gzipped layers whose content is the local layers' tars.
    assert child_sent["config"] == child.manifest["config"]
    assert [desc["mediaType"] for desc in child_sent["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 2
    inspected = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dest}"],
                                          check=True, capture_output=True, timeout=60).stdout)
    assert inspected["Layers"] == sent_digests
    oci_dir = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{oci_dir}:x"],
                   check=True, capture_output=True, timeout=120)
    for digest, layer in zip(sent_digests, child.layers, strict=True):
        data = (oci_dir / "blobs" / "sha256" / digest[7:]).read_bytes()
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == digest
        assert f"sha256:{hashlib.sha256(gzip.decompress(data)).hexdigest()}" == layer.diff_id
    assert (oci_dir / "blobs" / "sha256" / child.id).is_file()
    # The gzipped copies live as long as their layers, and the store stays consistent.
    assert lamina_cmd("system", "prune", "-f", root=src_root).returncode == 0
    assert all(store.has_blob(digest) for digest in sent_digests)
    assert lamina_cmd("system", "check", root=src_root).stdout.strip().endswith("ok")

    by_id = lamina_cmd("push", "--tls-verify=false", child.id[:12], root=src_root, check=False)
    assert by_id.returncode == 1 and "is an image ID; give a destination" in by_id.stderr
    archive = lamina_cmd("pull", "oci-archive:/tmp/x.tar", root=src_root, check=False)
    assert archive.returncode == 1 and "lamina save/load" in archive.stderr
    pulled = lamina_cmd("pull", "--tls-verify=false", f"docker://{dest}", root=dst_root)
    assert pulled_id(lamina_cmd, pulled, root=dst_root) == child.id
    copy = open_store(dst_root).resolve_image(dest)
    assert copy.config == child.config
    assert copy.manifest_digest == f"sha256:{hashlib.sha256(registry_manifest(dest)).hexdigest()}"
    assert [layer.digest for layer in copy.layers] == sent_digests
    assert [layer.diff_id for layer in copy.layers] == [layer.diff_id for layer in child.layers]
    assert (copy.layers[-1].path / "etc" / "motd").read_bytes() == b"pushed by lamina\n"
    assert (copy.layers[0].path / "bin" / "busybox").read_bytes() == (busybox_rootfs / "bin" / "busybox").read_bytes()
    # A pulled image goes up again exactly as the registry gave it (its layers are compressed).
    again = lamina_cmd("push", "--tls-verify=false", dest, f"{registry.address}/lamina/again:1", root=dst_root)
    assert again.stdout.strip().splitlines()[-1].split()[2] == copy.manifest_digest


def registry_manifest(reference: str) -> bytes:
    """The manifest bytes the registry holds for ``reference``, as skopeo reads them."""
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{reference}"],
                          check=True, capture_output=True, timeout=60).stdout


def test_pull_index_picks_host_platform(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    host = host_platform().architecture
    other = "s390x" if host != "s390x" else "amd64"
    entries = []
    with RegistryClient(registry.address, tls_verify=False) as client:
        for arch in (other, host):
            digest, config = upload_image(client, "multi/app", None, [layer_blob({"arch": arch.encode()})],
                                          tmp_path, arch=arch)
            size = len(client.get_manifest("multi/app", digest).data)
            entries.append(({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                             "platform": {"os": "linux", "architecture": arch}}, config))
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": [e for e, _ in entries]}).encode()
        client.put_manifest("multi/app", "latest", index, OCI_INDEX)
    out = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/multi/app")
    assert pulled_id(lamina_cmd, out) == entries[1][1][7:]
    image = open_store(tmp_path / "lamina-root").resolve_image(f"{registry.address}/multi/app:latest")
    assert image.config["architecture"] == host
    # Another platform on request (an image lamina could only run under emulation).
    out = lamina_cmd("pull", "--tls-verify=false", "--platform", f"linux/{other}", f"{registry.address}/multi/app")
    assert pulled_id(lamina_cmd, out) == entries[0][1][7:]
    missing = lamina_cmd("pull", "--tls-verify=false", "--platform", "linux/mips64le", f"{registry.address}/multi/app",
                         check=False)
    assert missing.returncode == 1 and f"offers: linux/{other}, linux/{host}" in missing.stderr
    bad = lamina_cmd("pull", "--platform", "linux", f"{registry.address}/multi/app", check=False)
    assert bad.returncode == 125 and "--platform" in bad.stderr  # a bad flag value


def test_lying_registry_is_refused_and_store_untouched(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    good, bad = layer_blob({"good": b"good"}), layer_blob({"bad": b"bad"})
    fake = FakeRegistry()
    fake.add_image("evil/img", "latest", [good, bad])
    # The second layer is served with other bytes of the same length.
    fake.blob_override[digest_of(bad)] = bytes(len(bad))
    root = tmp_path / "lamina-root"
    open_store(root)  # creates the store layout
    before = store_state(root)
    with fake.serve():
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/evil/img", check=False)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lamina: error: ") and "refused" in lines[0]
        assert digest_of(bad) in lines[0]

        # A manifest served under a tag whose announced digest does not match.
        fake.blob_override.clear()
        fake.manifest_digest_header[("evil/img", "latest")] = digest_of(b"something else")
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/evil/img", check=False)
        assert result.returncode == 1 and "refused" in result.stderr
    assert store_state(root) == before
    assert list((root / "tmp").glob("*.pull")) == []
    assert lamina_cmd("images", "-q", root=root).stdout == ""
    assert lamina_cmd("system", "check", root=root).stdout.strip().endswith("ok")


def test_pull_with_basic_auth(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    if bcrypt_hash("pw") is None:
        pytest.skip("neither htpasswd nor crypt's blowfish is available to write an htpasswd file")
    with run_registry(tmp_path / "registry", htpasswd={"dave": "pw"}) as registry:
        with RegistryClient(registry.address, tls_verify=False, credentials=("dave", "pw")) as client:
            _, config = upload_image(client, "private/app", "v1", [layer_blob({"x": b"x"})], tmp_path)
        ref = f"{registry.address}/private/app:v1"
        denied = lamina_cmd("pull", "--tls-verify=false", ref, check=False,
                            env={"REGISTRY_AUTH_FILE": str(tmp_path / "none.json")})
        assert denied.returncode == 1 and "authentication required" in denied.stderr
        wrong = lamina_cmd("pull", "--tls-verify=false", "--creds", "dave:nope", ref, check=False)
        assert wrong.returncode == 1 and "credentials refused" in wrong.stderr
        ok = lamina_cmd("pull", "--tls-verify=false", "--creds", "dave:pw", ref)
        assert pulled_id(lamina_cmd, ok) == config[7:]


def test_pull_errors_are_one_line(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    from registry_server import free_port

    port = free_port()  # nothing listens there
    result = lamina_cmd("pull", "--tls-verify=false", f"127.0.0.1:{port}/x/y", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "cannot reach registry" in result.stderr
    result = lamina_cmd("pull", "Bad/Ref", check=False)
    assert result.returncode == 1 and "invalid reference" in result.stderr


@pytest.mark.unprivileged
def test_pull_as_unprivileged_user(registry: RunningRegistry, tmp_path: Path, unpriv) -> None:  # type: ignore[no-untyped-def]
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config = upload_image(client, "user/app", "1", [layer_blob({"etc/who": b"me\n"})], tmp_path)
    ref = f"{registry.address}/user/app:1"
    pulled = unpriv.lamina("pull", "--tls-verify=false", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().splitlines()[-1] == ref
    diff_id = digest_of(gzip.decompress(layer_blob({"etc/who": b"me\n"})))
    unpacked = unpriv.workdir / "root" / "layers" / diff_id[7:] / "diff" / "etc" / "who"
    assert unpacked.read_bytes() == b"me\n" and unpacked.stat().st_uid == unpriv.uid
    again = unpriv.lamina("pull", "-q", "--tls-verify=false", ref)
    assert again.returncode == 0 and again.stdout == f"{ref}\n"
    pushed = unpriv.lamina("push", "--tls-verify=false", ref, f"{registry.address}/user/copy:1")
    assert pushed.returncode == 0, pushed.stderr
    with RegistryClient(registry.address, tls_verify=False) as client:
        assert client.get_manifest("user/copy", "1").data == client.get_manifest("user/app", "1").data


def test_kill_during_pull_leaves_store_clean(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    big = layer_blob({"big": os.urandom(2 << 20)})
    fake = FakeRegistry(stall_after=1 << 20)
    config, _ = fake.add_image("slow/img", "latest", [big])
    root = tmp_path / "lamina-root"
    open_store(root)
    before = store_state(root)
    with fake.serve():
        ref_text = f"{fake.address}/slow/img"
        process = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "pull", "-q",
                                    "--tls-verify=false", ref_text],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert fake.stalled.wait(30), "the pull never reached the stalled blob"
            deadline = time.monotonic() + 10
            while not any(p.stat().st_size > 0 for p in (root / "tmp").glob("*.pull")):
                assert time.monotonic() < deadline, "no partial download appeared"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        fake.release.set()
        assert store_state(root) == before
        assert list((root / "tmp").glob("*.pull")), "the killed pull left its partial download"
        # `system check` finds the store clean and removes the dead writer's leftovers.
        assert lamina_cmd("system", "check", root=root).stdout.strip().endswith("ok")
        assert list((root / "tmp").glob("*.pull")) == []
        fake.stall_after = None
        out = lamina_cmd("pull", "-q", "--tls-verify=false", ref_text, root=root)
        assert pulled_id(lamina_cmd, out, root=root) == digest_of(config)[7:]
    assert list((root / "tmp").glob("*.pull")) == []


def run_on_terminal(argv: list[str]) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Run ``argv`` with stdout on a pseudo-terminal; returns the result (stderr captured) and what
    the terminal showed."""
    return run_with_a_terminal(argv, "stdout")


def test_per_layer_progress_on_a_terminal(registry: RunningRegistry, tmp_path: Path) -> None:
    """docker's pull/push output: a line per layer, redrawn in place with cursor moves."""
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config = upload_image(client, "tty/app", "1", [layer_blob({"t": b"t"}), layer_blob({"u": b"u"})],
                                 tmp_path)
    layers = [digest_of(layer_blob({"t": b"t"}))[7:19], digest_of(layer_blob({"u": b"u"}))[7:19]]
    lamina = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root")]
    result, shown = run_on_terminal([*lamina, "pull", "--tls-verify=false", f"{registry.address}/tty/app:1"])
    assert result.returncode == 0 and result.stderr == b""
    assert shown.startswith(f"1: Pulling from tty/app\n{layers[0]}: Pulling fs layer\n{layers[1]}: Pulling fs layer\n")
    for layer in layers:  # each layer's line is rewritten where it stands, never added below
        assert shown.count(f"{layer}: Pulling fs layer") == 1
        assert re.search(rf"\x1b\[\dA\r\x1b\[2K{layer}: Pull complete\r\x1b\[\dB", shown), shown
    assert shown.strip().splitlines()[-1] == f"{registry.address}/tty/app:1"

    result, shown = run_on_terminal([*lamina, "push", "--tls-verify=false", f"{registry.address}/tty/app:1",
                                     f"{registry.address}/tty/copy:1"])
    assert result.returncode == 0 and result.stderr == b""
    assert f"The push refers to repository [{registry.address}/tty/copy]" in shown
    assert all(f"{layer}: Preparing\n" in shown for layer in layers)
    # The registry mounts the blobs from the repository they were pulled from (docker's words).
    assert all(re.search(rf"\x1b\[2K{layer}: Mounted from tty/app", shown) for layer in layers), shown
    assert re.sub(r"\x1b\[\d*[A-Za-z]", "", shown).strip().splitlines()[-1].startswith("1: digest: sha256:")
    quiet, shown = run_on_terminal([*lamina, "push", "-q", "--tls-verify=false", f"{registry.address}/tty/app:1",
                                    f"{registry.address}/tty/copy:2"])
    # docker push -q prints the reference it pushed, nothing else.
    assert quiet.returncode == 0 and shown == f"{registry.address}/tty/copy:2\n"


def test_per_layer_progress_in_a_pipe(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    """Piped (a CI log): plain lines, one per state change per layer, no escapes."""
    blobs = [layer_blob({"p": b"p"}), layer_blob({"q": b"q"})]
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config = upload_image(client, "pipe/app", "1", blobs, tmp_path)
    ids = [digest_of(blob)[7:19] for blob in blobs]
    ref = f"{registry.address}/pipe/app:1"
    out = lamina_cmd("pull", "--tls-verify=false", ref).stdout
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "1: Pulling from pipe/app"
    for layer in ids:
        mine = [line.split(": ", 1)[1] for line in lines if line.startswith(f"{layer}: ")]
        # A tiny layer goes by faster than the first byte count is due, or just after it.
        assert [s for s in mine if not s.startswith("Downloading  ")] == \
            ["Pulling fs layer", "Verifying Checksum", "Download complete", "Extracting", "Pull complete"], out
        assert len(mine) <= 6
    manifest = open_store(tmp_path / "lamina-root").resolve_image(ref).manifest_digest
    assert lines[-3:] == [f"Digest: {manifest}", f"Status: Downloaded newer image for {ref}", ref]
    again = lamina_cmd("pull", "--tls-verify=false", ref).stdout.splitlines()
    assert [f"{layer}: Already exists" for layer in ids] == again[1:3]
    assert again[-2] == f"Status: Image is up to date for {ref}"

    copy = f"{registry.address}/pipe/copy:1"
    pushed = lamina_cmd("push", "--tls-verify=false", ref, copy).stdout.splitlines()
    assert pushed[0] == f"The push refers to repository [{registry.address}/pipe/copy]"
    for layer in ids:
        assert [line.split(": ", 1)[1] for line in pushed if line.startswith(f"{layer}: ")] == \
            ["Preparing", "Mounted from pipe/app"], pushed
    again = lamina_cmd("push", "--tls-verify=false", ref, copy).stdout.splitlines()
    assert [line for line in again if "Layer already exists" in line] == [f"{layer}: Layer already exists" for layer in ids]
    assert lamina_cmd("push", "-q", "--tls-verify=false", ref, copy).stdout == f"{copy}\n"
    # A failed pull still says one line on stderr, and no progress.
    failed = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/pipe/none:1", check=False)
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1, failed.stderr


def test_hostile_layer_is_refused(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    hostile = gzip.compress(raw.getvalue(), mtime=0)
    fake = FakeRegistry()
    fake.add_image("evil/tar", "latest", [hostile])
    root = tmp_path / "deep" / "lamina-root"
    with fake.serve():
        result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/evil/tar", root=root, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert ".." in result.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    store = open_store(root)
    assert store.images() == [] and store.check() == []


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_pull_docker_format_written_by_skopeo(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config = upload_image(client, "oci/app", "1", [layer_blob({"etc/x": b"x\n"})], tmp_path)
    # skopeo converts it to Docker's schema 2 (other media types, same config).
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--format", "v2s2",
                    f"docker://{registry.address}/oci/app:1", f"docker://{registry.address}/docker/app:1"],
                   check=True, capture_output=True, timeout=120)
    with RegistryClient(registry.address, tls_verify=False) as client:
        assert client.get_manifest("docker/app", "1").media_type == DOCKER_MANIFEST
    out = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/docker/app:1")
    assert pulled_id(lamina_cmd, out) == config[7:]
    image = open_store(tmp_path / "lamina-root").resolve_image(f"{registry.address}/docker/app:1")
    assert (image.layers[0].path / "etc" / "x").read_bytes() == b"x\n"
    # Pushed back as stored: Docker's media types and the very same manifest digest.
    lamina_cmd("push", "--tls-verify=false", f"{registry.address}/docker/app:1", f"{registry.address}/docker/back:1")
    with RegistryClient(registry.address, tls_verify=False) as client:
        back = client.get_manifest("docker/back", "1")
        assert back.media_type == DOCKER_MANIFEST and back.data == client.get_manifest("docker/app", "1").data


def test_absurd_manifests_are_refused_before_downloading(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    layer = layer_blob({"a": b"a"})
    fake = FakeRegistry()
    config, manifest = fake.add_image("absurd/img", "ok", [layer])
    doc = json.loads(manifest)
    huge = dict(doc, layers=[dict(doc["layers"][0], size=1 << 60)])
    many = dict(doc, layers=doc["layers"] * 501)
    not_a_digest = dict(doc, layers=[dict(doc["layers"][0], digest="sha256:../../../etc/passwd")])
    odd_type = dict(doc, layers=[dict(doc["layers"][0], mediaType=["a", "list"])])
    for tag, body in (("huge", huge), ("many", many), ("path", not_a_digest), ("odd", odd_type)):
        fake.add_manifest("absurd/img", tag, OCI_MANIFEST, json.dumps(body).encode())
    fake.add_manifest("absurd/img", "deep", OCI_MANIFEST, b"[" * 200000 + b"]" * 200000)
    with fake.serve():
        for tag, expected in (("huge", "more than the limit"), ("many", "501 layers"),
                              ("path", "'layers'[0]: 'digest' is 'sha256:../../../etc/passwd', not a sha256 digest"),
                              ("deep", "not valid JSON"), ("odd", "'layers'[0]: 'mediaType' is a list, not a string")):
            result = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/absurd/img:{tag}", check=False)
            assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert not [path for _, path, _ in fake.requests if "/blobs/" in path]
        assert pulled_id(lamina_cmd, lamina_cmd("pull", "-q", "--tls-verify=false", f"{fake.address}/absurd/img:ok")) \
            == digest_of(config)[7:]


@pytest.mark.network
def test_pull_from_docker_hub(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    """The real thing: anonymous Bearer tokens, an image index, redirects to a CDN."""
    out = lamina_cmd("pull", "-q", "busybox", timeout=600)
    image = open_store(tmp_path / "lamina-root").resolve_image("busybox")
    assert out.stdout == "docker.io/library/busybox:latest\n"  # docker's answer, word for word
    assert image.config["architecture"] == host_platform().architecture
    assert (image.layers[-1].path / "bin" / "busybox").exists()


def test_pull_zstd_and_plain_layers(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    import zstandard

    plain = gzip.decompress(layer_blob({"etc/plain": b"plain\n"}))
    zstd = zstandard.ZstdCompressor().compress(gzip.decompress(layer_blob({"etc/zstd": b"zstd\n"})))
    fake = FakeRegistry()
    config, manifest = fake.add_image("mixed/img", "1", [plain, zstd])
    assert [layer["mediaType"].rsplit(".", 1)[1] for layer in json.loads(manifest)["layers"]] == ["tar", "tar+zstd"]
    with fake.serve():
        out = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/mixed/img:1")
    assert pulled_id(lamina_cmd, out) == digest_of(config)[7:]
    image = open_store(tmp_path / "lamina-root").resolve_image(f"{fake.address}/mixed/img:1")
    assert (image.layers[0].path / "etc" / "plain").read_bytes() == b"plain\n"
    assert (image.layers[1].path / "etc" / "zstd").read_bytes() == b"zstd\n"


def test_schema1_and_unknown_media_types_are_refused(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    fake.add_manifest("old/img", "1", "application/vnd.docker.distribution.manifest.v1+prettyjws",
                      json.dumps({"schemaVersion": 1, "name": "old/img", "fsLayers": []}).encode())
    layer = layer_blob({"a": b"a"})
    _, manifest = oci_image([layer])
    doc = json.loads(manifest)
    doc["layers"][0]["mediaType"] = "application/vnd.example.helm.chart.content.v1.tar+gzip"
    fake.add_manifest("helm/chart", "1", OCI_MANIFEST, json.dumps(doc).encode())
    with fake.serve():
        old = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/old/img:1", check=False)
        assert old.returncode == 1 and "schema 1" in old.stderr
        chart = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/helm/chart:1", check=False)
        assert chart.returncode == 1 and "unsupported media type" in chart.stderr


def test_pull_api_for_other_packages(tmp_path: Path) -> None:
    from lamina.store.transfer import pull

    fake = FakeRegistry()
    config, _ = fake.add_image("api/img", "1", [layer_blob({"etc/api": b"api\n"})])
    store = open_store(tmp_path / "root")
    with fake.serve():
        image = pull(store, f"docker://{fake.address}/api/img:1", tls_verify=False)
    assert image.id == digest_of(config)[7:]
    assert store.resolve_image(f"{fake.address}/api/img:1").id == image.id


@pytest.mark.parametrize("failure", ["503", "truncate"])
def test_transient_failures_are_retried(tmp_path: Path, failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lamina.errors import RegistryError
    from lamina.store import transfer

    monkeypatch.setattr(transfer, "RETRY_DELAY", 0.0)
    fake = FakeRegistry(failing_blob_gets=2, failure=failure)
    layer = layer_blob({"etc/flaky": os.urandom(4096)})
    config, _ = fake.add_image("flaky/img", "1", [layer])
    store = open_store(tmp_path / "root")
    with fake.serve():
        image = transfer.pull(store, f"{fake.address}/flaky/img:1", tls_verify=False)
        assert image.id == digest_of(config)[7:]
        blob_gets = [path for method, path, _ in fake.requests if method == "GET" and "/blobs/" in path]
        assert len(blob_gets) == 2 + 2  # the config and the layer, and two failed attempts

        # A registry that keeps failing: the error after the last retry.
        fake.add_image("flaky/two", "1", [layer_blob({"etc/other": b"other"})])
        fake.failing_blob_gets = 10 * (transfer.RETRIES + 1)
        with pytest.raises(RegistryError, match="503 Service Unavailable|connection closed after"):
            transfer.pull(store, f"{fake.address}/flaky/two:1", tls_verify=False)
        # Each attempt is one GET (503), or one GET and MAX_RESUMES ranged GETs (cut short).
        from lamina.store.registry import MAX_RESUMES

        per_attempt = 1 if failure == "503" else 1 + MAX_RESUMES
        assert fake.failing_blob_gets == 10 * (transfer.RETRIES + 1) \
            - per_attempt * (transfer.RETRIES + 1)
    assert list((tmp_path / "root" / "tmp").glob("*.pull")) == []


def test_malformed_configs_are_refused_cleanly(tmp_path: Path) -> None:
    """Each is a RegistryError (one line from the CLI), never another exception."""
    from lamina.errors import RegistryError
    from lamina.store.transfer import pull

    layer = layer_blob({"a": b"a"})
    fake = FakeRegistry()
    _, manifest = fake.add_image("bad/config", "ok", [layer])
    store = open_store(tmp_path / "root")
    configs = [b"not json", b"[]", b'{"rootfs": "x"}', b'{"rootfs": {"diff_ids": []}}',
               b'{"rootfs": {"diff_ids": ["sha256:../x"]}}', b"[" * 100000 + b"]" * 100000]
    for i, config in enumerate(configs):
        doc = json.loads(manifest)
        doc["config"] = dict(doc["config"], digest=fake.add_blob(config), size=len(config))
        fake.add_manifest("bad/config", str(i), OCI_MANIFEST, json.dumps(doc).encode())
    with fake.serve():
        for i in range(len(configs)):
            with pytest.raises(RegistryError, match="config|diff_id"):
                pull(store, f"{fake.address}/bad/config:{i}", tls_verify=False)
    assert store.images() == []


def test_concurrent_pulls_share_the_store(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    layers = [layer_blob({f"etc/{i}": os.urandom(256 << 10)}) for i in range(3)]
    with RegistryClient(registry.address, tls_verify=False) as client:
        _, config = upload_image(client, "race/img", "1", layers, tmp_path)
    root = tmp_path / "lamina-root"
    argv = [sys.executable, "-m", "lamina", "--root", str(root), "pull", "-q", "--tls-verify=false",
            f"{registry.address}/race/img:1"]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err.decode()
        assert out.decode() == f"{registry.address}/race/img:1\n"
    assert lamina_cmd("system", "check", root=root).stdout.strip().endswith("ok")
    image = open_store(root).resolve_image(f"{registry.address}/race/img:1")
    assert image.id == config[7:]
    assert [layer.digest for layer in image.layers] == [digest_of(b) for b in layers]


def test_layers_download_in_parallel(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    from lamina.store.transfer import PARALLEL_TRANSFERS

    fake = FakeRegistry(blob_delay=0.3)
    layers = [layer_blob({f"etc/{i}": os.urandom(64 << 10)}) for i in range(5)]
    config, _ = fake.add_image("many/img", "1", layers)
    with fake.serve():
        out = lamina_cmd("pull", "--tls-verify=false", f"{fake.address}/many/img:1")
    assert pulled_id(lamina_cmd, out) == digest_of(config)[7:]
    assert fake.max_in_flight == PARALLEL_TRANSFERS
    image = open_store(tmp_path / "lamina-root").resolve_image(f"{fake.address}/many/img:1")
    assert [layer.digest for layer in image.layers] == [digest_of(b) for b in layers]


def test_a_failing_parallel_download_stops_the_others(tmp_path: Path) -> None:
    from lamina.errors import RegistryError
    from lamina.store.transfer import pull

    fake = FakeRegistry(blob_delay=0.2)
    layers = [layer_blob({f"etc/{i}": os.urandom(64 << 10)}) for i in range(6)]
    fake.add_image("some/bad", "1", layers)
    fake.blob_override[digest_of(layers[1])] = bytes(len(layers[1]))
    root = tmp_path / "root"
    store = open_store(root)
    before = store_state(root)
    with fake.serve():
        with pytest.raises(RegistryError, match="refused"):
            pull(store, f"{fake.address}/some/bad:1", tls_verify=False)
    assert store_state(root) == before
    assert list((root / "tmp").glob("*.pull")) == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for a certificate")
def test_pull_from_https_registry_with_cert_dir(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    with run_registry(tmp_path / "registry", tls=True) as registry:
        assert registry.cert is not None
        with RegistryClient(registry.address, tls_verify=False) as client:
            _, config = upload_image(client, "tls/app", "1", [layer_blob({"etc/tls": b"tls\n"})], tmp_path)
        ref = f"{registry.address}/tls/app:1"
        # A loopback registry is insecure by default (docker's rule): ask for verification explicitly.
        untrusted = lamina_cmd("pull", "--tls-verify=true", ref, check=False)
        assert untrusted.returncode == 1 and "TLS certificate not trusted" in untrusted.stderr
        cert_dir = tmp_path / "certs"
        cert_dir.mkdir()
        shutil.copy(registry.cert, cert_dir / "ca.crt")
        out = lamina_cmd("pull", "--cert-dir", str(cert_dir), ref)
        assert pulled_id(lamina_cmd, out) == config[7:]
        insecure = lamina_cmd("pull", "-q", "--tls-verify=false", ref)
        assert pulled_id(lamina_cmd, insecure) == config[7:]


def test_mutated_manifests_fail_only_with_lamina_errors(tmp_path: Path) -> None:
    """Random wrong types and values in a manifest, a config and an index: a LaminaError or a
    successful pull, never any other exception (which the CLI would show as a traceback)."""
    import copy
    import random

    from lamina.errors import LaminaError
    from lamina.store.transfer import pull

    rng = random.Random(1234)
    odd_values = [None, True, -1, 0, 1 << 70, 1.5, "", "x", "sha256:" + "0" * 64, [], [1], {}, {"a": 1},
                  "application/vnd.oci.image.layer.v1.tar+gzip", OCI_MANIFEST, OCI_INDEX]
    layer = layer_blob({"etc/m": b"m"})
    fake = FakeRegistry()
    config, manifest = fake.add_image("fuzz/base", "1", [layer])
    base_manifest, base_config = json.loads(manifest), json.loads(config)

    def paths(value: object, prefix: tuple = ()) -> list[tuple]:
        found = [prefix] if prefix else []
        if isinstance(value, dict):
            for key, child in value.items():
                found += paths(child, (*prefix, key))
        elif isinstance(value, list):
            for i, child in enumerate(value):
                found += paths(child, (*prefix, i))
        return found

    def mutate(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        path = rng.choice(paths(doc))
        target = doc
        for key in path[:-1]:
            target = target[key]
        if rng.random() < 0.2 and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = rng.choice(odd_values)
        return doc

    cases = 0
    for i in range(60):
        kind = ("manifest", "config", "index")[i % 3]
        tag = f"m{i}"
        if kind == "manifest":
            fake.add_manifest("fuzz/img", tag, OCI_MANIFEST, json.dumps(mutate(base_manifest)).encode())
        elif kind == "config":
            bad_config = json.dumps(mutate(base_config)).encode()
            doc = copy.deepcopy(base_manifest)
            doc["config"].update(digest=fake.add_blob(bad_config), size=len(bad_config))
            fake.add_manifest("fuzz/img", tag, OCI_MANIFEST, json.dumps(doc).encode())
        else:
            entry_digest = fake.add_manifest("fuzz/img", None, OCI_MANIFEST, manifest)
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": entry_digest, "size": len(manifest),
                 "platform": {"os": "linux", "architecture": host_platform().architecture}}]}
            fake.add_manifest("fuzz/img", tag, OCI_INDEX, json.dumps(mutate(index)).encode())
        cases += 1
    store = open_store(tmp_path / "root")
    outcomes = {"ok": 0, "refused": 0}
    with fake.serve():
        for i in range(cases):
            try:
                pull(store, f"{fake.address}/fuzz/img:m{i}", tls_verify=False)
                outcomes["ok"] += 1
            except LaminaError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > cases // 3, outcomes
    assert store.check() == []


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_cut_downloads_resume_where_they_stopped(tmp_path: Path, ranges: bool) -> None:
    from lamina.store.transfer import pull

    fake = FakeRegistry(failing_blob_gets=0, failure="truncate", ranges=ranges)
    layer = layer_blob({"big": os.urandom(1 << 20)})
    config, _ = fake.add_image("cut/img", "1", [layer])
    store = open_store(tmp_path / "root")
    with fake.serve():
        fake.failing_blob_gets = 0
        # Only the layer's first GET is cut (the config is already known after this line).
        store.ingest_blob(io.BytesIO(config), digest_of(config))
        fake.failing_blob_gets = 1
        image = pull(store, f"{fake.address}/cut/img:1", tls_verify=False)
    assert image.id == digest_of(config)[7:]
    assert fake.range_requests == [f"bytes={len(layer) // 2}-"]
    blob_gets = [path for method, path, _ in fake.requests if method == "GET" and "/blobs/" in path]
    assert len(blob_gets) == 2
    assert list((tmp_path / "root" / "tmp").glob("*.pull")) == []


def test_pull_prints_the_reference_as_docker(registry: RunningRegistry, tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    """docker pull's last line is the full reference it pulled, and with -q its only one (docker/cli's
    e2e TestPullQuiet: stdout "registry:5000/alpine:frozen\\n", stderr empty); a name without a tag
    first says "Using default tag: latest"."""
    with RegistryClient(registry.address, tls_verify=False) as client:
        manifest, config = upload_image(client, "quiet/app", "latest", [layer_blob({"q": b"q"})], tmp_path)
    quiet = lamina_cmd("pull", "--quiet", "--tls-verify=false", f"{registry.address}/quiet/app:latest")
    assert (quiet.stdout, quiet.stderr) == (f"{registry.address}/quiet/app:latest\n", "")
    untagged = lamina_cmd("pull", "--tls-verify=false", f"docker://{registry.address}/quiet/app").stdout.splitlines()
    assert untagged[0] == "Using default tag: latest"
    assert untagged[-2:] == [f"Status: Image is up to date for {registry.address}/quiet/app:latest",
                             f"{registry.address}/quiet/app:latest"]
    by_digest = lamina_cmd("pull", "-q", "--tls-verify=false", f"{registry.address}/quiet/app@{manifest}")
    assert by_digest.stdout == f"{registry.address}/quiet/app@{manifest}\n"
    assert pulled_id(lamina_cmd, by_digest) == config[7:]
