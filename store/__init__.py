"""The image store: content-addressed blobs, unpacked layers, images and tags (see store.store)."""

from store.reference import Reference
from store.store import Image, Layer, Store

__all__ = ["Image", "Layer", "Reference", "Store"]
