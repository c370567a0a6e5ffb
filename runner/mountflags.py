"""``run``'s mount flags read as docker reads them (pure functions, unit-tested).

``-v``/``--volume`` ``SRC:DST[:OPTS]`` is a bind mount when SRC is an absolute path and a named
volume otherwise (``-v DST`` alone: an anonymous volume); ``--mount`` takes docker's CSV syntax
(``type=bind|volume|tmpfs,source=,target=,readonly`` and the ``bind-``/``volume-``/``tmpfs-``
options); ``--tmpfs DST[:OPTS]``; ``--volumes-from`` copies another container's binds and volumes.
Every destination may be mounted once: a second one is docker's "Duplicate mount point". The
image's ``VOLUME``s that no flag covers become anonymous volumes.

Nothing here touches the disk but the check that a bind source exists (and ``-v``'s creation of a
missing host directory, as docker does): volumes are made by the caller once every flag has been
read, so a bad flag leaves nothing behind.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import UsageError

VOLUME_MODES = {"ro", "rw", "z", "Z", "nocopy", "copy", "rprivate", "private", "rslave", "slave", "rshared",
                "shared"}
TRUE_FALSE = {"true": True, "1": True, "false": False, "0": False}


@dataclass
class MountPlan:
    """A mount to give the container. ``volume`` is the volume's name for a named volume, None for an
    anonymous one still to be made (kind "volume") or for a bind/tmpfs."""

    target: str
    kind: str  # bind, volume, tmpfs
    source: str | None = None
    readonly: bool = False
    options: str = ""
    volume: str | None = None
    copy: bool = True  # fill a new, empty volume from the image's content at target
    labels: dict[str, str] = field(default_factory=dict)
    volume_options: dict[str, str] = field(default_factory=dict)  # the volume's driver options

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = {"target": self.target, "kind": self.kind, "source": self.source,
                                "readonly": self.readonly}
        if self.options:
            data["options"] = self.options
        if self.kind == "volume":
            data["volume"] = self.volume
            data["copy"] = self.copy
            if self.volume_options:
                data["volume_options"] = dict(self.volume_options)
        return data


def _clean_target(flag: str, text: str, target: str) -> str:
    if not target.startswith("/"):
        raise UsageError(f"{flag} {text}: invalid mount path: '{target}' mount path must be absolute")
    cleaned = posixpath.normpath(target)
    if cleaned == "/":
        raise UsageError(f"{flag} {text}: invalid specification: destination can't be '/'")
    return cleaned


def parse_volume(text: str) -> MountPlan:
    """``-v SRC:DST[:OPTS]`` or ``-v DST``."""
    parts = text.split(":")
    options: list[str] = []
    if len(parts) == 3:
        options = parts[2].split(",")
        parts = parts[:2]
    if len(parts) == 1:
        return MountPlan(_clean_target("-v", text, parts[0]), "volume")
    if len(parts) != 2 or not parts[0]:
        raise UsageError(f"-v {text}: invalid volume specification, expected SRC:DST[:ro]")
    source, target = parts
    for option in options:
        if option not in VOLUME_MODES:
            raise UsageError(f"-v {text}: invalid mode: {option}")
    readonly = "ro" in options
    target = _clean_target("-v", text, target)
    if source == "." or source.startswith(("./", "../")) or source == "..":
        source = os.path.abspath(source)  # docker 23's client: a relative path is a bind of it
    if source.startswith("/"):
        if not os.path.exists(source):
            # As docker: a missing host directory is created.
            try:
                os.makedirs(source)
            except OSError as e:
                raise UsageError(f"-v {text}: cannot create host path {source}: {e.strerror}") from e
        return MountPlan(target, "bind", source=source, readonly=readonly)
    from runner.volumes import VolumeError, check_name

    try:
        check_name(source)
    except VolumeError as e:
        raise UsageError(f"-v {text}: {e}") from None
    return MountPlan(target, "volume", volume=source, readonly=readonly, copy="nocopy" not in options)


def _bool_value(text: str, key: str, value: str | None) -> bool:
    if value is None:
        return True
    answer = TRUE_FALSE.get(value.lower())
    if answer is None:
        raise UsageError(f"--mount {text}: invalid value for {key}: {value}")
    return answer


def parse_mount(text: str) -> MountPlan:
    """``--mount type=...,source=...,target=...[,readonly]`` (docker/cli opts/mount.go)."""
    kind = "volume"  # docker's default type
    source = target = None
    readonly, copy = False, True
    labels: dict[str, str] = {}
    tmpfs: list[str] = []
    families: set[str] = set()
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        value = raw if sep else None
        if key in ("readonly", "ro"):
            readonly = _bool_value(text, key, value)
            continue
        if key == "volume-nocopy":
            copy = not _bool_value(text, key, value)
            families.add("volume")
            continue
        if value is None:
            raise UsageError(f"--mount {text}: invalid field '{item}' must be a key=value pair")
        if key == "type":
            kind = value.lower()
        elif key in ("source", "src"):
            source = value
        elif key in ("target", "destination", "dst"):
            target = value
        elif key == "volume-label":
            name, _, label = value.partition("=")
            labels[name] = label
            families.add("volume")
        elif key == "tmpfs-size":
            tmpfs.append(f"size={_tmpfs_size(text, value)}")
            families.add("tmpfs")
        elif key == "tmpfs-mode":
            try:
                tmpfs.append(f"mode={int(value, 8):o}")
            except ValueError:
                raise UsageError(f"--mount {text}: invalid value for {key}: {value}") from None
            families.add("tmpfs")
        elif key in ("bind-propagation", "consistency", "bind-nonrecursive"):
            families.add("bind" if key.startswith("bind") else "")
        elif key in ("volume-driver", "volume-opt"):
            if key == "volume-driver" and value == "local":
                continue
            raise UsageError(f"--mount {text}: {key} is not supported (only the local volume driver)")
        else:
            raise UsageError(f"--mount {text}: unexpected key '{key}' in '{item}'")
    if kind not in ("bind", "volume", "tmpfs"):
        raise UsageError(f"--mount {text}: invalid mount type {kind!r} (bind, volume or tmpfs)")
    for family in families - {"", kind}:
        raise UsageError(f"--mount {text}: cannot mix '{family}-*' options with mount type '{kind}'")
    if not target:
        raise UsageError(f"--mount {text}: target is required")
    target = _clean_target("--mount", text, target)
    if kind == "tmpfs":
        if source:
            raise UsageError(f"--mount {text}: invalid mount config for type \"tmpfs\": "
                             "field Source must not be specified")
        return MountPlan(target, "tmpfs", readonly=readonly, options=",".join(tmpfs or ["mode=1777"]))
    if kind == "bind":
        if not source:
            raise UsageError(f"--mount {text}: invalid mount config for type \"bind\": field Source must not "
                             "be empty")
        if not source.startswith("/"):
            raise UsageError(f"--mount {text}: invalid mount config for type \"bind\": invalid mount path: "
                             f"'{source}' mount path must be absolute")
        if not os.path.exists(source):
            raise UsageError(f"--mount {text}: invalid mount config for type \"bind\": bind source path does "
                             f"not exist: {source}")
        return MountPlan(target, "bind", source=source, readonly=readonly)
    if source:
        from runner.volumes import VolumeError, check_name

        try:
            check_name(source)
        except VolumeError as e:
            raise UsageError(f"--mount {text}: {e}") from None
    return MountPlan(target, "volume", volume=source or None, readonly=readonly, copy=copy, labels=labels)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(flag: str, text: str) -> int:
    """docker's RAMInBytes: ``64m``, ``1g``, ``1048576``, ``512kb``."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b") if text.strip().lower() != "b" else ""
    number = value.rstrip("kmgt")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        raise UsageError(f"{flag} {text}: invalid size: '{text}'") from None
    if unit not in _SIZE_UNITS or amount < 0:
        raise UsageError(f"{flag} {text}: invalid size: '{text}'")
    return int(amount * _SIZE_UNITS[unit])


def _tmpfs_size(text: str, value: str) -> int:
    return parse_bytes(f"--mount {text}: tmpfs-size", value)


def parse_tmpfs(text: str) -> MountPlan:
    target, _, options = text.partition(":")
    target = _clean_target("--tmpfs", text, target)
    readonly = "ro" in options.split(",")
    options = ",".join(o for o in options.split(",") if o and o not in ("ro", "rw"))
    return MountPlan(target, "tmpfs", readonly=readonly, options=options or "mode=1777")


def volumes_from(text: str, mounts: list[dict[str, Any]]) -> tuple[str, list[MountPlan]]:
    """``--volumes-from CONTAINER[:ro|rw]``: the container's name and its binds and volumes (not its
    tmpfs), read-only when asked or when they were."""
    name, _, mode = text.partition(":")
    if mode not in ("", "ro", "rw"):
        raise UsageError(f"--volumes-from {text}: invalid mode: {mode}")
    plans = []
    for m in mounts:
        if m.get("kind") not in ("bind", "volume"):
            continue
        readonly = mode == "ro" or (mode == "" and bool(m.get("readonly")))
        plans.append(MountPlan(m["target"], m["kind"], source=m.get("source"), readonly=readonly,
                               volume=m.get("volume"), copy=bool(m.get("copy", True))))
    return name, plans


def check_duplicates(plans: list[MountPlan]) -> None:
    seen: set[str] = set()
    for plan in plans:
        if plan.target in seen:
            raise UsageError(f"Duplicate mount point: {plan.target}")
        seen.add(plan.target)


def add_image_volumes(plans: list[MountPlan], image_volumes: list[str]) -> list[MountPlan]:
    """The image's VOLUMEs that no mount covers, as anonymous volumes (docker skips the others)."""
    covered = {plan.target for plan in plans}
    extra = []
    for target in image_volumes:
        cleaned = posixpath.normpath(target) if target.startswith("/") else None
        if cleaned is None or cleaned == "/" or cleaned in covered:
            continue
        covered.add(cleaned)
        extra.append(MountPlan(cleaned, "volume"))
    return plans + extra
