"""The pure core of the union filesystem (no pyfuse3): layers, lookup, inodes, copy-up, operations."""

from unionfs.core.ops import UnionFS
from unionfs.core.tree import Caller, DirEntry, UnionError

__all__ = ["Caller", "DirEntry", "UnionError", "UnionFS"]
