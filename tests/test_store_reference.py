"""Image references: parsing, defaults, docker.io normalisation, refusal of malformed ones."""

from __future__ import annotations

import pytest

from lamina.errors import UsageError
from lamina.store.reference import Reference, looks_like_id

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("lamina/busybox", "docker.io", "lamina/busybox", "latest", None),
    ("docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/foo/bar", "docker.io", "foo/bar", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
    ("127.0.0.1:5000/app:1", "127.0.0.1:5000", "app", "1", None),
    ("quay.io/org/img@" + DIGEST, "quay.io", "org/img", None, DIGEST),
    ("img:tag@" + DIGEST, "docker.io", "library/img", "tag", DIGEST),
    ("my-reg.example/e__f.g-h", "my-reg.example", "e__f.g-h", "latest", None),
    ("UPPER/case", "UPPER", "case", "latest", None),
])
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_familiar_and_full_forms() -> None:
    ref = Reference.parse("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.familiar == "busybox:latest" and ref.familiar_name == "busybox"
    assert Reference.parse("lamina/busybox").familiar == "lamina/busybox:latest"
    local = Reference.parse("localhost:5000/x:1")
    assert local.familiar == str(local) == "localhost:5000/x:1"
    assert Reference.parse("busybox").tagged_key == Reference.parse("docker.io/library/busybox").tagged_key


@pytest.mark.parametrize("text", [
    "", "a_b.c/x", "Busybox", "name:", "name:-bad", "a//b", "name@sha256:short", " x", "x ",
    "name:" + "t" * 129, "-leading", "trailing-", "a/b:c:d", "x" * 300, "host:notaport/x",
])
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="invalid reference"):
        Reference.parse(text)


def test_looks_like_id() -> None:
    assert looks_like_id("abc123") and looks_like_id("sha256:" + "0" * 64)
    assert not looks_like_id("busybox") and not looks_like_id("0" * 65)
    # docker: an ID prefix has at least 4 hex digits
    assert not looks_like_id("a") and not looks_like_id("abc") and looks_like_id("abcd")
