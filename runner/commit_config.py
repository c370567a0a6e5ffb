"""The image config ``commit`` records: the container's config as it was run, then ``--change``.

As docker's daemon does: the new image starts from its base image's config, takes the
container's own settings (its command and entrypoint as run, its environment with ``-e``, its
working directory and user when they were set, the anonymous volumes and published ports it was
given), then applies each ``--change`` instruction of docker's allowed set. The history gets an
entry with the container's command and the ``--message``; ``--author`` sets the config's author.
"""

from __future__ import annotations

import copy
from typing import Any

from lamina.errors import DockerfileError, UsageError
from lamina.store.importer import apply_change
from runner.state import Container

# docker's validCommitCommands, and STOPSIGNAL, which podman accepts too (docker refuses it).
COMMIT_CHANGES = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "HEALTHCHECK", "LABEL", "ONBUILD", "STOPSIGNAL", "USER",
                  "VOLUME", "WORKDIR")


class ChangeError(UsageError):
    exit_code = 1  # docker's client, for what its daemon refuses


def entrypoint_and_cmd(container: Container, image_cfg: dict[str, Any]) -> tuple[list[str] | None, list[str]]:
    """The container's Entrypoint and Cmd as run; for a record made before they were kept, the
    image's entrypoint when the command starts with it."""
    if container.cmd is not None or container.entrypoint is not None:
        return container.entrypoint or None, list(container.cmd or [])
    entrypoint = list(image_cfg.get("Entrypoint") or [])
    if entrypoint and container.argv[:len(entrypoint)] == entrypoint:
        return entrypoint, container.argv[len(entrypoint):]
    return None, list(container.argv)


def _apply(cfg: dict[str, Any], change: str) -> None:
    instruction, _, argument = change.strip().partition(" ")
    if instruction.upper() not in COMMIT_CHANGES:
        raise ChangeError(f"--change {change!r}: {instruction} is not a valid change command "
                          f"(valid: {', '.join(COMMIT_CHANGES)})")
    if instruction.upper() == "HEALTHCHECK":
        cfg["Healthcheck"] = healthcheck_config(change)
        return
    if instruction.upper() == "ONBUILD":
        if not argument.strip():
            raise ChangeError("--change ONBUILD: missing instruction")
        cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), argument.strip()]
        return
    try:
        apply_change(cfg, change)
    except UsageError as e:
        raise ChangeError(str(e)) from None


def healthcheck_config(change: str) -> dict[str, Any]:
    """``HEALTHCHECK [--interval=...] CMD ...|NONE`` as the image's Config.Healthcheck: the
    Dockerfile's instruction, by the builder's own grammar (docker's commit dispatches --change as
    its builder does)."""
    from builder.dockerfile import parse_trigger  # the Dockerfile grammar is the builder's
    from builder.instructions import Healthcheck

    try:
        instruction = parse_trigger(change.strip(), "--change", 1)
    except DockerfileError as e:
        raise ChangeError(str(e).removeprefix("--change:1: ")) from None
    assert isinstance(instruction, Healthcheck)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in instruction.check.items()}


def committed_config(base_config: dict[str, Any], container: Container, changes: list[str], author: str | None,
                     message: str, created: str) -> dict[str, Any]:
    """The full image config (OCI) for committing ``container`` over its image's ``base_config``."""
    config = copy.deepcopy(base_config)
    config.pop("created", None)
    cfg: dict[str, Any] = dict(config.get("config") or {})
    entrypoint, cmd = entrypoint_and_cmd(container, cfg)
    cfg["Entrypoint"], cfg["Cmd"] = entrypoint, cmd or None
    cfg["Env"] = [f"{key}={value}" for key, value in container.env.items()]
    if container.workdir != (cfg.get("WorkingDir") or "/"):
        cfg["WorkingDir"] = container.workdir
    if container.user != (cfg.get("User") or "0"):
        cfg["User"] = container.user
    volumes = dict(cfg.get("Volumes") or {})
    volumes.update({m["target"]: {} for m in container.mounts if m.get("kind") == "volume"})
    if volumes:
        cfg["Volumes"] = volumes
    ports = dict(cfg.get("ExposedPorts") or {})
    ports.update({f"{p['container_port']}/{p['proto']}": {} for p in container.ports})
    if ports:
        cfg["ExposedPorts"] = ports
    for change in changes:
        _apply(cfg, change)
    config["config"] = {key: value for key, value in cfg.items() if value is not None}
    if author:
        config["author"] = author
    entry: dict[str, Any] = {"created": created, "created_by": " ".join(cmd)}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    config["history"] = [*(config.get("history") or []), entry]
    return config
