"""What an OCI or Docker image manifest, index and digest look like, checked strictly.

Pure functions over bytes and JSON, with no network: the registry client (store.registry) and the
pull/push commands use them to decide what a registry's answer means and whether to trust it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lamina.bounded import JSON_LIMIT
from lamina.errors import RegistryError

# Media types (OCI image spec and Docker's image manifest v2, schema 2).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

# Configs are held in memory; real ones are a few KiB (containers/image's MaxConfigBodySize).
MAX_CONFIG_BYTES = JSON_LIMIT

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# platform.machine() → OCI architecture (and variant where one is customary).
_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}

def parse_json(data: bytes, what: str) -> Any:
    """JSON from a registry; RegistryError for anything unparsable, including absurd nesting."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RegistryError(f"{what} is not valid JSON") from None


def try_json(data: bytes) -> Any:
    """JSON from a registry, or None when it is not (for optional, best-effort fields)."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def check_digest(digest: object, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lowercase hex digits, else raise RegistryError.

    Every digest that comes from a registry passes through here before it can name a file.
    """
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise RegistryError(f"invalid or unsupported {what}: {str(digest)[:100]!r}")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def host_platform() -> Platform:
    """The platform of this machine in OCI terms (``linux/amd64``, ``linux/arm64/v8``...)."""
    machine = platform.machine().lower()
    architecture, variant = _ARCH.get(machine, (machine, None))
    return Platform("linux", architecture, variant)


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict:
        value = parse_json(self.data, f"manifest {self.digest}")
        if not isinstance(value, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return value

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def manifest_media_type(data: bytes, header_type: str | None) -> str:
    """The media type of a manifest: its own ``mediaType`` field, else the Content-Type header."""
    value = try_json(data)
    declared = value.get("mediaType") if isinstance(value, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    header = (header_type or "").split(";")[0].strip()
    if header in IMAGE_MANIFEST_TYPES or header in INDEX_TYPES or header in DOCKER_SCHEMA1:
        return header
    # An OCI manifest may omit mediaType; tell a manifest from an index by its fields.
    if value is None:
        raise RegistryError("registry sent a manifest that is not valid JSON")
    if isinstance(value, dict) and "manifests" in value:
        return OCI_INDEX
    return OCI_MANIFEST


def select_platform(index: dict, want: Platform | None = None) -> dict:
    """The descriptor in an image index (or manifest list) that fits ``want`` (default: this host).

    An exact variant match is preferred; an entry without a variant is accepted for any variant
    (arm64 images often omit ``v8``). Raises RegistryError naming what the index offers.
    """
    want = want or host_platform()
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError("image index has no 'manifests' list")
    candidates: list[tuple[int, dict]] = []
    offered: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") or {}
        if not isinstance(plat, dict):
            continue
        os_name, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
        name = "/".join(str(p) for p in (os_name, arch, variant) if p)
        if entry.get("mediaType") not in (None, *IMAGE_MANIFEST_TYPES, *INDEX_TYPES):
            offered.append(f"{name} as {str(entry.get('mediaType'))[:100]}, which lamina does not read")
            continue
        offered.append(name)
        if os_name != want.os or arch != want.architecture:
            continue
        if variant == want.variant:
            rank = 0
        elif variant is None or want.variant is None:
            rank = 1
        else:
            continue
        candidates.append((rank, entry))
    if not candidates:
        raise RegistryError(f"the image index has no manifest for {want} "
                            f"(it offers: {', '.join(offered) or 'nothing'})")
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def iter_layers(manifest: dict) -> Iterator[dict]:
    """The layer descriptors of an image manifest, each with a checked digest and size."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise RegistryError("image manifest has no 'layers' list")
    for layer in layers:
        if not isinstance(layer, dict):
            raise RegistryError("image manifest has a malformed layer entry")
        check_digest(layer.get("digest"), "layer digest")
        size = layer.get("size")
        if not isinstance(size, int) or size < 0:
            raise RegistryError(f"layer {layer.get('digest')} has no valid size")
        yield layer


def config_descriptor(manifest: dict) -> dict:
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise RegistryError("image manifest has no 'config'")
    check_digest(config.get("digest"), "config digest")
    size = config.get("size")
    if not isinstance(size, int) or size < 0 or size > MAX_CONFIG_BYTES:
        raise RegistryError(f"image config has no valid size ({size!r})")
    return config

