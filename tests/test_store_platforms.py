"""Which entry of an image index fits a platform (lamina.store.platforms), checked rule by rule
against the OCI image-index spec (image-index.md): registries and archives both choose with it."""

from __future__ import annotations

from lamina.store.image_schema import OCI_INDEX, OCI_MANIFEST, Descriptor, Index, Platform
from lamina.store.platforms import choose_manifest, offered

AMD64 = Platform("linux", "amd64")


def entry(n: int, platform: dict[str, str] | None, media_type: str = OCI_MANIFEST) -> dict[str, object]:
    value: dict[str, object] = {"mediaType": media_type, "digest": "sha256:" + f"{n:02x}" * 32, "size": 100 + n}
    if platform is not None:
        value["platform"] = platform
    return value


def choose(entries: list[dict[str, object]], want: Platform) -> int | None:
    """The index (in ``entries``) of the chosen entry, parsed as archives and registries parse it."""
    manifests = Index.parse({"manifests": entries}, "index").manifests
    chosen = choose_manifest(manifests, want)
    return None if chosen is None else manifests.index(chosen)


def test_the_specs_example_index() -> None:
    # image-index.md's example: one manifest for linux/ppc64le, one for linux/amd64.
    entries = [entry(1, {"architecture": "ppc64le", "os": "linux"}), entry(2, {"architecture": "amd64", "os": "linux"})]
    assert choose(entries, AMD64) == 1
    assert choose(entries, Platform("linux", "ppc64le")) == 0
    assert choose(entries, Platform("linux", "s390x")) is None
    assert choose(entries, Platform("windows", "amd64")) is None


def test_an_unknown_media_type_is_ignored() -> None:
    """"An encountered mediaType that is unknown to the implementation MUST be ignored.\""""
    linux = {"architecture": "amd64", "os": "linux"}
    unknown = entry(1, linux, "application/vnd.example.not-an-image+json")
    assert choose([unknown, entry(2, linux)], AMD64) == 1
    assert choose([unknown], AMD64) is None
    manifests = Index.parse({"manifests": [unknown]}, "index").manifests
    assert offered(manifests) == "linux/amd64 as application/vnd.example.not-an-image+json, which lamina does not read"


def test_a_nested_index_is_a_candidate() -> None:
    """Implementations SHOULD support application/vnd.oci.image.index.v1+json (nested index)."""
    assert choose([entry(1, {"architecture": "amd64", "os": "linux"}, OCI_INDEX)], AMD64) == 0


def test_an_entry_without_a_platform_fits_any_after_one_that_names_it() -> None:
    """platform is OPTIONAL and SHOULD be present if the target is platform-specific."""
    assert choose([entry(1, None)], AMD64) == 0
    assert choose([entry(1, None), entry(2, {"architecture": "amd64", "os": "linux"})], AMD64) == 1
    assert choose([entry(1, None), entry(2, {"architecture": "arm64", "os": "linux"})], AMD64) == 0


def test_variants_from_the_specs_table() -> None:
    arm = [entry(1, {"architecture": "arm", "os": "linux", "variant": "v6"}),
           entry(2, {"architecture": "arm", "os": "linux", "variant": "v7"}),
           entry(3, {"architecture": "arm64", "os": "linux"}),
           entry(4, {"architecture": "arm", "os": "linux", "variant": "v8"})]
    assert choose(arm, Platform("linux", "arm", "v7")) == 1
    assert choose(arm, Platform("linux", "arm", "v8")) == 3
    assert choose(arm, Platform("linux", "arm", "v5")) is None  # another variant does not fit
    assert choose(arm, Platform("linux", "arm64", "v8")) == 2  # arm64 images often omit v8
    assert choose(arm, Platform("linux", "arm")) == 0  # no variant asked: the first arm entry
    exact_last = [entry(1, {"architecture": "arm64", "os": "linux"}),
                  entry(2, {"architecture": "arm64", "os": "linux", "variant": "v8"})]
    assert choose(exact_last, Platform("linux", "arm64", "v8")) == 1  # the exact variant fits best


def test_the_first_matching_entry_is_used() -> None:
    """If multiple manifests match, the first matching entry SHOULD be used."""
    linux = {"architecture": "amd64", "os": "linux"}
    assert choose([entry(1, {"architecture": "arm64", "os": "linux"}), entry(2, linux), entry(3, linux)], AMD64) == 1


def test_attestation_manifests_are_never_chosen() -> None:
    # BuildKit's provenance entries: image manifests for platform unknown/unknown.
    attestation = entry(1, {"architecture": "unknown", "os": "unknown"})
    assert choose([attestation, entry(2, {"architecture": "amd64", "os": "linux"})], AMD64) == 1
    assert choose([attestation], AMD64) is None


def test_descriptors_are_parsed_once_for_both_users() -> None:
    desc = Descriptor.parse(entry(1, {"architecture": "arm", "os": "linux", "variant": "v7"}), "d")
    assert desc.platform == Platform("linux", "arm", "v7") and str(desc.platform) == "linux/arm/v7"
    assert Descriptor.parse(entry(1, {"architecture": "amd64"}), "d").platform == Platform("", "amd64")
