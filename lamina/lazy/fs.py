"""The pyfuse3 adapter over :class:`lamina.lazy.tree.LazyTree`: a read-only filesystem of lazy layers.

Thin on purpose: each handler asks the tree and copies the answer. Error boundary (as in
``unionfs.fuse_ops``): only ``FUSEError`` leaves a handler; an ``OSError`` from the tree keeps its
errno; a chunk that cannot be fetched or verified is EIO (logged once, as one line, by the chunk
source); anything unexpected is logged with its traceback and answered EIO.

Timeouts: the tree never changes and every attribute in it was verified, so the kernel may keep
entries and attributes as long as it wants (a day here). Reads go to a worker thread: a fetch blocks
on the network, and the event loop must go on answering lookups meanwhile.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from lamina.errors import LaminaError
from lamina.lazy.tree import LazyTree, Node

log = logging.getLogger(__name__)

FOREVER = 24 * 3600.0
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_boundary(handler: F) -> F:
    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except LaminaError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


class LazyOperations(pyfuse3.Operations):
    """Read-only operations on a :class:`LazyTree`."""

    def __init__(self, tree: LazyTree) -> None:
        super().__init__()
        self.tree = tree

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attributes()
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = FOREVER
        attrs.attr_timeout = FOREVER
        attrs.st_mode, attrs.st_nlink, attrs.st_uid, attrs.st_gid = a.mode, a.nlink, a.uid, a.gid
        attrs.st_rdev, attrs.st_size, attrs.st_blksize, attrs.st_blocks = a.rdev, a.size, 4096, a.blocks
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = a.mtime * 1_000_000_000
        return attrs

    @fuse_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if text == ".":
            return self._attrs(self.tree.node(parent_inode))
        if text == "..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel resolves ".." itself
        return self._attrs(self.tree.lookup(parent_inode, text))

    @fuse_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.tree.node(inode))

    @fuse_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        if node.entry.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.entry.link_name)

    @fuse_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.tree.node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for index, (name, node) in enumerate(self.tree.listing(fh)):
            if index < start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    @fuse_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.entry.type != "reg":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.tree.read, fh, off, size)

    async def release(self, fh: int) -> None:
        pass

    @fuse_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.tree.has_xattrs:
            # ENOSYS: the kernel answers EOPNOTSUPP itself from now on, without asking us (unionfs
            # asks every lower file for its overlay and owner xattrs: a round trip each otherwise).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = self.tree.node(inode).entry.xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if not self.tree.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return [os.fsencode(name) for name in self.tree.node(inode).entry.xattrs]

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.tree.nodes)
        data.f_namemax = 255
        return data

    async def forget(self, inode_list: Any) -> None:
        pass  # every node lives as long as the mount
