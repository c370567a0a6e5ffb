"""The whole core as one object: the merged tree and the parts that read and change it.

:class:`UnionFS` is what the adapter and the tests hold. It is the merged tree (lookup and listing,
unionfs.core.tree) and hands every other request to the part that owns it:

========================================  ===============================================
unionfs.core.attributes                   attributes, owner overrides, link counts, access
unionfs.core.namespace_ops                create, mknod, mkdir, symlink, link, unlink, rmdir
unionfs.core.rename_ops                   rename, exchange, flattening redirects
unionfs.core.data_ops                     setattr, xattrs, open, release, fsyncdir
unionfs.core.copyup                       copy-up
unionfs.core.hardlinks (``tree.index``)   hard-link index, link-count and origin records
unionfs.core.marking (``tree.marks``)     whiteouts, opaque and redirect markers
========================================  ===============================================
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from unionfs.core import ondisk
from unionfs.core.attributes import AttributeReader, access_allowed
from unionfs.core.backing import Layer
from unionfs.core.copyup import copy_up
from unionfs.core.data_ops import DataOps
from unionfs.core.namespace_ops import NamespaceOps
from unionfs.core.nodes import Node
from unionfs.core.rename_ops import RenameOps
from unionfs.core.tree import Caller, UnionTree


class UnionFS(UnionTree):
    """The merged tree plus every operation that reads attributes of it or changes it."""

    def __init__(self, lowers: list[str], upper: str | None, work: str | None, *,
                 trace: Callable[[str], None] | None = None, layer_xattr: bool = False,
                 redirect_dir: bool | None = None, opened: dict[str, int] | None = None) -> None:
        """See UnionTree."""
        super().__init__(lowers, upper, work, trace=trace, layer_xattr=layer_xattr,
                         redirect_dir=redirect_dir, opened=opened)
        self.attributes = AttributeReader(self)
        self.names = NamespaceOps(self, self.attributes)
        self.renames = RenameOps(self, self.names)
        self.data = DataOps(self, self.attributes)

    # --- reading attributes (unionfs.core.attributes) --------------------------------------------

    def stat(self, node: Node) -> tuple[os.stat_result, ondisk.OwnerOverride | None]:
        return self.attributes.stat(node)

    def override_of(self, node: Node, st: os.stat_result) -> ondisk.OwnerOverride | None:
        return self.attributes.override_of(node, st)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """The link count to show (see AttributeReader.visible_nlink)."""
        return self.attributes.visible_nlink(node, st)

    def may_access(self, want: int, caller: Caller, mode: int, uid: int, gid: int) -> bool:
        """access(2) for an object shown with ``mode``/``uid``/``gid``; EROFS for writing a
        read-only union."""
        if want & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only union")
        return access_allowed(want, caller, mode, uid, gid)

    def readlink(self, node: Node) -> str:
        return self.attributes.readlink(node)

    def statfs(self) -> os.statvfs_result:
        return self.attributes.statfs()

    def getxattr(self, node: Node, name: str) -> bytes:
        return self.attributes.getxattr(node, name)

    def listxattr(self, node: Node) -> list[str]:
        return self.attributes.listxattr(node)

    # --- names (unionfs.core.namespace_ops, unionfs.core.rename_ops) -----------------------------

    def link_from_index(self, parent: Node, name: str, layer: Layer, path: str,
                        st: os.stat_result) -> Node | None:
        return self.names.link_from_index(parent, name, layer, path, st)

    def create(self, parent: Node, name: str, mode: int, flags: int, caller: Caller) -> tuple[Node, int]:
        return self.names.create(parent, name, mode, flags, caller)

    def mkdir(self, parent: Node, name: str, mode: int, caller: Caller) -> Node:
        return self.names.mkdir(parent, name, mode, caller)

    def mknod(self, parent: Node, name: str, mode: int, rdev: int, caller: Caller) -> Node:
        return self.names.mknod(parent, name, mode, rdev, caller)

    def symlink(self, parent: Node, name: str, target: str, caller: Caller) -> Node:
        return self.names.symlink(parent, name, target, caller)

    def link(self, node: Node, parent: Node, name: str) -> Node:
        return self.names.link(node, parent, name)

    def unlink(self, parent: Node, name: str) -> None:
        self.names.unlink(parent, name)

    def rmdir(self, parent: Node, name: str) -> None:
        self.names.rmdir(parent, name)

    def rename(self, oldp: Node, oldn: str, newp: Node, newn: str, flags: int = 0) -> None:
        self.renames.rename(oldp, oldn, newp, newn, flags)

    def flatten_redirects(self) -> int:
        return self.renames.flatten_redirects()

    # --- data and attributes (unionfs.core.data_ops, unionfs.core.copyup) ------------------------

    def copy_up(self, node: Node, truncate: bool = False) -> None:
        copy_up(self, node, truncate)

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fd: int | None = None) -> None:
        self.data.setattr(node, mode=mode, uid=uid, gid=gid, size=size, atime_ns=atime_ns,
                          mtime_ns=mtime_ns, fd=fd)

    def setxattr(self, node: Node, name: str, value: bytes, flags: int = 0) -> None:
        self.data.setxattr(node, name, value, flags)

    def removexattr(self, node: Node, name: str) -> None:
        self.data.removexattr(node, name)

    def open(self, node: Node, flags: int) -> tuple[int, bool]:
        return self.data.open(node, flags)

    def release(self, node: Node, fd: int) -> None:
        self.data.release(node, fd)

    def fsyncdir(self, node: Node) -> None:
        self.data.fsyncdir(node)
