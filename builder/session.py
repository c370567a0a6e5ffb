"""What the caller lends a build and only its RUN steps see: secrets and SSH agent sockets.

BuildKit's ``--secret`` and ``--ssh`` (``docker buildx build``), with its rules:

- ``--secret id=ID[,src=FILE|,env=VAR][,type=file|env]``: with neither ``src`` nor ``env``, the
  environment variable named ID when it is set, else the file named ID. At most 500 KiB (BuildKit's
  ``MaxSecretSize``). ``RUN --mount=type=secret,id=ID`` mounts it read-only at ``/run/secrets/ID``
  (or ``target=``), mode 0400 owned by 0:0 unless ``mode``/``uid``/``gid`` say otherwise; ``env=``
  puts it in the command's environment instead (or as well, with ``target=``). A secret the build
  was not given is skipped, or an error with ``required=true``.
- ``--ssh ID[=SOCKET]`` (``default`` is ``$SSH_AUTH_SOCK``): ``RUN --mount=type=ssh[,id=ID]``
  bind-mounts that agent socket at ``/run/buildkit/ssh_agent.N`` (or ``target=``), and the first
  such mount is ``SSH_AUTH_SOCK`` in the command's environment.

A secret's content is never part of a layer, a history entry or a cache key: the file lives in the
step's private temporary directory (mode 0700) for the time of the step and is removed with it.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lamina.bounded import InputTooLarge, read_file_at_most
from lamina.errors import BuildError, LaminaError, UsageError

if TYPE_CHECKING:
    from builder.values import RunMount
    from runner.sandbox import Mount

T = TypeVar("T")
# BuildKit's session/secrets/secretsprovider MaxSecretSize.
MAX_SECRET_BYTES = 500 << 10


@dataclass
class Session:
    """The secrets (ID -> content) and agent sockets (ID -> path) given to ``lamina build``."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    agents: dict[str, Path] = field(default_factory=dict)


def parse_secret(text: str, environ: dict[str, str]) -> tuple[str, bytes]:
    """One ``--secret`` value (buildx's CSV syntax) -> (ID, content), read with BuildKit's limit."""
    flag = f"--secret {text}"
    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise UsageError(f"{flag}: expected id=ID[,src=FILE|env=VAR]") from None
    kind = secret_id = source = env = ""
    for item in fields:
        key, has_value, value = item.partition("=")
        if not has_value:
            raise UsageError(f"{flag}: invalid field {item!r}: must be a key=value pair")
        key = key.lower()
        if key == "type":
            if value not in ("file", "env"):
                raise UsageError(f"{flag}: unsupported secret type {value!r}")
            kind = value
        elif key == "id":
            secret_id = value
        elif key in ("src", "source"):
            source = value
        elif key == "env":
            env = value
        else:
            raise UsageError(f"{flag}: unexpected key {key!r}")
    if kind == "env" and not env:
        env, source = source, ""
    if not secret_id:
        raise UsageError(f"{flag}: secret missing ID")
    if not source and not env:
        if secret_id in environ:
            env = secret_id
        else:
            source = secret_id
    if env:
        if env not in environ:
            raise UsageError(f"{flag}: environment variable {env} is not set")
        content = environ[env].encode("utf-8", "surrogateescape")
        if len(content) > MAX_SECRET_BYTES:
            raise UsageError(f"{flag}: secret {secret_id} too big, max size 500KB")
        return secret_id, content
    try:
        return secret_id, read_file_at_most(source, MAX_SECRET_BYTES, f"secret {secret_id}")
    except InputTooLarge:
        raise UsageError(f"{flag}: secret {secret_id} too big, max size 500KB") from None
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {source}: {e.strerror}") from None


def parse_ssh(text: str, environ: dict[str, str]) -> tuple[str, Path]:
    """One ``--ssh ID[=SOCKET]`` -> (ID, socket path). Only agent sockets: key files are refused."""
    agent_id, has_path, path = text.partition("=")
    if not agent_id:
        raise UsageError(f"--ssh {text}: expected ID[=SOCKET]")
    if not has_path:
        path = environ.get("SSH_AUTH_SOCK", "")
        if not path:
            raise UsageError(f"--ssh {text}: invalid empty ssh agent socket: make sure SSH_AUTH_SOCK is set")
    if "," in path:
        raise UsageError(f"--ssh {text}: lamina forwards one agent socket per ID, not key files")
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"--ssh {text}: cannot use {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--ssh {text}: {path} is not a socket (lamina forwards agent sockets, "
                         "not key files)")
    return agent_id, Path(os.path.abspath(path))


def secret_mount(mount: RunMount, session: Session, step_dir: Path, env: dict[str, str],
                 mount_cls: type[Mount]) -> Mount | None:
    """``RUN --mount=type=secret``: the file mount (None when only ``env=`` or the secret is
    missing and optional); ``env`` gets the variable when ``env=`` is given."""
    content = _lent(mount, session.secrets, f"secret {mount.id}: not found")
    if content is None:
        return None
    if mount.env:
        env[mount.env] = content.decode("utf-8", "surrogateescape")
    if not mount.target:
        return None
    secrets = step_dir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    path = secrets / str(len(os.listdir(secrets)))
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
        f.write(content)
    _own(path, mount)
    return mount_cls(target=mount.target, source=path, readonly=True)


def ssh_mount(mount: RunMount, first: bool, session: Session, env: dict[str, str],
              mount_cls: type[Mount]) -> Mount | None:
    """``RUN --mount=type=ssh``: the agent's socket bind-mounted at the target (None when the build
    was given no such agent and the mount is optional)."""
    socket = _lent(mount, session.agents,
                   f"no SSH agent {mount.id!r} forwarded from the client (use --ssh {mount.id})")
    if socket is None:
        return None
    if first:
        env["SSH_AUTH_SOCK"] = mount.target
    return mount_cls(target=mount.target, source=socket, readonly=False)


def _lent(mount: RunMount, lent: Mapping[str, T], missing: str) -> T | None:
    """What the caller lent under the mount's ID; None when absent and optional (BuildKit skips
    the mount), an error when ``required``."""
    assert mount.id is not None
    found = lent.get(mount.id)
    if found is None and mount.required:
        raise BuildError(missing)
    return found


def _own(path: Path, mount: RunMount) -> None:
    """The secret file's mode and owner, as the container sees them."""
    os.chmod(path, mount.mode if mount.mode is not None else 0o400)
    uid, gid = mount.uid or 0, mount.gid or 0
    if (uid, gid) == (0, 0) and os.geteuid() != 0:
        return  # the build's own user is root in lamina's user namespace
    from runner.sandbox import call_in_userns

    try:
        call_in_userns(os.chown, str(path), uid, gid)
    except (OSError, LaminaError) as e:
        raise BuildError(f"secret {mount.id}: cannot give it to {uid}:{gid}: {e}") from None
