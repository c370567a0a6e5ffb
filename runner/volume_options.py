"""docker's ``local`` volume driver options: ``volume create -o type=T -o device=D -o o=OPTIONS``.

docker's driver (moby ``volume/local/local_unix.go``) checks the keys when the volume is made and
mounts ``device`` on the volume's directory, as type ``type`` with ``o``, when a container first
uses it. A rootless engine can mount two of those kinds: a ``tmpfs`` (any device name, as docker's
own example ``-o type=tmpfs -o device=tmpfs -o o=size=100m``) and a bind of a host directory
(``-o type=none -o o=bind -o device=/path``). Every other type needs privileges (nfs, cifs, a block
device) and is refused when the volume is made, with the reason.

One difference, documented in docs/outside-suites.md: docker mounts a tmpfs volume once on the
host while any container uses it, so containers running at the same time share its files; here
each container gets its own tmpfs (filled from the image as docker fills an empty volume).
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.volumes import VolumeError

VALID_KEYS = ("type", "o", "device", "size")
# A key, and the keys it needs (docker's mandatoryOpts).
REQUIRED_WITH = {"device": ("type",), "type": ("device",), "o": ("device", "type")}
# Mount options that are flags of the mount rather than data of a tmpfs.
READONLY_WORDS = {"ro": True, "rw": False}


class VolumeOptionError(VolumeError):
    """Options ``volume create`` refuses (docker's local driver: an invalid parameter, exit 1)."""


@dataclass(frozen=True)
class DriverMount:
    """How a container mounts a volume made with options: ``kind`` "tmpfs" (``data`` its tmpfs
    options) or "bind" (``source`` the host directory)."""

    kind: str
    source: str | None
    data: str
    readonly: bool


def check_options(options: dict[str, str]) -> None:
    """The checks docker's local driver makes at ``volume create``, then the rootless limit."""
    if not options:
        return
    for key in sorted(options):
        if key not in VALID_KEYS:
            raise VolumeOptionError(f'invalid option: "{key}"')
    if "size" in options:
        raise VolumeOptionError("quota size requested but no quota support")
    for key in sorted(REQUIRED_WITH):
        for needed in REQUIRED_WITH[key]:
            if key in options and needed not in options:
                raise VolumeOptionError(f'missing required option: "{needed}"')
    driver_mount(options)


def driver_mount(options: dict[str, str]) -> DriverMount:
    """The mount a container makes for a volume with these (checked) options."""
    words = [w for w in options.get("o", "").split(",") if w]
    readonly = any(READONLY_WORDS.get(w, False) for w in words)
    rest = [w for w in words if w not in READONLY_WORDS]
    kind = options.get("type", "")
    if kind == "tmpfs":
        return DriverMount("tmpfs", None, ",".join(rest), readonly)
    if kind == "none" and ("bind" in rest or "rbind" in rest):
        device = options.get("device", "")
        if not device.startswith("/"):
            raise VolumeOptionError(f"device {device!r}: a bind volume needs an absolute host path")
        unknown = [w for w in rest if w not in ("bind", "rbind")]
        if unknown:
            raise VolumeOptionError(f"o={options['o']}: a bind volume takes only bind, rbind, ro and rw here")
        return DriverMount("bind", device, "", readonly)
    raise VolumeOptionError(f"type={kind} o={options.get('o', '')}: a rootless engine mounts only "
                            "type=tmpfs and type=none,o=bind volumes (others need privileges)")
