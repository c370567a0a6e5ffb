"""Image references: ``[HOST[:PORT]/]NAME[:TAG][@DIGEST]``, normalised the way docker does.

``busybox`` means ``docker.io/library/busybox:latest``; ``lamina/busybox`` means
``docker.io/lamina/busybox:latest``; a first component with a dot, a colon or equal to ``localhost``
is a registry host (``127.0.0.1:5000/app:1``). The store keys its tags by the full normalised form
and shows the short ("familiar") form, as docker does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_REGISTRIES = {"index.docker.io", "registry-1.docker.io"}

# From the distribution reference grammar (github.com/distribution/reference, regexp.go).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?$"
                      r"|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")
# docker's truncatedID (daemon/containerd/image.go): an image ID prefix has at least 4 hex digits,
# so `FROM a` or `run b` names an image, never whichever ID happens to start with that letter.
HEX_ID_RE = re.compile(r"^(?:sha256:)?[0-9a-f]{4,64}$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. ``tag`` is None only when a digest was given without a tag."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``[HOST/]NAME[:TAG][@DIGEST]``; a missing tag (and digest) means ``latest``.

        Error handling: raises :class:`UsageError` naming the reference when it is malformed.
        """
        if not text or len(text) > 4096 or text != text.strip():
            raise UsageError(f"invalid reference format: {text!r}")
        rest = text
        digest: str | None = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise UsageError(f"invalid reference format: {text!r}: bad digest {digest!r}")
        tag: str | None = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG_RE.match(tag):
                raise UsageError(f"invalid reference format: {text!r}: bad tag {tag!r}")
        registry = DEFAULT_REGISTRY
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
            if not _HOST_RE.match(first):
                raise UsageError(f"invalid reference format: {text!r}: bad registry host {first!r}")
            registry, rest = first, remainder
        if registry in _LEGACY_REGISTRIES:
            registry = DEFAULT_REGISTRY
        if not _NAME_RE.match(rest):
            hint = " (repository names must be lowercase)" if rest != rest.lower() else ""
            raise UsageError(f"invalid reference format: {text!r}{hint}")
        if registry == DEFAULT_REGISTRY and "/" not in rest:
            rest = "library/" + rest
        if len(registry) + 1 + len(rest) > 255:
            raise UsageError(f"invalid reference format: {text!r}: name longer than 255 characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=rest, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``registry/repository`` (no tag): what a registry calls the repository."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The short name docker shows: ``busybox``, ``lamina/busybox``, ``127.0.0.1:5000/app``."""
        if self.registry == DEFAULT_REGISTRY:
            return self.repository.removeprefix("library/")
        return self.name

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    @property
    def familiar(self) -> str:
        """The short form of the whole reference: ``busybox:latest``."""
        text = self.familiar_name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    @property
    def tagged_key(self) -> str:
        """The key under which the store keeps this tag: ``registry/repository:tag``."""
        return f"{self.name}:{self.tag or DEFAULT_TAG}"


def looks_like_id(text: str) -> bool:
    """True for something that may be an image ID or ID prefix (``sha256:`` optional)."""
    return bool(HEX_ID_RE.match(text))
