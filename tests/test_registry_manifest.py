"""Pure checks of what registries send: digests, manifests, indexes, challenges, proxies (no network)."""

from __future__ import annotations

import json

import pytest

from lamina.errors import RegistryError
from lamina.store.registry import parse_www_authenticate, proxy_for
from lamina.store.registry_manifest import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    check_digest,
    host_platform,
    manifest_media_type,
)

GOOD = "sha256:" + "ab" * 32


def test_check_digest_is_strict() -> None:
    assert check_digest(GOOD) == GOOD
    for bad in ("sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "sha512:" + "ab" * 64, "sha256:../../x",
                GOOD + "\n", None, 42, "sha256:" + "ab" * 32 + "/.."):
        with pytest.raises(RegistryError, match="invalid or unsupported"):
            check_digest(bad)


def test_manifest_media_type() -> None:
    assert manifest_media_type(json.dumps({"mediaType": DOCKER_MANIFEST}).encode(), OCI_MANIFEST) == DOCKER_MANIFEST
    assert manifest_media_type(b'{"schemaVersion": 2, "layers": []}', f"{OCI_MANIFEST}; charset=utf-8") == OCI_MANIFEST
    assert manifest_media_type(b'{"schemaVersion": 2, "manifests": []}', "application/json") == OCI_INDEX
    with pytest.raises(RegistryError, match="not valid JSON"):
        manifest_media_type(b"\xff{", None)
    nested = b"[" * 200000 + b"]" * 200000  # deeper than Python's recursion limit
    with pytest.raises(RegistryError, match="not valid JSON"):
        manifest_media_type(nested, None)
    assert manifest_media_type(nested, OCI_MANIFEST) == OCI_MANIFEST
    with pytest.raises(RegistryError, match="not valid JSON"):
        Manifest(nested, OCI_MANIFEST, GOOD).image()


def test_layers_and_config_are_checked() -> None:
    """A registry's manifest goes through the typed boundary the archives use (store.image_schema);
    what it refuses is a RegistryError naming the manifest."""
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": GOOD, "size": 3}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": GOOD, "size": 10}

    def image(doc: object) -> object:
        return Manifest(json.dumps(doc).encode(), OCI_MANIFEST, GOOD).image()

    parsed = image({"config": config, "layers": [layer]})
    assert [(d.digest, d.size) for d in parsed.layers] == [(GOOD, 3)]  # type: ignore[attr-defined]
    assert parsed.config.size == 10  # type: ignore[attr-defined]
    for bad in ({"config": config, "layers": "x"}, {"config": config, "layers": [dict(layer, size=-1)]},
                {"config": config, "layers": [dict(layer, size="3")]},
                {"config": config, "layers": [dict(layer, digest="sha256:x")]},
                {"config": config}, {"layers": [layer]}, {"config": dict(config, size=True), "layers": []}, []):
        with pytest.raises(RegistryError, match=f"image manifest {GOOD}"):
            image(bad)
    with pytest.raises(RegistryError, match=f"image index {GOOD}: 'manifests'"):
        Manifest(b'{"manifests": {}}', OCI_INDEX, GOOD).index()


def test_host_platform_is_linux() -> None:
    host = host_platform()
    assert host.os == "linux" and host.architecture not in ("x86_64", "aarch64")


def test_parse_www_authenticate() -> None:
    c = parse_www_authenticate('Bearer realm="https://auth.example/token",service="reg",'
                               'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}
    basic = parse_www_authenticate('Basic realm="x"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_www_authenticate("Negotiate abc") is None



def test_proxy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https", "registry.example:5000") is None
    monkeypatch.setenv("https_proxy", "http://user:p%40ss@proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    proxy = proxy_for("https", "registry.example:5000")
    assert proxy is not None and proxy.netloc == "proxy.example:3128"
    assert proxy.headers == {"Proxy-Authorization": "Basic dXNlcjpwQHNz"}
    assert proxy_for("https", "internal.example") is None
    assert proxy_for("https", "127.0.0.1:5000") is None and proxy_for("https", "localhost:5000") is None
    assert proxy_for("http", "registry.example") is None
    monkeypatch.setenv("https_proxy", "socks5://proxy.example:1080")
    with pytest.raises(RegistryError, match="only http:// proxies"):
        proxy_for("https", "registry.example")
