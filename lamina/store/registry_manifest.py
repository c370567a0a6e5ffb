"""What an OCI or Docker image manifest, index and digest look like, checked strictly.

Pure functions over bytes and JSON, with no network: the registry client (store.registry) and the
pull/push commands use them to decide what a registry's answer means and whether to trust it.
Documents are parsed by :mod:`store.image_schema` (as an archive's are); which index entry fits a
platform is :mod:`store.platforms`'s rule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lamina.bounded import JSON_LIMIT
from lamina.errors import FormatError, RegistryError
from lamina.store import image_schema
from lamina.store.image_schema import (
    DIGEST_RE,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageManifest,
    Index,
    Platform,
)
from lamina.store.platforms import host_platform

__all__ = ["DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "OCI_INDEX", "OCI_MANIFEST", "Platform", "host_platform"]

T = TypeVar("T")

DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

# Configs are held in memory; real ones are a few KiB (containers/image's MaxConfigBodySize).
MAX_CONFIG_BYTES = JSON_LIMIT


def parsed(parse: Callable[[object, str], T], data: bytes, what: str) -> T:
    """A JSON document from a registry, through the typed boundary (:mod:`store.image_schema`) that
    archives use too; what it refuses is the registry's fault, so it is a RegistryError here."""
    try:
        return parse(image_schema.parse_json(data, what), what)
    except FormatError as e:
        raise RegistryError(str(e)) from None


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
class Manifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: str

    def index(self) -> Index:
        return parsed(Index.parse, self.data, f"image index {self.digest}")

    def image(self) -> ImageManifest:
        return parsed(ImageManifest.parse, self.data, f"image manifest {self.digest}")

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
