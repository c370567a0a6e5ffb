"""How docker combines an image's config with ``docker run`` flags (pure functions, unit-tested).

* argv: ``--entrypoint`` replaces the image's ENTRYPOINT *and* drops its CMD; arguments after the
  image replace CMD; the result is ENTRYPOINT + CMD. Shell forms were stored by the builder already
  wrapped in the image's SHELL, so nothing is re-parsed here.
* env: the image's Env, then ``--env-file`` files in order, then ``-e`` flags in order; ``-e K``
  copies K from lamina's own environment (or leaves it out when unset).
* working directory: ``-w`` (absolute) or WORKDIR or ``/``; user: ``-u`` or USER or root.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from lamina.bounded import bounded_lines
from lamina.errors import UsageError


def run_entrypoint_and_cmd(image_config: Mapping[str, Any], command: list[str],
                           entrypoint: str | None) -> tuple[list[str], list[str]]:
    """The container's Entrypoint and Cmd, as docker makes them from the image and ``run``'s flags."""
    if entrypoint is not None:
        return ([entrypoint] if entrypoint else []), command
    return list(image_config.get("Entrypoint") or []), command or list(image_config.get("Cmd") or [])


def container_argv(image_config: Mapping[str, Any], command: list[str], entrypoint: str | None) -> list[str]:
    """The argv docker would run; UsageError when it is empty."""
    ep, cmd = run_entrypoint_and_cmd(image_config, command, entrypoint)
    argv = ep + cmd
    if not argv:
        raise UsageError("no command specified (the image has neither ENTRYPOINT nor CMD)")
    return argv


def parse_env_list(entries: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if key:
            env[key] = value if sep else ""
    return env


def read_env_file(path: str) -> list[str]:
    """``--env-file``: KEY=VALUE or KEY lines; blank lines and ``#`` comments skipped.

    Read line by line with docker's limits (lamina.bounded): ``/dev/zero`` is refused, not slurped.
    """
    what = f"--env-file {path}"
    entries = []
    try:
        with open(path, "rb") as f:
            for number, raw_bytes in enumerate(bounded_lines(f, what), 1):
                raw = raw_bytes.decode("utf-8", "surrogateescape")
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if "\0" in line:
                    raise UsageError(f"{what}:{number}: NUL byte in the line")
                key = line.partition("=")[0]
                if not key or any(c.isspace() for c in key):
                    raise UsageError(f"{what}:{number}: invalid variable name {key!r}")
                entries.append(raw.lstrip())
    except OSError as e:
        raise UsageError(f"{what}: {e.strerror}") from e
    return entries


def container_env(image_config: Mapping[str, Any], env_files: list[str], env_flags: list[str],
                  host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    host = os.environ if host_env is None else host_env
    env = parse_env_list(list(image_config.get("Env") or []))
    for entry in [e for f in env_files for e in read_env_file(f)] + env_flags:
        key, sep, value = entry.partition("=")
        if not key:
            raise UsageError(f"-e {entry!r}: empty variable name")
        if sep:
            env[key] = value
        elif key in host:
            env[key] = host[key]
    return env


def container_workdir(image_config: Mapping[str, Any], flag: str | None) -> str:
    if flag:
        if not flag.startswith("/"):
            raise UsageError(f"-w {flag}: the working directory must be an absolute path")
        return flag
    return str(image_config.get("WorkingDir") or "/")


def container_user(image_config: Mapping[str, Any], flag: str | None) -> str:
    return flag or str(image_config.get("User") or "0")


def stop_signal(image_config: Mapping[str, Any]) -> int:
    return parse_signal(str(image_config.get("StopSignal") or "SIGTERM"))


def parse_signal(text: str) -> int:
    """``SIGTERM``, ``TERM`` or ``15`` -> 15; UsageError otherwise."""
    text = text.strip().upper()
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is not None:
            return int(sig)
    raise UsageError(f"invalid signal: {text}")


def image_volumes(image_config: Mapping[str, Any]) -> list[str]:
    return sorted((image_config.get("Volumes") or {}).keys())


def parse_volume_flag(text: str) -> tuple[str | None, str, bool]:
    """``-v HOST:CTR[:ro|rw]`` or ``-v CTR`` -> (host path or None for anonymous, container path, ro)."""
    parts = text.split(":")
    readonly = False
    if len(parts) == 3:
        if parts[2] not in ("ro", "rw", "z", "Z"):
            raise UsageError(f"-v {text}: unknown mode {parts[2]!r} (use ro or rw)")
        readonly = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) == 1:
        host, target = None, parts[0]
    elif len(parts) == 2:
        host, target = parts
    else:
        raise UsageError(f"-v {text}: expected HOST:CONTAINER[:ro]")
    if not target.startswith("/"):
        raise UsageError(f"-v {text}: the container path must be absolute")
    if host is not None:
        if not host.startswith("/"):
            raise UsageError(f"-v {text}: named volumes are not supported; give an absolute host path")
        if not os.path.exists(host):
            # As docker: a missing host directory is created.
            try:
                os.makedirs(host)
            except OSError as e:
                raise UsageError(f"-v {text}: cannot create host path {host}: {e.strerror}") from e
    return host, target, readonly
