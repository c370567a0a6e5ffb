"""Registry credentials in podman's ``auth.json`` format, so ``lamina login`` and ``podman login`` agree.

The file is ``{"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}``. Where it lives, as in
containers-auth.json(5): ``$REGISTRY_AUTH_FILE`` if set, else ``$XDG_RUNTIME_DIR/containers/auth.json``
when ``XDG_RUNTIME_DIR`` is set, else ``~/.config/containers/auth.json``. Reading also falls back to
``~/.config/containers/auth.json`` and docker's ``~/.docker/config.json``. The file holds secrets: it
is written with mode 0600, atomically.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

from lamina.errors import UsageError

log = logging.getLogger(__name__)

# docker.io's credentials are stored under this key by docker and podman alike.
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


def auth_file_for_writing() -> Path:
    explicit = os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "containers" / "auth.json"
    return _home_auth_file()


def _home_auth_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "containers" / "auth.json"


def auth_files_for_reading() -> list[Path]:
    files = [auth_file_for_writing(), _home_auth_file(), Path(os.path.expanduser("~")) / ".docker" / "config.json"]
    seen: list[Path] = []
    for f in files:
        if f not in seen:
            seen.append(f)
    return seen


def parse_creds(text: str) -> tuple[str, str]:
    """``--creds USER[:PASSWORD]``; an empty user is a usage error."""
    user, sep, password = text.partition(":")
    if not user:
        raise UsageError("--creds: expected USER:PASSWORD")
    return user, password


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{path}: cannot read registry credentials: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def _keys(registry: str) -> tuple[str, ...]:
    return _DOCKER_HUB_KEYS if registry in _DOCKER_HUB_KEYS else (registry,)


def lookup_credentials(registry: str) -> tuple[str, str] | None:
    """Credentials stored for ``registry`` by ``lamina login``, ``podman login`` or ``docker login``."""
    for path in auth_files_for_reading():
        auths = _load(path).get("auths")
        if not isinstance(auths, dict):
            continue
        for key in _keys(registry):
            entry = auths.get(key)
            # An empty "auth" is how docker marks credentials kept by a helper we do not run.
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise UsageError(f"{path}: malformed credentials for {key}") from None
                log.debug("using credentials for %s from %s", registry, path)
                return user, password
    return None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def store_credentials(registry: str, user: str, password: str) -> Path:
    """Record credentials for ``registry``; returns the file written."""
    path = auth_file_for_writing()
    data = _load(path)
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not a JSON object")
    auths[_keys(registry)[0]] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    _write(path, data)
    return path


def remove_credentials(registry: str) -> bool:
    """Forget credentials for ``registry`` in the file ``login`` writes; True if there were any."""
    path = auth_file_for_writing()
    data = _load(path)
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return False
    removed = [key for key in _keys(registry) if auths.pop(key, None) is not None]
    if removed:
        _write(path, data)
    return bool(removed)
