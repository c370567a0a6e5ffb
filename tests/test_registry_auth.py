"""Registry credentials: podman's auth.json format, and `lamina login`/`logout` against a real registry."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
from registry_server import bcrypt_hash, pulled_id, run_registry

from lamina.errors import UsageError
from lamina.store.registry_auth import (
    auth_file_for_writing,
    lookup_credentials,
    parse_creds,
    remove_credentials,
    store_credentials,
)


@pytest.fixture
def auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return tmp_path


def test_store_lookup_remove(auth_env: Path) -> None:
    assert auth_file_for_writing() == auth_env / "run" / "containers" / "auth.json"
    path = store_credentials("127.0.0.1:5000", "alice", "p:ss")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert base64.b64decode(data["auths"]["127.0.0.1:5000"]["auth"]) == b"alice:p:ss"
    assert lookup_credentials("127.0.0.1:5000") == ("alice", "p:ss")
    assert lookup_credentials("other:1") is None
    assert remove_credentials("127.0.0.1:5000")
    assert lookup_credentials("127.0.0.1:5000") is None
    assert not remove_credentials("127.0.0.1:5000")


def test_reads_podman_home_file_and_docker_hub_aliases(auth_env: Path) -> None:
    home_file = auth_env / "home" / ".config" / "containers" / "auth.json"
    home_file.parent.mkdir(parents=True)
    home_file.write_text(json.dumps({"auths": {"index.docker.io": {"auth": base64.b64encode(b"u:p").decode()}}}))
    assert lookup_credentials("docker.io") == ("u", "p")
    docker_file = auth_env / "home" / ".docker" / "config.json"
    docker_file.parent.mkdir(parents=True)
    docker_file.write_text(json.dumps({"auths": {"quay.io": {}, "ghcr.io": {"auth": ""}}, "credsStore": "desktop"}))
    assert lookup_credentials("quay.io") is None and lookup_credentials("ghcr.io") is None


def test_malformed_auth_file_is_one_line_error(auth_env: Path) -> None:
    path = auth_file_for_writing()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="auth.json: cannot read registry credentials"):
        lookup_credentials("x:1")


def test_parse_creds() -> None:
    assert parse_creds("a:b:c") == ("a", "b:c")
    assert parse_creds("a") == ("a", "")
    with pytest.raises(UsageError):
        parse_creds(":pw")


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_login_logout_cli(tmp_path: Path, lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    if bcrypt_hash("pw") is None:
        pytest.skip("neither htpasswd nor crypt's blowfish is available to write an htpasswd file")
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    with run_registry(tmp_path / "registry", htpasswd={"carol": "pw"}) as registry:
        bad = lamina_cmd("login", "--tls-verify=false", "-u", "carol", "--password-stdin", registry.address,
                         input="nope\n", env=env, check=False)
        assert bad.returncode == 1
        assert bad.stderr.startswith("lamina: error: ") and "credentials refused" in bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "auth.json").exists()

        ok = lamina_cmd("login", "--tls-verify=false", "-u", "carol", "--password-stdin", registry.address,
                        input="pw\n", env=env)
        assert "Login Succeeded" in ok.stdout
        auths = json.loads((tmp_path / "auth.json").read_text())["auths"]
        assert base64.b64decode(auths[registry.address]["auth"]) == b"carol:pw"

        # pull and push find the stored credentials without --creds.
        from registry_server import layer_blob, oci_image

        from lamina.store.registry import RegistryClient
        from lamina.store.registry_manifest import OCI_MANIFEST

        layer = layer_blob({"a": b"a"})
        config, manifest = oci_image([layer])
        with RegistryClient(registry.address, tls_verify=False, credentials=("carol", "pw")) as client:
            for blob, name in ((layer, "l"), (config, "c")):
                (tmp_path / name).write_bytes(blob)
                client.upload_blob("carol/app", "sha256:" + hashlib.sha256(blob).hexdigest(), tmp_path / name)
            client.put_manifest("carol/app", "1", manifest, OCI_MANIFEST)
        pulled = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/carol/app:1", env=env)
        assert pulled_id(lamina_cmd, pulled) == hashlib.sha256(config).hexdigest()

        lamina_cmd("logout", registry.address, env=env)
        denied = lamina_cmd("pull", "--tls-verify=false", f"{registry.address}/carol/app:1", env=env, check=False)
        assert denied.returncode == 1 and "authentication required" in denied.stderr
        assert json.loads((tmp_path / "auth.json").read_text())["auths"] == {}
        again = lamina_cmd("logout", registry.address, env=env, check=False)
        assert again.returncode == 1 and "not logged in" in again.stderr
