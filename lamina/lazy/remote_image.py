"""An image in a registry, as much of it as lazy use needs: its verified manifest, config and TOCs.

``lamina mount``, ``which`` and ``layers`` of a ``HOST/REPO:TAG`` not in the store start here. The
manifest is fetched and verified as a pull does; the layers' TOCs by :mod:`lamina.lazy.serve`'s
readers (two range requests per eStargz layer, all layers at once). Nothing here reads a file's
contents: a layer that is not eStargz has no TOC, and its reader fetches it whole (verified) into
``ROOT/lazy/tars``, which is the one exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import RegistryError, UsageError
from lamina.layout import Layout
from lamina.store.estargz import Toc
from lamina.store.image_schema import Descriptor
from lamina.store.reference import Reference
from lamina.store.registry import RegistryClient
from lamina.store.registry_auth import lookup_credentials
from lamina.store.registry_manifest import IMAGE_MANIFEST_TYPES, MAX_CONFIG_BYTES
from lamina.store.transfer import LAYER_TYPES, api_host, default_tls_verify


@dataclass
class RemoteImage:
    """A verified manifest's facts: where the image is, its config's digest and its layers."""

    reference: Reference
    tls_verify: bool
    config_digest: str
    config_size: int
    layers: list[Descriptor]

    @property
    def id(self) -> str:
        return self.config_digest.removeprefix("sha256:")

    def client(self) -> RegistryClient:
        """A client for the image's registry (with the user's stored credentials); the caller closes it."""
        return RegistryClient(api_host(self.reference.registry), tls_verify=self.tls_verify,
                              credentials=lookup_credentials(self.reference.registry))

    def layer_spec(self, layout: Layout, upto: int | None = None, trace: Path | None = None) -> dict[str, Any]:
        """What :mod:`lamina.lazy.serve` needs to read layers 1..``upto`` (all by default).

        Error handling: UsageError for an ``upto`` out of range, RegistryError for a layer of a
        type a lazy reader cannot read.
        """
        ref = self.reference
        if upto is not None and not 1 <= upto <= len(self.layers):
            raise UsageError(f"--upto {upto}: the image has layers 1..{len(self.layers)}")
        chosen = self.layers if upto is None else self.layers[:upto]
        for index, layer in enumerate(chosen):
            if layer.media_type not in LAYER_TYPES or layer.urls:
                raise RegistryError(f"{ref}: layer {index + 1} ({layer.digest[7:19]}) has unsupported media type "
                                    f"{layer.media_type or None!r}")
        return {"registry": ref.registry, "api_host": api_host(ref.registry), "tls_verify": self.tls_verify,
                "repository": ref.repository, "cache": str(layout.lazy_chunks),
                "tocs": str(layout.lazy_tocs), "tars": str(layout.lazy_tars),
                "trace": str(trace.absolute()) if trace else None,
                "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
                            "annotations": layer.annotations} for layer in chosen]}


def fetch_manifest(client: RegistryClient, reference: str, tls_verify: bool | None = None) -> RemoteImage:
    """The image's manifest, verified (through ``client``, a client for the reference's registry).

    Error handling: RegistryError (unreachable, unknown, not an image manifest).
    """
    ref = Reference.parse(reference)
    manifest, _index = client.get_image_manifest(ref.repository, ref.digest or ref.tag or "latest")
    if manifest.media_type not in IMAGE_MANIFEST_TYPES:
        raise RegistryError(f"{ref}: unsupported manifest type {manifest.media_type}")
    image = manifest.image()
    return RemoteImage(ref, default_tls_verify(ref.registry, tls_verify), image.config.digest, image.config.size,
                       list(image.layers))


def client_for(reference: str, tls_verify: bool | None = None) -> RegistryClient:
    ref = Reference.parse(reference)
    return RegistryClient(api_host(ref.registry), tls_verify=default_tls_verify(ref.registry, tls_verify),
                          credentials=lookup_credentials(ref.registry))


def fetch_config(client: RegistryClient, layout: Layout, image: RemoteImage) -> dict[str, Any]:
    """The image's config, verified against its digest. RegistryError if it is not a JSON object."""
    data = client.fetch_small_blob(image.reference.repository, image.config_digest, layout.tmp,
                                   size=image.config_size, max_size=MAX_CONFIG_BYTES)
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise RegistryError(f"{image.reference}: its config is not a JSON object")
    return config


def fetch_tocs(layout: Layout, image: RemoteImage) -> list[Toc]:
    """Every layer's TOC, verified, fetched concurrently (a non-eStargz layer: whole, then indexed).

    Error handling: RegistryError or FormatError for a layer that cannot be had or verified.
    """
    from lamina.lazy.serve import open_layers, open_tocs

    layers = open_layers(image.layer_spec(layout), None)
    try:
        return open_tocs(layers)
    finally:
        for layer in layers:
            layer.close()
