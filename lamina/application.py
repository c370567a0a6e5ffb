"""Where lamina's parts meet: the store opened with every other owner of its digests wired in.

The image store (:mod:`lamina.store`) knows only its own images. Containers (:mod:`runner.state`),
the build cache (:mod:`builder.cache`) and live ``lamina mount``s (:mod:`lamina.inspector.mounts`)
keep records that name images, blobs and layers; :func:`open_store` hands the store those owners
(:mod:`lamina.store.usage`), so ``rmi``, ``system prune`` and every garbage collection respect
them while the store imports none of them. The owners' modules are imported only when a question
about use is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.layout import Layout
from lamina.store.store import Store

if TYPE_CHECKING:
    from lamina.store.usage import DigestOwner


def digest_owners(layout: Layout) -> Sequence[DigestOwner]:
    """Every owner of digests in ``layout`` besides the image store: containers (listed first in
    ``rmi``'s messages), live mounts, the build cache."""
    from builder.cache import BuildCache
    from lamina.inspector.mounts import MountRecords
    from runner.state import ContainerStore

    return (ContainerStore(layout), MountRecords(layout), BuildCache(layout.build_cache))


def open_store(where: Layout | Path) -> Store:
    """The store at ``where`` (created when missing), aware of every owner of its digests."""
    layout = Layout.of(where)
    return Store.open(layout, owners=lambda: digest_owners(layout))
