"""The OCI distribution client (lamina/store/registry.py) against Debian's real registry and a lying fake one."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import (
    FakeRegistry,
    RunningRegistry,
    ForwardProxy,
    TokenServer,
    bcrypt_hash,
    digest_of,
    layer_blob,
    oci_image,
    run_registry,
)

from lamina.errors import RegistryError
from lamina.store.registry import RegistryClient
from lamina.store.registry_manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Platform, host_platform

pytestmark = pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    with run_registry(tmp_path / "registry") as running:
        yield running


def make_image(files: dict[str, bytes], arch: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(layer blob, config blob, OCI manifest bytes) of a one-layer image."""
    layer = layer_blob(files)
    config, manifest = oci_image([layer], arch)
    return layer, config, manifest


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_push_and_pull_protocol_roundtrip(registry: RunningRegistry, tmp_path: Path) -> None:
    big = bytes(range(256)) * 20000
    layer, config, manifest = make_image({"etc/hello": b"hello\n", "big": big})
    client = RegistryClient(registry.address, tls_verify=False)
    assert not client.has_blob("lamina/test", digest_of(layer))
    client.upload_blob("lamina/test", digest_of(layer), write(tmp_path / "layer", layer),
                       chunk_size=4096, monolithic_limit=0)
    reported: list[int] = []
    client.upload_blob("lamina/test", digest_of(config), write(tmp_path / "config", config),
                       progress=reported.append)
    assert sum(reported) == len(config)
    assert client.has_blob("lamina/test", digest_of(layer))
    patches = [p for m, p, s in registry.access_log() if m == "PATCH"]
    assert len(patches) == -(-len(layer) // 4096), "the layer went up in 4 KiB chunks"
    assert client.put_manifest("lamina/test", "v1", manifest, OCI_MANIFEST) == digest_of(manifest)

    got = client.get_manifest("lamina/test", "v1")
    assert got.data == manifest and got.digest == digest_of(manifest) and got.media_type == OCI_MANIFEST
    by_digest = client.get_manifest("lamina/test", digest_of(manifest))
    assert by_digest.data == manifest
    fetched = client.fetch_blob("lamina/test", digest_of(layer), tmp_path, size=len(layer))
    assert fetched.read_bytes() == layer
    assert client.fetch_small_blob("lamina/test", digest_of(config), tmp_path) == config
    client.close()

    if shutil.which("skopeo"):
        out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                              f"docker://{registry.address}/lamina/test:v1"],
                             check=True, capture_output=True, timeout=60)
        assert out.stdout == manifest


def test_cross_repository_mount(registry: RunningRegistry, tmp_path: Path) -> None:
    layer, _, _ = make_image({"a": b"a"})
    path = write(tmp_path / "layer", layer)
    with RegistryClient(registry.address, tls_verify=False) as client:
        client.upload_blob("one/repo", digest_of(layer), path)
        client.upload_blob("two/repo", digest_of(layer), path, mount_from="one/repo")
        assert client.has_blob("two/repo", digest_of(layer))
    puts = [p for m, p, s in registry.access_log() if m == "PUT" and p.startswith("/v2/two/")]
    assert puts == [], "the second upload was a mount, not a copy"


def test_missing_manifest_and_blob_are_clear_errors(registry: RunningRegistry, tmp_path: Path) -> None:
    with RegistryClient(registry.address, tls_verify=False) as client:
        with pytest.raises(RegistryError, match="manifest unknown"):
            client.get_manifest("no/such", "latest")
        with pytest.raises(RegistryError, match="unknown"):
            client.fetch_blob("no/such", digest_of(b"x"), tmp_path)
        with pytest.raises(RegistryError, match="invalid repository"):
            client.get_manifest("../etc", "latest")
        with pytest.raises(RegistryError, match="invalid or unsupported"):
            client.fetch_blob("no/such", "sha256:../../etc/passwd", tmp_path)
    assert list(tmp_path.glob("*.pull")) == []


def test_tls_verify_true_refuses_plain_http(registry: RunningRegistry) -> None:
    with RegistryClient(registry.address, tls_verify=True, timeout=5) as client:
        with pytest.raises(RegistryError, match="cannot reach registry"):
            client.get_manifest("x/y", "latest")


def test_index_picks_host_platform(registry: RunningRegistry, tmp_path: Path) -> None:
    host = host_platform()
    other = "s390x" if host.architecture != "s390x" else "amd64"
    entries = []
    with RegistryClient(registry.address, tls_verify=False) as client:
        for arch in (other, host.architecture):
            layer, config, manifest = make_image({"arch": arch.encode()}, arch=arch)
            client.upload_blob("multi/img", digest_of(layer), write(tmp_path / "l", layer))
            client.upload_blob("multi/img", digest_of(config), write(tmp_path / "c", config))
            digest = client.put_manifest("multi/img", digest_of(manifest), manifest, OCI_MANIFEST)
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                            "platform": {"os": "linux", "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        client.put_manifest("multi/img", "latest", index, OCI_INDEX)
        manifest, got_index = client.get_image_manifest("multi/img", "latest")
        assert got_index is not None and got_index.data == index
        assert manifest.digest == entries[1]["digest"]
        with pytest.raises(RegistryError, match="no manifest for linux/riscv64.*offers: linux/"):
            client.get_image_manifest("multi/img", "latest", Platform("linux", "riscv64"))


def test_basic_auth_registry(tmp_path: Path) -> None:
    if bcrypt_hash("secret") is None:
        pytest.skip("neither htpasswd nor crypt's blowfish is available to write an htpasswd file")
    layer, _, _ = make_image({"a": b"auth"})
    with run_registry(tmp_path / "registry", htpasswd={"alice": "secret"}) as registry:
        with RegistryClient(registry.address, tls_verify=False) as anonymous:
            with pytest.raises(RegistryError, match="authentication required"):
                anonymous.has_blob("auth/img", digest_of(layer))
        with RegistryClient(registry.address, tls_verify=False, credentials=("alice", "wrong")) as wrong:
            with pytest.raises(RegistryError, match="credentials refused"):
                wrong.ping()
        with RegistryClient(registry.address, tls_verify=False, credentials=("alice", "secret")) as client:
            client.ping()
            client.upload_blob("auth/img", digest_of(layer), write(tmp_path / "l", layer))
            assert client.has_blob("auth/img", digest_of(layer))


# --- a lying registry and a token server --------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    registry = FakeRegistry()
    with registry.serve():
        yield registry


def test_lying_blob_is_refused_and_leaves_nothing(fake: FakeRegistry, tmp_path: Path) -> None:
    digest = fake.add_blob(b"the real content")
    fake.blob_override[digest] = b"something else!!"
    with RegistryClient(fake.address, tls_verify=False) as client:
        with pytest.raises(RegistryError, match=f"sent blob {digest} whose content has digest"):
            client.fetch_blob("x/y", digest, tmp_path)
        fake.blob_override[digest] = b"the real content plus a tail"
        with pytest.raises(RegistryError, match="more than 16 bytes"):
            client.fetch_blob("x/y", digest, tmp_path, size=16)
    assert list(tmp_path.iterdir()) == []


def test_lying_manifest_is_refused(fake: FakeRegistry) -> None:
    _, _, manifest = make_image({"a": b"a"})
    digest = fake.add_manifest("x/y", "v1", OCI_MANIFEST, manifest)
    # Served under a digest that is not the hash of its bytes.
    wrong = digest_of(b"another manifest")
    fake.manifests[("x/y", wrong)] = (OCI_MANIFEST, manifest)
    fake.manifest_digest_header[("x/y", "v1")] = wrong
    with RegistryClient(fake.address, tls_verify=False) as client:
        with pytest.raises(RegistryError, match="whose content has digest"):
            client.get_manifest("x/y", wrong)
        with pytest.raises(RegistryError, match="announced manifest digest"):
            client.get_manifest("x/y", "v1")
        assert client.get_manifest("x/y", digest).data == manifest


def test_bearer_token_flow(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.bearer = True
    fake.token_user, fake.token_password = "bob", "hunter2"
    _, _, manifest = make_image({"a": b"a"})
    fake.add_manifest("team/app", "latest", DOCKER_MANIFEST, manifest)
    blob = fake.add_blob(b"blob bytes")
    with RegistryClient(fake.address, tls_verify=False, credentials=("bob", "hunter2")) as client:
        assert client.get_manifest("team/app", "latest").data == manifest
        assert client.fetch_small_blob("team/app", blob, tmp_path) == b"blob bytes"
    scopes = [q.get("scope") for q in fake.token_requests]
    assert "repository:team/app:pull" in scopes
    assert all(q.get("service") == "fake-registry" for q in fake.token_requests)
    # The token went to the registry, the password only to the token server.
    registry_auth = [auth for _, path, auth in fake.requests if path.startswith("/v2/team/")]
    assert registry_auth and all(a is not None and a.startswith("Bearer ") for a in registry_auth)

    with RegistryClient(fake.address, tls_verify=False, credentials=("bob", "wrong")) as client:
        with pytest.raises(RegistryError, match="refused the credentials"):
            client.get_manifest("team/app", "latest")
    with RegistryClient(fake.address, tls_verify=False) as client:
        with pytest.raises(RegistryError, match="authentication required"):
            client.get_manifest("team/app", "latest")


def test_redirect_is_followed_without_leaking_the_token(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.bearer = True
    fake.redirect_blobs = True
    blob = fake.add_blob(b"served by a blob store elsewhere")
    with RegistryClient(fake.address, tls_verify=False) as client:
        assert client.fetch_small_blob("x/y", blob, tmp_path) == b"served by a blob store elsewhere"
    redirected = [auth for _, path, auth in fake.requests if path.startswith("/blobstore/")]
    assert redirected == [None]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to sign tokens")
def test_bearer_tokens_against_the_real_registry(tmp_path: Path) -> None:
    token = TokenServer(tmp_path, users={"erin": "s3cret"}, anonymous_actions=("pull",))
    token.make_keys()
    layer, config, manifest = make_image({"tok": b"tok"})
    with token.serve(), run_registry(tmp_path / "registry", token=token) as registry:
        with RegistryClient(registry.address, tls_verify=False, credentials=("erin", "s3cret")) as client:
            client.upload_blob("tok/one", digest_of(layer), write(tmp_path / "l", layer))
            client.upload_blob("tok/one", digest_of(config), write(tmp_path / "c", config))
            client.put_manifest("tok/one", "v1", manifest, OCI_MANIFEST)
            client.upload_blob("tok/two", digest_of(layer), tmp_path / "l", mount_from="tok/one")
        mounts = [s for m, p, s in registry.access_log() if m == "POST" and "mount=" in p]
        assert mounts == [201]
        assert any(m == "PUT" and s == 201 and p == "/v2/tok/one/manifests/v1" for m, p, s in registry.access_log())
        asked = [[v for k, v in q if k == "scope"] for q in token.requests]
        assert ["repository:tok/one:pull,push"] in asked
        assert ["repository:tok/two:pull,push", "repository:tok/one:pull"] in asked
        assert all(("service", token.service) in q for q in token.requests)
        # Anonymous users may pull but not push.
        with RegistryClient(registry.address, tls_verify=False) as anonymous:
            assert anonymous.get_manifest("tok/one", "v1").data == manifest
            with pytest.raises(RegistryError, match="authentication required"):
                anonymous.upload_blob("tok/three", digest_of(layer), tmp_path / "l")
        with RegistryClient(registry.address, tls_verify=False, credentials=("erin", "nope")) as wrong:
            with pytest.raises(RegistryError, match="refused the credentials"):
                wrong.get_manifest("tok/one", "v1")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for a certificate")
def test_https_registry_certificates_and_proxies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    layer, config, manifest = make_image({"tls": b"tls"})
    with run_registry(tmp_path / "registry", tls=True) as registry:
        assert registry.cert is not None
        with RegistryClient(registry.address, tls_verify=True) as strict:
            with pytest.raises(RegistryError, match="TLS certificate not trusted.*--tls-verify=false"):
                strict.has_blob("tls/app", digest_of(layer))
        with RegistryClient(registry.address, tls_verify=False) as insecure:
            insecure.upload_blob("tls/app", digest_of(layer), write(tmp_path / "l", layer))
            insecure.upload_blob("tls/app", digest_of(config), write(tmp_path / "c", config))
            insecure.put_manifest("tls/app", "1", manifest, OCI_MANIFEST)
        # The registry's CA in a --cert-dir, or in podman's certs.d/HOST:PORT.
        cert_dir = tmp_path / "certs"
        cert_dir.mkdir()
        shutil.copy(registry.cert, cert_dir / "ca.crt")
        with RegistryClient(registry.address, tls_verify=True, cert_dir=cert_dir) as trusting:
            assert trusting.get_manifest("tls/app", "1").data == manifest
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        (tmp_path / "config" / "containers" / "certs.d").mkdir(parents=True)
        shutil.copytree(cert_dir, tmp_path / "config" / "containers" / "certs.d" / registry.address)
        with RegistryClient(registry.address, tls_verify=True) as trusting:
            assert trusting.get_manifest("tls/app", "1").data == manifest
        (cert_dir / "client.cert").write_bytes(registry.cert.read_bytes())
        with RegistryClient(registry.address, tls_verify=True, cert_dir=cert_dir) as broken:
            with pytest.raises(RegistryError, match="client certificate without its key client.key"):
                broken.get_manifest("tls/app", "1")
        monkeypatch.delenv("XDG_CONFIG_HOME")
        monkeypatch.setenv("SSL_CERT_FILE", str(registry.cert))
        with RegistryClient(registry.address, tls_verify=True) as trusting:
            assert trusting.get_manifest("tls/app", "1").data == manifest

        # Through a proxy, by a name only the proxy can resolve; TLS is verified end to end.
        with ForwardProxy().serve() as proxy:
            monkeypatch.setenv("https_proxy", proxy.url)
            with RegistryClient(f"registry.test:{registry.port}", tls_verify=True) as proxied:
                assert proxied.fetch_small_blob("tls/app", digest_of(config), tmp_path) == config
            assert proxy.targets == [f"registry.test:{registry.port}"]
            # Loopback addresses never go through a proxy.
            with RegistryClient(registry.address, tls_verify=True) as direct:
                direct.get_manifest("tls/app", "1")
            assert len(proxy.targets) == 1

    # Plain HTTP through a proxy: absolute-form requests (after the HTTPS attempt fails).
    with run_registry(tmp_path / "plain") as plain, ForwardProxy().serve() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.setenv("https_proxy", proxy.url)
        with RegistryClient(f"registry.test:{plain.port}", tls_verify=False) as proxied:
            proxied.upload_blob("plain/app", digest_of(layer), write(tmp_path / "l", layer))
            assert proxied.has_blob("plain/app", digest_of(layer))
        assert set(proxy.targets) == {f"registry.test:{plain.port}"}
