"""The JSON documents of images and archives, parsed into typed values at the boundary.

Everything an archive (or a registry) says about an image passes through here before any other
code looks at it: ``manifest.json`` of a docker-archive, ``index.json`` and manifests of an OCI
layout, descriptors, and the part of an image config the store relies on (``rootfs.diff_ids``).
A value of the wrong JSON type, a digest that is not ``sha256:`` + 64 hex digits, a negative size:
each is refused here with one :class:`FormatError` naming the document and the field, so that the
code after it never meets a string where it expects a list (which used to end in a traceback).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lamina.errors import FormatError

T = TypeVar("T")
# Media types of manifests and indexes (OCI image spec; Docker's image manifest v2, schema 2).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MISSING = object()


def parse_json(data: bytes, what: str) -> Any:
    """The JSON value of ``data``; FormatError naming ``what`` if it is not JSON (or nests absurdly)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # RecursionError: a crafted document nested deeper than Python's decoder can follow.
        raise FormatError(f"{what} is not valid JSON") from None


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def as_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what} is {_type_name(value)}, not an object")
    return value


def as_list(value: object, what: str, item: Callable[[object, str], T]) -> list[T]:
    if not isinstance(value, list):
        raise FormatError(f"{what} is {_type_name(value)}, not a list")
    return [item(v, f"{what}[{i}]") for i, v in enumerate(value)]


def as_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what} is {_type_name(value)}, not a string")
    return value


def as_size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"{what} is {value!r}, not a size in bytes")
    return value


def as_digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise FormatError(f"{what} is {str(value)[:80]!r}, not a sha256 digest")
    return value


def get(obj: dict[str, Any], key: str, what: str, parse: Callable[[object, str], T],
        default: Any = _MISSING) -> T:
    """``obj[key]`` parsed by ``parse``; ``default`` when absent or null (required if no default)."""
    value = obj.get(key)
    if value is None:
        if default is _MISSING:
            raise FormatError(f"{what} lacks {key!r}")
        return default
    return parse(value, f"{what}: {key!r}")


def _string_map(value: object, what: str) -> dict[str, str]:
    return {k: as_string(v, f"{what}[{k!r}]") for k, v in as_object(value, what).items()}


@dataclass(frozen=True)
class Platform:
    """What an image runs on, in OCI terms (``linux/amd64``, ``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, value: object, what: str) -> Platform:
        """An index entry's ``platform``. ``os`` and ``architecture`` are required by the spec; one
        that lacks them is kept (as "") so that it matches no platform rather than failing the index."""
        d = as_object(value, what)
        return cls(os=get(d, "os", what, as_string, ""), architecture=get(d, "architecture", what, as_string, ""),
                   variant=get(d, "variant", what, as_string, None) or None)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its exact size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, value: object, what: str) -> Descriptor:
        d = as_object(value, what)
        return cls(media_type=get(d, "mediaType", what, as_string, ""),
                   digest=get(d, "digest", what, as_digest),
                   size=get(d, "size", what, as_size),
                   annotations=get(d, "annotations", what, _string_map, {}),
                   platform=get(d, "platform", what, Platform.parse, None),
                   urls=get(d, "urls", what, lambda v, w: as_list(v, w, as_string), []))


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: list[Descriptor]

    @classmethod
    def parse(cls, value: object, what: str) -> ImageManifest:
        d = as_object(value, what)
        return cls(config=get(d, "config", what, Descriptor.parse),
                   layers=get(d, "layers", what, lambda v, w: as_list(v, w, Descriptor.parse)))


@dataclass(frozen=True)
class Index:
    manifests: list[Descriptor]

    @classmethod
    def parse(cls, value: object, what: str) -> Index:
        d = as_object(value, what)
        return cls(manifests=get(d, "manifests", what, lambda v, w: as_list(v, w, Descriptor.parse)))


@dataclass(frozen=True)
class DockerArchiveEntry:
    """One image of a docker-archive's ``manifest.json``."""

    config: str
    repo_tags: list[str]
    layers: list[str]

    @classmethod
    def parse(cls, value: object, what: str) -> DockerArchiveEntry:
        d = as_object(value, what)
        return cls(config=get(d, "Config", what, as_string),
                   repo_tags=get(d, "RepoTags", what, lambda v, w: as_list(v, w, as_string), []),
                   layers=get(d, "Layers", what, lambda v, w: as_list(v, w, as_string)))

    @staticmethod
    def parse_all(value: object, what: str) -> list[DockerArchiveEntry]:
        entries = as_list(value, what, DockerArchiveEntry.parse)
        if not entries:
            raise FormatError(f"{what} lists no images")
        return entries


def config_diff_ids(value: object, what: str) -> list[str]:
    """The ``rootfs.diff_ids`` of an image config, each a sha256 digest."""
    rootfs = get(as_object(value, what), "rootfs", what, as_object)
    return get(rootfs, "diff_ids", f"{what}: 'rootfs'", lambda v, w: as_list(v, w, as_digest))
