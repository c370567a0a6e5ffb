"""FALLOCATE for a pyfuse3 server: a libfuse low-level operation that pyfuse3 3.5 cannot register.

pyfuse3 fills a static ``struct fuse_lowlevel_ops`` in its extension and hands it to libfuse's
``fuse_session_new`` in ``pyfuse3.init``; libfuse copies the struct into the session there, and
the struct has no ``fallocate`` (nor ``copy_file_range`` or ``lseek``). libfuse answers a request
without an operation with ENOSYS, and the kernel then returns EOPNOTSUPP for every later
fallocate(2) on the mount.

:func:`install` points pyfuse3's import of ``fuse_session_new`` (its GOT slot, found as in
:mod:`unionfs.listing_cache`) at a wrapper, for the one call ``pyfuse3.init`` makes: the wrapper
copies pyfuse3's struct, sets ``fallocate`` in the copy to a ctypes callback, hands the copy to
libfuse, and gives pyfuse3 its import back. The callback runs on the trio thread (inside pyfuse3's
request loop); it only starts a trio task (:func:`start` says where) that runs the handler, which
may await a copy-up, and then answers with ``fuse_reply_err``.

What reaches the handler: the kernel's FUSE client forwards only the modes 0, KEEP_SIZE,
PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE(|KEEP_SIZE) (fs/fuse/file.c, fuse_file_fallocate); it refuses
the others (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, ...) with EOPNOTSUPP itself, for
fuse-overlayfs too. Only handles opened for writing get there (vfs_fallocate checks).

Preconditions, checked before anything is changed (otherwise pyfuse3 is left alone and fallocate
keeps answering EOPNOTSUPP): ``LAMINA_NO_PATCHES`` unset (:func:`unionfs.startup.patches_enabled`),
x86_64, libfuse 3, a GOT slot for ``fuse_session_new`` that holds libfuse's function or a lazy
stub; and in the call itself a struct whose layout matches libfuse 3's ABI as this module knows it:
``lookup`` and ``readdirplus`` point into pyfuse3's extension and ``fallocate`` is empty.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from unionfs import got, startup

log = logging.getLogger(__name__)

# offsetof(struct fuse_lowlevel_ops, ...) in libfuse 3 (pointer-sized members, fixed since 3.0).
_LOOKUP_OFFSET = 2 * 8
_FALLOCATE_OFFSET = 40 * 8
_READDIRPLUS_OFFSET = 41 * 8
_FH_OFFSET = 16  # struct fuse_file_info: uint64_t fh
FALLOC_FL_PUNCH_HOLE = 0x02
THREAD_FALLOCATE_BYTES = 64 << 20

_SESSION_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_void_p)
_FALLOCATE_OP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p)

# (fh, mode, offset, length); raises pyfuse3.FUSEError to answer with an errno.
FallocateHandler = Callable[[int, int, int, int], Awaitable[None]]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate has none). Raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


async def fallocate_serving(fd: int, mode: int, offset: int, length: int) -> None:
    """:func:`fallocate` from a request handler: on the trio thread, like a write, unless it may
    take long (allocating a big range: tmpfs clears every page), which a worker thread does while
    other requests go on. A thread hop costs more than a small call (measured: ~2x per call)."""
    if length > THREAD_FALLOCATE_BYTES and not mode & FALLOC_FL_PUNCH_HOLE:
        import trio

        await trio.to_thread.run_sync(fallocate, fd, mode, offset, length)
    else:
        fallocate(fd, mode, offset, length)


class _State:
    def __init__(self) -> None:
        self.handler: FallocateHandler | None = None
        self.start_soon: Callable[..., Any] | None = None
        self.active = False  # the session pyfuse3 made carries the operation
        self.keep: list[object] = []  # callbacks libfuse or a GOT slot points at: alive for good
        self.reply_err: Any = None


_state = _State()


def install(handler: FallocateHandler, *, libfuse_name: str = "libfuse3.so.3",
            extension_path: str | None = None) -> bool:
    """Before ``pyfuse3.init``: have the session it makes send FALLOCATE to ``handler``.

    True when the wrapper is in place for that call (whether the struct then passes the layout
    check shows in :func:`active` after ``pyfuse3.init``). False, with pyfuse3 untouched, when a
    precondition fails.
    """
    if _state.handler is not None:
        _state.handler = handler
        return True
    if not startup.patches_enabled():
        log.debug("fallocate: off (%s)", startup.NO_PATCHES_ENV)
        return False
    try:
        got.check_machine()
        libfuse = ctypes.CDLL(libfuse_name)
        version = int(libfuse.fuse_version())
        if not 300 <= version < 400:
            raise got.Unsupported(f"libfuse version {version}, not 3.x")
        real = ctypes.cast(libfuse.fuse_session_new, ctypes.c_void_p).value
        reply_err = libfuse.fuse_reply_err
        reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        reply_err.restype = ctypes.c_int
        mappings = got.mappings()
        slot, start, end = got.import_slot(extension_path or got.pyfuse3_extension(), b"fuse_session_new",
                                           mappings)
        current = ctypes.c_void_p.from_address(slot).value
        if not real or (current != real and not start <= (current or 0) < end):
            raise got.Unsupported(f"the slot holds {current!r}, neither libfuse's function nor a lazy stub")
    except (OSError, ValueError, AttributeError, IndexError, struct.error, got.Unsupported) as e:
        log.debug("fallocate: not available: %s", e)
        return False

    call_real = _SESSION_NEW(real)
    operation = _FALLOCATE_OP(_on_fallocate)

    def session_new(args: int | None, ops: int | None, op_size: int, userdata: int | None) -> int | None:
        try:
            got.write_pointer(slot, current or 0, got.mappings())  # one call only: give it back
        except OSError:
            log.exception("fallocate: could not give pyfuse3 its fuse_session_new back")
        ops_for_libfuse = ops
        try:
            copy = _ops_with_fallocate(ops or 0, op_size, ctypes.cast(operation, ctypes.c_void_p).value or 0,
                                       (start, end))
            _state.keep.append(copy)
            ops_for_libfuse = ctypes.addressof(copy)
            _state.active = True
            log.debug("fallocate: the session answers FALLOCATE")
        except got.Unsupported as e:
            log.debug("fallocate: not available: %s", e)
        except Exception:  # never keep pyfuse3 from its session
            log.exception("fallocate: not available")
        return call_real(args, ops_for_libfuse, op_size, userdata)

    wrapper = _SESSION_NEW(session_new)
    try:
        got.write_pointer(slot, ctypes.cast(wrapper, ctypes.c_void_p).value or 0, mappings)
    except OSError as e:
        log.debug("fallocate: not available: %s", e)
        return False
    _state.keep.extend((wrapper, call_real, operation))
    _state.handler = handler
    _state.reply_err = reply_err
    return True


def _ops_with_fallocate(ops: int, op_size: int, operation: int, extension: tuple[int, int]) -> ctypes.Array[Any]:
    """A copy of pyfuse3's ``struct fuse_lowlevel_ops`` at ``ops`` with ``fallocate`` set."""
    if not ops or op_size < _READDIRPLUS_OFFSET + 8:
        raise got.Unsupported(f"operations struct of {op_size} bytes")
    start, end = extension

    def pointer_at(offset: int) -> int:
        return ctypes.c_void_p.from_address(ops + offset).value or 0

    if not (start <= pointer_at(_LOOKUP_OFFSET) < end and start <= pointer_at(_READDIRPLUS_OFFSET) < end):
        raise got.Unsupported("lookup/readdirplus are not pyfuse3's: unknown struct layout")
    if pointer_at(_FALLOCATE_OFFSET):
        raise got.Unsupported("pyfuse3 sets fallocate itself")
    copy = (ctypes.c_char * op_size)()
    ctypes.memmove(copy, ops, op_size)
    ctypes.c_void_p.from_buffer(copy, _FALLOCATE_OFFSET).value = operation
    return copy


def active() -> bool:
    """Whether the session pyfuse3 made answers FALLOCATE through the handler."""
    return _state.active


def start(start_soon: Callable[..., Any] | None) -> None:
    """Where FALLOCATE requests run: a trio nursery's ``start_soon`` in the run that serves the
    mount (None: answer EOPNOTSUPP)."""
    _state.start_soon = start_soon


def _on_fallocate(req: int | None, ino: int, mode: int, offset: int, length: int, fi: int | None) -> None:
    try:
        if _state.start_soon is None or _state.handler is None or not fi:
            _state.reply_err(req, errno.EOPNOTSUPP)
            return
        fh = ctypes.c_uint64.from_address(fi + _FH_OFFSET).value
        _state.start_soon(_answer, req, fh, mode, offset, length)
    except Exception:  # the kernel's caller waits for a reply: give one
        log.exception("fallocate: could not start the request")
        _state.reply_err(req, errno.EIO)


async def _answer(req: int, fh: int, mode: int, offset: int, length: int) -> None:
    import pyfuse3

    assert _state.handler is not None
    code = errno.EIO
    try:
        await _state.handler(fh, mode, offset, length)
        code = 0
    except pyfuse3.FUSEError as e:
        code = e.errno
    except Exception:
        log.exception("fallocate: unexpected error")
    finally:
        # Also when cancelled (the mount is going away): the request is answered before the
        # session that owns it is destroyed, which happens only after the trio run ends.
        _state.reply_err(req, code)
