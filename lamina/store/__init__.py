"""The image store: content-addressed blobs, unpacked layers, images and tags (see store.store)."""

from lamina.store.reference import Reference
from lamina.store.store import Image, Layer, Store

__all__ = ["Image", "Layer", "Reference", "Store"]
