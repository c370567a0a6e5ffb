"""Parsers for the values inside instructions: RUN mounts, ports, durations, signals.

Pure functions of strings, shared by the instruction classes of :mod:`builder.instructions`.
"""

from __future__ import annotations

import posixpath
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import DockerfileError
from lamina.timeparse import parse_go_duration


@dataclass(frozen=True)
class RunMount:
    """One ``--mount`` of a RUN: type bind, cache, tmpfs, secret or ssh (BuildKit's options).

    A secret's ``target`` defaults to ``/run/secrets/ID`` unless only ``env`` is given, and its
    ``id`` to the target's base name; an ssh mount's ``id`` is ``default`` and its target (when
    not given) ``/run/buildkit/ssh_agent.N``, chosen by the builder. ``required`` and ``env`` are
    left out of the repr, which is part of the cache key text of RUN steps made before they
    existed."""

    type: str
    target: str
    source: str | None = None
    from_: str | None = None
    id: str | None = None
    readonly: bool = False
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: str | None = None
    env: str | None = field(default=None, repr=False)
    required: bool = field(default=False, repr=False)


MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
# BuildKit's defaults for the files and sockets it mounts (dockerfile2llb, the Dockerfile reference).
SECRET_DIR = "/run/secrets"
DEFAULT_MODES = {"secret": 0o400, "ssh": 0o600}


def parse_mount(spec: str, error: Callable[[str], DockerfileError]) -> RunMount:
    fields: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, has_value, value = part.partition("=")
        key = key.lower()
        fields[key] = value if has_value else "true"
    mount_type = fields.pop("type", "bind")
    if mount_type not in MOUNT_TYPES:
        raise error(f"unsupported mount type {mount_type!r} (expected bind, cache, tmpfs, secret or ssh)")
    target = fields.pop("target", None) or fields.pop("dst", None) or fields.pop("destination", None)
    if not target and mount_type not in ("secret", "ssh"):
        raise error("--mount requires a target (target=/path)")
    # The mount's fields as they are read; a RunMount is immutable once made.
    mount: dict[str, Any] = {"type": mount_type, "target": target or "", "mode": DEFAULT_MODES.get(mount_type)}
    if mount_type in ("secret", "ssh"):
        mount["uid"], mount["gid"] = 0, 0
    for key, value in fields.items():
        if key in ("source", "src"):
            mount["source"] = value
        elif key == "from":
            mount["from_"] = value
        elif key == "id":
            mount["id"] = value
        elif key in ("ro", "readonly"):
            mount["readonly"] = value.lower() in ("true", "1", "")
        elif key in ("rw", "readwrite"):
            mount["readonly"] = value.lower() not in ("true", "1", "")
        elif key == "sharing":
            if value not in ("shared", "private", "locked"):
                raise error(f"unsupported sharing value {value!r}")
            mount["sharing"] = value
        elif key in ("mode", "uid", "gid"):
            try:
                mount[key] = int(value, 8) if key == "mode" else int(value)
            except ValueError:
                raise error(f"invalid {key} value {value!r} in --mount") from None
        elif key == "size":
            mount["size"] = value
        elif key == "env" and mount_type == "secret":
            mount["env"] = value
        elif key == "required" and mount_type in ("secret", "ssh"):
            if value.lower() not in ("true", "false", "1", "0", ""):
                raise error(f"invalid required value {value!r} in --mount")
            mount["required"] = value.lower() in ("true", "1", "")
        else:
            raise error(f"unexpected key {key!r} in --mount={spec}")
    if mount_type == "secret":
        if not mount.get("id") and not mount["target"]:
            raise error("secret ID missing from --mount (id=NAME or target=/path)")
        mount["id"] = mount.get("id") or posixpath.basename(mount["target"])
        if not mount["target"] and not mount.get("env"):
            mount["target"] = posixpath.join(SECRET_DIR, mount["id"])
    elif mount_type == "ssh":
        mount["id"] = mount.get("id") or "default"
    if mount_type in ("secret", "ssh"):
        mount["readonly"] = True
    if mount_type == "bind" and "rw" not in fields and "readwrite" not in fields:
        # Bind mounts are read-only unless rw is given (docker's default).
        mount["readonly"] = True if "ro" not in fields and "readonly" not in fields else mount.get("readonly", False)
    return RunMount(**mount)


_PORT_RE = re.compile(r"^(\d+)(?:-(\d+))?(?:/(tcp|udp|sctp))?$", re.IGNORECASE)


def parse_ports(spec: str) -> list[str]:
    """``80``, ``80/udp``, ``8000-8002/tcp`` -> ``["80/tcp"]``...; ValueError on anything else."""
    if ":" in spec:
        # EXPOSE ip:host:container is accepted by docker but only the container port matters.
        spec = spec.rsplit(":", 1)[1]
    m = _PORT_RE.match(spec)
    if not m:
        raise ValueError(spec)
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else first
    proto = (m.group(3) or "tcp").lower()
    if not (0 < first <= last <= 65535):
        raise ValueError(spec)
    return [f"{port}/{proto}" for port in range(first, last + 1)]


def signal_ok(value: str) -> bool:
    if value.isdigit():
        return 0 < int(value) < 65
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if re.fullmatch(r"SIGRTM(IN|AX)([+-]\d+)?", name):
        return True
    return hasattr(signal.Signals, name)


def parse_duration(text: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds; ValueError otherwise."""
    return parse_go_duration(text)


def is_url(source: str) -> bool:
    """Whether an ADD source is a remote file (fetched) rather than a path of the context."""
    return source.startswith(("http://", "https://"))
