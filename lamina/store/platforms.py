"""Which entry of an image index fits a platform: the one rule for registries and archives alike.

The OCI image-index spec (image-index.md) decides it, and each rule here comes from there:

* An entry whose ``mediaType`` is unknown to the implementation MUST be ignored: only image
  manifests and (nested) indexes are candidates; an entry that declares no media type is read by
  what it turns out to be, as before.
* ``platform`` is OPTIONAL and "SHOULD be present if its target is platform-specific": an entry
  without one fits any platform, after every entry that names this one.
* ``os`` and ``architecture`` must be equal. ``variant`` is the CPU's variant (``arm/v6``,
  ``arm/v7``, ``arm64/v8``): an entry naming the wanted variant fits best; an entry or a request
  naming none fits any (``arm64`` images often omit ``v8``); another variant does not fit.
* "If multiple manifests match a client or runtime's requirements, the first matching entry SHOULD
  be used": among entries that fit equally well, the first wins.

Pure: no I/O; callers turn "nothing fits" into their own error (an archive's or a registry's).
"""

from __future__ import annotations

import platform as python_platform
from collections.abc import Sequence

from lamina.store.image_schema import IMAGE_MANIFEST_TYPES, INDEX_TYPES, Descriptor, Platform

# platform.machine() -> OCI architecture (and variant where one is customary).
_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}

# How well an entry fits (lower is better); None: it does not.
_EXACT, _ANY_VARIANT, _ANY_PLATFORM = 0, 1, 2


def host_platform() -> Platform:
    """The platform of this machine in OCI terms (``linux/amd64``, ``linux/arm64/v8``...)."""
    machine = python_platform.machine().lower()
    architecture, variant = _ARCH.get(machine, (machine, None))
    return Platform("linux", architecture, variant)


def _fit(entry: Descriptor, want: Platform) -> int | None:
    if entry.media_type and entry.media_type not in (*IMAGE_MANIFEST_TYPES, *INDEX_TYPES):
        return None
    offered = entry.platform
    if offered is None:
        return _ANY_PLATFORM
    if offered.os != want.os or offered.architecture != want.architecture:
        return None
    if offered.variant == want.variant:
        return _EXACT
    if offered.variant is None or want.variant is None:
        return _ANY_VARIANT
    return None


def choose_manifest(entries: Sequence[Descriptor], want: Platform) -> Descriptor | None:
    """The entry of an index's ``manifests`` that fits ``want`` best (see the module docstring), or
    None when none does."""
    fits = [(rank, i) for i, entry in enumerate(entries) if (rank := _fit(entry, want)) is not None]
    return entries[min(fits)[1]] if fits else None


def offered(entries: Sequence[Descriptor]) -> str:
    """What an index offers, for the message that says none of it fits."""
    names = []
    for entry in entries:
        name = str(entry.platform) if entry.platform is not None else "any platform"
        if entry.media_type and entry.media_type not in (*IMAGE_MANIFEST_TYPES, *INDEX_TYPES):
            name += f" as {entry.media_type[:100]}, which lamina does not read"
        names.append(name)
    return ", ".join(names) or "nothing"
