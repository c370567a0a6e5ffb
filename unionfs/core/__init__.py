"""The pure core of the union filesystem (no pyfuse3): layers, lookup, inodes, copy-up, operations.

The names below load on first use, so that code needing only a small part of the core (the layer
stack, the on-disk format, the merged view) does not pay for importing the whole filesystem.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unionfs.core.ops import UnionFS
    from unionfs.core.tree import Caller, DirEntry, UnionError

__all__ = ["Caller", "DirEntry", "UnionError", "UnionFS"]

_HOMES = {"UnionFS": "unionfs.core.ops", "Caller": "unionfs.core.tree", "DirEntry": "unionfs.core.tree",
          "UnionError": "unionfs.core.tree"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
