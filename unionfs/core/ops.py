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

from unionfs.core.attributes import AttributeReader, access_allowed
from unionfs.core.backing import Layer
from unionfs.core.copyup import copy_up
from unionfs.core.data_ops import DataOps
from unionfs.core.namespace_ops import NamespaceOps
from unionfs.core.nodes import Node
from unionfs.core.rename_ops import RenameOps
from unionfs.core.tree import Caller, UnionTree


class UnionFS(UnionTree):
    """The merged tree plus every operation that reads attributes of it or changes it.

    The parts' operations are this object's own attributes (bound methods, so a request costs no
    extra call on its way to the part that serves it).
    """

    def __init__(self, lowers: list[str], upper: str | None, work: str | None, *,
                 trace: Callable[[str], None] | None = None, layer_xattr: bool = False,
                 redirect_dir: bool | None = None, opened: dict[str, int] | None = None) -> None:
        """See UnionTree."""
        super().__init__(lowers, upper, work, trace=trace, layer_xattr=layer_xattr,
                         redirect_dir=redirect_dir, opened=opened)
        self.attributes = attributes = AttributeReader(self)
        self.names = names = NamespaceOps(self, attributes)
        self.renames = renames = RenameOps(self, names)
        self.data = data = DataOps(self, attributes)
        # Reading attributes (unionfs.core.attributes).
        self.stat = attributes.stat
        self.override_of = attributes.override_of
        self.nlink = attributes.visible_nlink  # the link count to show
        self.readlink = attributes.readlink
        self.statfs = attributes.statfs
        self.getxattr = attributes.getxattr
        self.listxattr = attributes.listxattr
        # Names (unionfs.core.namespace_ops, unionfs.core.rename_ops).
        self.create = names.create
        self.mkdir = names.mkdir
        self.mknod = names.mknod
        self.symlink = names.symlink
        self.link = names.link
        self.unlink = names.unlink
        self.rmdir = names.rmdir
        self.rename = renames.rename
        self.flatten_redirects = renames.flatten_redirects
        # Data and attributes (unionfs.core.data_ops).
        self.setattr = data.setattr
        self.setxattr = data.setxattr
        self.removexattr = data.removexattr
        self.open = data.open
        self.release = data.release
        self.fsyncdir = data.fsyncdir

    def may_access(self, want: int, caller: Caller, mode: int, uid: int, gid: int) -> bool:
        """access(2) for an object shown with ``mode``/``uid``/``gid``; EROFS for writing a
        read-only union."""
        if want & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only union")
        return access_allowed(want, caller, mode, uid, gid)

    def link_from_index(self, parent: Node, name: str, layer: Layer, path: str,
                        st: os.stat_result) -> Node | None:
        return self.names.link_from_index(parent, name, layer, path, st)

    def copy_up(self, node: Node, truncate: bool = False) -> None:
        copy_up(self, node, truncate)
