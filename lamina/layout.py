"""The ``--root`` directory: which path belongs to which part of lamina.

One :class:`Layout` names every directory and file lamina keeps under a root, and hands each part
its own; no other module joins names onto a root. The tree::

    lock, tags.lock     the image store's locks (:mod:`lamina.store.store`)
    tmp/                temporary files of every writer, named "<pid>.<random>.<kind>"
    blobs/sha256/       the image store's content-addressed blobs
    layers/             the image store's unpacked layers
    images/             the image store's image records and tags.json
    containers/         the runner's containers (:mod:`runner.state`)
    volumes/            the runner's volumes, named and anonymous (:mod:`runner.volumes`)
    build-cache/        the builder's step cache and RUN --mount=type=cache directories
    mounts/             the inspector's `lamina mount` records and mount points
    registry/           the registry client's notes (where blobs were seen)
    lazy/               lazily read images: verified eStargz chunks, whole layers (:mod:`lamina.lazy`)

Making a layout touches nothing on disk (:meth:`lamina.store.Store.open` creates the
directories, private to their owner, see :mod:`lamina.store.private`).
"""

from __future__ import annotations

import os
from pathlib import Path


class Layout:
    """The paths under one lamina root. A value: equal layouts have equal roots.

    (A plain class, not a dataclass: every lamina command imports it, and generating a frozen
    dataclass costs more at start-up than this whole module.)
    """

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r})"

    # Directories that hold content, created private (0700) with the store.
    CONTENT_DIRS = ("blobs", "blobs/sha256", "layers", "images", "tmp", "containers", "mounts", "build-cache",
                    "volumes", "lazy")
    # Everything lamina keeps directly in a root.
    ENTRIES = frozenset({*CONTENT_DIRS, "lock", "tags.lock", "registry"})
    # Directories of these hold one object each (a layer, a container, a mount, a volume).
    PER_OBJECT_DIRS = ("layers", "containers", "mounts", "volumes")

    @classmethod
    def of(cls, where: Layout | str | os.PathLike[str]) -> Layout:
        """``where`` itself when it is a layout, else the layout rooted at that path."""
        return where if isinstance(where, Layout) else cls(Path(where))

    # --- shared by every writer ------------------------------------------------------------------

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    # --- the image store -------------------------------------------------------------------------

    @property
    def store_lock(self) -> Path:
        return self.root / "lock"

    @property
    def tags_lock(self) -> Path:
        return self.root / "tags.lock"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def tags_file(self) -> Path:
        return self.images / "tags.json"

    # --- the runner ------------------------------------------------------------------------------

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    # --- the builder -----------------------------------------------------------------------------

    @property
    def build_cache(self) -> Path:
        return self.root / "build-cache"

    # --- the inspector ---------------------------------------------------------------------------

    @property
    def mounts(self) -> Path:
        return self.root / "mounts"

    # --- the registry client ---------------------------------------------------------------------

    @property
    def blob_locations(self) -> Path:
        return self.root / "registry" / "blob-locations.json"

    # --- lazy images -----------------------------------------------------------------------------

    @property
    def lazy_chunks(self) -> Path:
        return self.root / "lazy" / "chunks"

    @property
    def lazy_tocs(self) -> Path:
        """Verified eStargz TOCs by blob digest (checked against the manifest again at each use)."""
        return self.root / "lazy" / "tocs"

    @property
    def lazy_tars(self) -> Path:
        """Layers of lazy images that are not eStargz: fetched whole, kept as plain tars by blob digest."""
        return self.root / "lazy" / "tars"

    @property
    def lazy_images(self) -> Path:
        """Images run lazily, not yet filled: one directory per image ID (:mod:`lamina.lazy.images`)."""
        return self.root / "lazy" / "images"

    @property
    def lazy_blobs(self) -> Path:
        """Layer blobs of lazy images being filled, as sparse files with a log of the ranges present."""
        return self.root / "lazy" / "blobs"

    @property
    def lazy_servers(self) -> Path:
        """The mount points of the lazy layer servers of running containers (:mod:`lamina.lazy.lower`)."""
        return self.root / "lazy" / "run"
