"""The pyfuse3 adapter: one Operations class whose handlers delegate to the core.

Error boundary: only ``FUSEError`` leaves a handler. An ``OSError`` from the core carries the errno
the caller should see; anything else is a bug: it is logged once (with its traceback), answered with
EIO, and switches the filesystem to fail-safe mode, where every later write is refused with EIO so a
confused filesystem cannot damage the upper directory further.

Every handler runs on the trio thread and (except copy-up data and big reads) never awaits, which
is what pyfuse3 measures fastest. Large copy-ups run in a worker thread; other requests (even for
the same file) wait for that copy-up on a trio.Event instead of blocking the loop.

One request loop serves everything while no handler awaits: pyfuse3's own extra loops hand every
request from task to task through a trio lock, which costs about a fifth of the server's CPU time
per request. A handler about to wait for a copy-up first makes sure another loop is reading
requests (``spawn_session_loop``, provided by the server), so a big copy-up stalls nobody.

What the kernel keeps
---------------------
The rule: every attribute, size, entry and timeout given to the kernel is true for the whole time
the kernel may keep it; where the truth is not cheap, give nothing. The kernel believes what it
keeps: without writeback cache an O_APPEND write starts at the i_size it holds without asking, and
attributes in a READDIRPLUS reply overwrite fresher ones it had (fuse_change_attributes).

Everything changes through this mount (lower layers never change, and nobody else writes the
upper while it is mounted), so what is true now stays true until a request here changes it. Hence
long timeouts (``CACHE_TIMEOUT``) for entries, negative entries and attributes, with these duties:

* The attributes last given (``KernelCache.attrs_by_ino`` in unionfs.kernel_cache, by inode number;
  reused by lookup, getattr, setattr replies and listings) are dropped when ``UnionTree.touch``
  reports (``forget_on_change``) a node a change reaches: write (before the data lands), truncate and every setattr, open with O_TRUNC, copy-up (the node, its parent and
  the parents of its other names), create, mknod, mkdir, symlink (the parent), link and unlink
  (the node and the parent: nlink, ctime), rename (both parents, the source, a replaced target),
  setxattr and removexattr (ctime); and by ``read`` here (relatime may move the backing atime,
  and the kernel asks for atime again after a read). A removed node's attributes are never cached.
* ``node.st_hint`` (an lstat made by the lookup or create that is being answered) is used once,
  in that reply, and dropped by the same changes.
* Listings (``readdir``): an entry carries the node's cached attributes when they are known (true,
  as above), a fresh stat when callers look closer at what they list, and otherwise nothing -- a
  bare entry with node id 0, which the kernel takes as a plain READDIR entry and instantiates
  nothing from (unionfs.bare_entries; with its switch off every entry gets a stat). The kernel
  ignores the attributes of '.' and '..' in READDIRPLUS.
* A copy-up also changes what the kernel may hold (new ctimes of the node and its parents), and
  the request that caused it may be one after which the kernel asks nothing (an open for
  writing): ``UnionTree.on_copy_up`` has the kernel's attributes of those nodes invalidated.
* The kernel's own updates: after a write it sets i_size itself and asks for the rest again;
  after an open with O_TRUNC (atomic_o_trunc) it sets i_size 0 and drops its pages, so the open
  must truncate whatever the access mode. ``keep_cache`` keeps file pages across opens: the
  data changes only through this mount.
* Negative entries: a name appears only through create/mknod/mkdir/symlink/link/rename here,
  each of which replaces the kernel's negative dentry.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from unionfs.copy_ups import CopyUps
from unionfs.core import Caller, DirEntry, UnionFS
from unionfs.core.nodes import Node
from unionfs.kernel_cache import CACHE_TIMEOUT, KernelCache, statvfs_data
from unionfs.lowlevel_ops import fallocate_serving

log = logging.getLogger(__name__)

# The kernel asks for this before every write and chown of a file (to drop file capabilities); a
# file gains it only through setxattr, so a node that had none keeps none until the next setxattr.
CAPS_XATTR = b"security.capability"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_boundary(write: bool = False) -> Callable[[F], F]:
    """Translate errors at the handler boundary (see the module docstring)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        async def wrapper(self: UnionOperations, *args: Any) -> Any:
            if write and self.failed:
                raise pyfuse3.FUSEError(errno.EIO)
            try:
                return await func(self, *args)
            except pyfuse3.FUSEError:
                raise
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception:
                if not self.failed:
                    log.exception("unexpected error in %s; fail-safe mode: writes now fail with EIO",
                                  func.__name__)
                self.failed = True
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper  # type: ignore[return-value]

    return decorate


@dataclass(eq=False)
class FileHandle:
    """An open file: the backing descriptor the kernel's fh number stands for."""

    node: Node
    fd: int
    in_upper: bool
    flags: int
    pending_copy_up: bool = False  # writable open of a big lower file: copy-up deferred


@dataclass(eq=False)
class DirHandle:
    """An open directory: its merged listing, taken once at the first readdir."""

    node: Node
    entries: list[DirEntry] = field(default_factory=list)
    consumed: bool = False


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _invalidate_attrs(node: Node) -> None:
    """Make the kernel ask for ``node``'s attributes again. Safe inside any handler, unlike
    invalidate_entry: the kernel takes no directory lock for it."""
    try:
        pyfuse3.invalidate_inode(node.ino, attr_only=True)
    except OSError as e:  # the kernel has forgotten the node meanwhile: nothing cached to drop
        log.debug("invalidate_inode(%d): %s", node.ino, e)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


class UnionOperations(pyfuse3.Operations):
    """pyfuse3 handlers over a :class:`UnionFS` core."""

    def __init__(self, core: UnionFS, *, enable_acl: bool = False) -> None:
        super().__init__()
        self.core = core
        self.enable_acl = enable_acl
        self.failed = False
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_dir_fh = 1
        self._next_fh = 1
        # What this adapter keeps per node, by inode number (see the module docstring).
        self.cache = KernelCache(core)
        # The node's attributes as given to the kernel (the cache's own method: one call less on
        # the busiest path).
        self.attrs: Callable[[Node], pyfuse3.EntryAttributes] = self.cache.attrs
        self._forget_attrs = self.cache.attrs_by_ino.pop
        self.copy_ups = CopyUps(core, self.cache.size)
        self.copy_up = self.copy_ups.copy_up  # big files in a worker thread (unionfs.copy_ups)
        core.on_copy_up = self._copied_up

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _copied_up(node: Node) -> None:
        """A copy-up gave the node, its parent and the parents of its other names new ctimes
        (and the upper copy may count blocks differently): the kernel must ask again. The request
        that caused it may not be one after which the kernel asks by itself (an open for writing)."""
        for changed in (node, node.parent, *(p for p, _ in node.links)):
            if changed is not None and changed.lookups > 0:
                _invalidate_attrs(changed)

    @property
    def spawn_session_loop(self) -> Callable[[], None] | None:
        """Starts one more request loop (see unionfs.copy_ups); set by the server."""
        return self.copy_ups.spawn_session_loop

    @spawn_session_loop.setter
    def spawn_session_loop(self, spawn: Callable[[], None] | None) -> None:
        self.copy_ups.spawn_session_loop = spawn

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self.attrs(node)
        node.lookups += 1
        return attrs

    def _new_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The entry of an object just created: it has no file capabilities (only setxattr gives
        them)."""
        self.cache.no_caps.add(node.ino)
        return self._entry(node)

    def _mode(self, mode: int, ctx: pyfuse3.RequestContext) -> int:
        return mode if self.enable_acl else mode & ~ctx.umask

    async def _upper_handle(self, h: FileHandle) -> None:
        """Point a handle at the upper copy (after a deferred or concurrent copy-up)."""
        if h.pending_copy_up:
            await self.copy_ups.copy_up(h.node)
            h.pending_copy_up = False
        if not h.in_upper and h.node.in_upper and not h.node.deleted:
            layer, path = self.core.backing(h.node)
            keep = h.flags & (os.O_ACCMODE | os.O_SYNC | os.O_DSYNC)
            new_fd = os.open(path, keep | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=layer.fd)
            h.node.fds.append(new_fd)
            self._swap_fd(h, new_fd)

    def _add_file(self, h: FileHandle) -> int:
        # The kernel keeps the handle number for the life of the open file; the descriptor behind it
        # may change (a read-only lower descriptor is swapped for the upper copy's after copy-up).
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = h
        return fh

    def _swap_fd(self, h: FileHandle, new_fd: int) -> None:
        old = h.fd
        try:
            h.node.fds.remove(old)
        except ValueError:
            pass
        os.close(old)
        h.fd = new_fd
        h.in_upper = True

    # --- lookups and attributes ------------------------------------------------------------------

    @fuse_boundary()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.core.node(parent_inode)
        n = _name(name)
        if n == "..":
            node: Node | None = parent.parent or parent
        elif n == ".":
            node = parent
        else:
            node = self.core.lookup(parent, n)
        if node is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        if node.ino in self.cache.listed_bare:
            self.cache.looked_up(node)
        return self._entry(node)

    async def forget(self, inode_list: Any) -> None:
        table = self.core.table
        for ino, count in inode_list:
            try:
                node = table.get(ino)
                if node is not None:
                    table.forget(node, count)
            except Exception:
                log.exception("forget of inode %d failed", ino)

    @fuse_boundary()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.node(inode)
        return self.attrs(node)

    @fuse_boundary(write=True)
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.node(inode)
        size = attr.st_size if fields.update_size else None
        h = self.files.get(fh) if fh is not None else None
        if not node.deleted:
            await self.copy_up(node, truncate=size == 0)
        if h is not None and not h.in_upper:
            h.pending_copy_up = False
            await self._upper_handle(h)
        self.core.setattr(
            node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fd=h.fd if h is not None and h.in_upper else None,
        )
        return self.attrs(node)

    @fuse_boundary()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.core.readlink(self.core.node(inode)))

    # --- creating and removing -------------------------------------------------------------------

    @fuse_boundary(write=True)
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.mknod(self.core.node(parent_inode), _name(name), self._mode(mode, ctx), rdev,
                               _caller(ctx))
        return self._new_entry(node)

    @fuse_boundary(write=True)
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.mkdir(self.core.node(parent_inode), _name(name), self._mode(mode, ctx), _caller(ctx))
        return self._new_entry(node)

    @fuse_boundary(write=True)
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.symlink(self.core.node(parent_inode), _name(name), os.fsdecode(target), _caller(ctx))
        return self._new_entry(node)

    @fuse_boundary(write=True)
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.core.node(inode)
        await self.copy_up(node)
        node = self.core.link(node, self.core.node(new_parent_inode), _name(new_name))
        return self._entry(node)

    @fuse_boundary(write=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.core.node(parent_inode)
        child = self.core.lookup(parent, _name(name))
        if child is not None:
            await self.copy_ups.wait_for(child)
        self.core.unlink(parent, _name(name))

    @fuse_boundary(write=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.core.rmdir(self.core.node(parent_inode), _name(name))

    @fuse_boundary(write=True)
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        core = self.core
        oldp, newp = core.node(parent_inode_old), core.node(parent_inode_new)
        src = core.lookup(oldp, _name(name_old))
        if src is not None and not src.is_dir:
            await self.copy_up(src)
        dst = core.lookup(newp, _name(name_new))
        if dst is not None and not dst.is_dir and flags & pyfuse3.RENAME_EXCHANGE:
            await self.copy_up(dst)
        try:
            core.rename(oldp, _name(name_old), newp, _name(name_new), flags)
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                # The attempt may have changed the source's directory (RenameOps._refuse_nonempty_target
                # says when), and the kernel drops its cached attributes only after a rename that
                # succeeds.
                _invalidate_attrs(oldp)
            raise

    # --- files -----------------------------------------------------------------------------------

    @fuse_boundary()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.core.node(inode)
        # O_TRUNC truncates whatever the access mode (Linux's open does; with atomic_o_trunc the
        # kernel leaves it to this open and only drops its own cached size and pages).
        changes = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        pending = False
        if changes:
            if self.failed or self.core.readonly:
                raise pyfuse3.FUSEError(errno.EIO if self.failed else errno.EROFS)
            if not node.in_upper:
                if flags & os.O_TRUNC:
                    await self.copy_up(node, truncate=True)  # libfuse's atomic_o_trunc: no data to copy
                elif self.copy_ups.is_big(node):
                    # O_TRUNC reaches us later as setattr(size=0): copy no data for it.
                    pending = True
                else:
                    await self.copy_up(node)
            else:
                await self.copy_ups.wait_for(node)
        if pending:
            fd, in_upper = self.core.open(node, os.O_RDONLY)
        else:
            fd, in_upper = self.core.open(node, flags)
        info = pyfuse3.FileInfo(fh=self._add_file(FileHandle(node, fd, in_upper, flags, pending)))
        info.keep_cache = True
        return info

    @fuse_boundary(write=True)
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, fd = self.core.create(self.core.node(parent_inode), _name(name), self._mode(mode, ctx), flags,
                                    _caller(ctx))
        info = pyfuse3.FileInfo(fh=self._add_file(FileHandle(node, fd, True, flags)))
        info.keep_cache = True
        return info, self._new_entry(node)

    @fuse_boundary()
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.files[fh]
        if not h.in_upper and h.node.in_upper and not h.pending_copy_up:
            await self._upper_handle(h)
        # The read may move the backing file's atime (relatime), and the kernel asks for it again
        # after a read: the cached attributes would give the old one.
        self._forget_attrs(h.node.ino, None)
        return os.pread(h.fd, size, off)

    @fuse_boundary(write=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.files[fh]
        if not h.in_upper:
            await self._upper_handle(h)
        self.core.touch(h.node)
        return os.pwrite(h.fd, buf, off)

    async def flush(self, fh: int) -> None:
        # Writes reach the upper synchronously, so close() has nothing to flush: ENOSYS tells the
        # kernel to stop sending FLUSH at all (one round trip less per close).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_boundary()
    async def release(self, fh: int) -> None:
        h = self.files.get(fh)
        if h is None:
            return
        try:
            if h.pending_copy_up and not self.failed:
                await self.copy_up(h.node)  # a writable open copies up, even without a write
        finally:
            self.files.pop(fh, None)
            self.core.release(h.node, h.fd)

    @fuse_boundary()
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.files[fh]
        if h.in_upper:
            if datasync:
                os.fdatasync(h.fd)
            else:
                os.fsync(h.fd)

    @fuse_boundary(write=True)
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """FALLOCATE, delivered by unionfs.lowlevel_ops (pyfuse3 has no handler for it). The kernel
        sends it only on handles opened for writing; a lower file is copied up first."""
        h = self.files[fh]
        if not h.in_upper:
            await self._upper_handle(h)
        try:
            await fallocate_serving(h.fd, mode, offset, length)
        finally:
            self.core.touch(h.node)  # size, blocks and times changed: the cached attributes are stale

    # --- directories -----------------------------------------------------------------------------

    def is_directory_handle(self, fh: int) -> bool:
        """For unionfs.listing_cache: is ``fh`` (in a reply being sent) an open directory's?"""
        return fh in self.dirs

    @fuse_boundary()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.core.node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self.dirs[fh] = DirHandle(node)
        return fh

    @fuse_boundary()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.dirs[fh]
        node = d.node
        if start_id == 0 or not d.consumed:
            # A handle's first request may start past the beginning: the kernel serves the start of
            # a listing it cached (FOPEN_CACHE_DIR) and asks for the rest on a new handle, and
            # seekdir on a fresh descriptor does the same. Offsets index the node's listing, which
            # stays the same while the directory does.
            if start_id == 0 and d.consumed or not d.entries:
                d.entries = self.core.list_dir(node)
            d.consumed = True
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self.attrs(node), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = node.parent or node
            if not pyfuse3.readdir_reply(token, b"..", self.attrs(parent), 2):
                return
            start_id = 2
        self.cache.send_entries(token, node, d.entries, start_id - 2)

    @fuse_boundary()
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_boundary()
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.core.fsyncdir(self.dirs[fh].node)

    # --- misc ------------------------------------------------------------------------------------

    @fuse_boundary()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_data(self.core.statfs())

    @fuse_boundary()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.core.node(inode)
        if name != CAPS_XATTR:
            return self.core.getxattr(node, _name(name))
        if node.ino in self.cache.no_caps:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return self.core.getxattr(node, _name(name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                self.cache.no_caps.add(node.ino)
            raise

    @fuse_boundary()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self.core.listxattr(self.core.node(inode))]

    @fuse_boundary(write=True)
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.core.node(inode)
        await self.copy_up(node)
        self.cache.no_caps.discard(node.ino)
        self.core.setxattr(node, _name(name), value)

    @fuse_boundary(write=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.core.node(inode)
        self.core.getxattr(node, _name(name))
        await self.copy_up(node)
        self.cache.no_caps.discard(node.ino)
        self.core.removexattr(node, _name(name))

    @fuse_boundary()
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        node = self.core.node(inode)
        a = self.attrs(node)
        return self.core.may_access(mode, _caller(ctx), a.st_mode, a.st_uid, a.st_gid)
