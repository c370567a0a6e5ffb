"""Docker volumes: ``ROOT/volumes/<name>/_data`` with a ``volume.json`` record beside it.

A volume is a directory the runner bind-mounts into containers; it outlives them. Named volumes
(``volume create NAME``, ``-v NAME:/path``, ``--mount type=volume,source=NAME``) are made on first
use, as docker does; anonymous ones (``-v /path``, an image's ``VOLUME``) get a random 64-hex name
and are marked so in their record (``volume prune`` removes only those, unless ``--all``).

As docker's ``local`` driver: a *new* volume mounted on a directory the image has content in is
first filled with that content when it is empty (:mod:`runner.rootfs` does the copy inside the
container's namespaces, where the image's owners are visible; ``volume-nocopy`` turns it off). The
store's root and every volume directory are
private to their owner (0700), as the rest of the store.

Which containers use a volume is read from the containers' records (:meth:`VolumeStore.users`),
so ``volume rm`` and ``volume prune`` refuse or skip a volume a container still names, running
or not, with docker's message.

Error handling: :class:`VolumeNotFound` and :class:`VolumeError` (a bad name, a volume in use),
both one line; exit codes are chosen by the verb (docker's client exits 1, ``run`` 125).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import LaminaError, NotFoundError
from lamina.layout import Layout

log = logging.getLogger(__name__)

# docker's rule for a local volume's name (daemon/names: RestrictedNamePattern, at least 2 chars).
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_ANONYMOUS_RE = re.compile(r"^[0-9a-f]{64}$")
RECORD = "volume.json"
DATA = "_data"
MAX_RECORD_BYTES = 1 << 20


class VolumeError(LaminaError):
    """A volume cannot be made, used or removed as asked."""


class VolumeNotFound(NotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(f"get {name}: no such volume")
        self.name = name


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def check_name(name: str) -> None:
    """docker's message for a name the local driver refuses (a relative path given to ``-v``)."""
    if not valid_name(name):
        raise VolumeError(f'create {name}: "{name}" includes invalid characters for a local volume name, '
                          'only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host '
                          "directory, use absolute path")


@dataclass
class Volume:
    name: str
    directory: Path
    created: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    anonymous: bool = False

    @property
    def data(self) -> Path:
        return self.directory / DATA

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "CreatedAt": self.created, "Labels": self.labels, "Options": self.options,
                "Anonymous": self.anonymous}

    def inspect(self) -> dict[str, Any]:
        """docker's ``volume inspect`` object."""
        return {"CreatedAt": self.created, "Driver": "local", "Labels": self.labels or None,
                "Mountpoint": str(self.data), "Name": self.name, "Options": self.options or None,
                "Scope": "local"}

    def save(self) -> None:
        tmp = self.directory / f".{RECORD}.{os.getpid()}"
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, self.directory / RECORD)


def _now() -> str:
    from runner.state import now

    return now()


class VolumeStore:
    """The volumes under ``layout.volumes``."""

    def __init__(self, layout: Layout | Path) -> None:
        self.layout = Layout.of(layout)
        self.dir = self.layout.volumes

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One writer at a time (create, remove, prune)."""
        from runner.state import directory_lock

        return directory_lock(self.layout, self.dir)

    def _load(self, directory: Path) -> Volume | None:
        if not (directory / DATA).is_dir():
            return None
        volume = Volume(directory.name, directory, anonymous=bool(_ANONYMOUS_RE.match(directory.name)))
        try:
            with open(directory / RECORD, "rb") as f:
                data = json.loads(f.read(MAX_RECORD_BYTES))
        except FileNotFoundError:
            # An anonymous volume made before volumes had records.
            volume.created = _mtime(directory)
            return volume
        except (OSError, ValueError) as e:
            log.debug("volume %s: unreadable record (%s)", directory.name, e)
            return volume
        if isinstance(data, dict):
            volume.created = str(data.get("CreatedAt") or "")
            volume.labels = _str_dict(data.get("Labels"))
            volume.options = _str_dict(data.get("Options"))
            volume.anonymous = bool(data.get("Anonymous", volume.anonymous))
        return volume

    def all(self) -> list[Volume]:
        if not self.dir.is_dir():
            return []
        found = [self._load(entry) for entry in sorted(self.dir.iterdir())
                 if entry.is_dir() and valid_name(entry.name)]
        return [v for v in found if v is not None]

    def get(self, name: str) -> Volume:
        volume = self._load(self.dir / name) if valid_name(name) else None
        if volume is None:
            raise VolumeNotFound(name)
        return volume

    def create(self, name: str | None = None, labels: dict[str, str] | None = None,
               options: dict[str, str] | None = None) -> Volume:
        """The volume ``name``, made when missing (docker's ``volume create`` of an existing name
        answers that volume); a random name makes an anonymous volume."""
        if options:
            from runner.volume_options import VolumeOptionError, check_options

            try:
                check_options(options)
            except VolumeOptionError as e:
                raise VolumeError(f"create {name or ''}: {e}") from None
        anonymous = name is None
        name = name if name is not None else secrets.token_hex(32)
        check_name(name)
        with self.lock():
            with contextlib.suppress(VolumeNotFound):
                return self.get(name)
            directory = self.dir / name
            directory.mkdir(mode=0o700)
            (directory / DATA).mkdir(mode=0o755)
            volume = Volume(name, directory, created=_now(), labels=dict(labels or {}), anonymous=anonymous,
                            options=dict(options or {}))
            volume.save()
        return volume

    def users(self) -> dict[str, list[str]]:
        """Volume name -> the ids of the containers whose records name it, running or not. Read from
        the records as they are (as the image store's owners are): no container is refreshed or
        removed on the way, so this may run under the volumes' lock."""
        found: dict[str, list[str]] = {}
        for path in sorted(self.layout.containers.glob("*/container.json")):
            with contextlib.suppress(OSError, ValueError, RecursionError):
                with open(path, "rb") as f:
                    data = json.loads(f.read(MAX_RECORD_BYTES * 16))
                mounts = data.get("mounts") if isinstance(data, dict) else None
                for mount in mounts if isinstance(mounts, list) else []:
                    name = mount.get("volume") if isinstance(mount, dict) else None
                    if isinstance(name, str):
                        found.setdefault(name, []).append(path.parent.name)
        return found

    def remove(self, name: str, force: bool = False) -> None:
        """docker's ``volume rm``: a volume a container names is refused (even with ``force``,
        which only makes a missing volume no error)."""
        with self.lock():
            try:
                volume = self.get(name)
            except VolumeNotFound:
                if force:
                    return
                raise
            in_use = self.users().get(volume.name)
            if in_use:
                raise VolumeError(f"remove {name}: volume is in use - [{', '.join(in_use)}]")
            _delete(volume.directory)

    def remove_quietly(self, name: str) -> None:
        """Remove an anonymous volume of a container being removed (``rm -v``, ``--rm``) unless
        another container names it too (``--volumes-from``)."""
        with contextlib.suppress(LaminaError):
            self.remove(name)

    def prune(self, include_named: bool = False, labels: list[str] | None = None) -> tuple[list[str], int]:
        """Remove the volumes no container names: anonymous ones only unless ``include_named``
        (docker 23's ``volume prune`` and ``--all``); return the names and the bytes freed."""
        removed, freed = [], 0
        with self.lock():
            in_use = self.users()
            for volume in self.all():
                if volume.name in in_use or (volume.anonymous is False and not include_named):
                    continue
                if labels and not all(_label_matches(volume.labels, wanted) for wanted in labels):
                    continue
                freed += disk_usage(volume.data)
                _delete(volume.directory)
                removed.append(volume.name)
        return removed, freed


def _label_matches(labels: dict[str, str], wanted: str) -> bool:
    key, sep, value = wanted.partition("=")
    return key in labels and (not sep or labels[key] == value)


def label_filter(labels: dict[str, str], wanted: str) -> bool:
    """docker's ``label=KEY`` / ``label=KEY=VALUE`` filter."""
    return _label_matches(labels, wanted)


def disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _delete(directory: Path) -> None:
    """Files a container made may belong to subordinate ids: deleted as namespace root if need be."""
    from runner.state import remove_owned_tree

    remove_owned_tree(directory)


def _str_dict(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _mtime(directory: Path) -> str:
    import datetime as dt

    with contextlib.suppress(OSError):
        stamp = directory.stat().st_mtime
        return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat().replace("+00:00", "Z")
    return ""
