"""Let the kernel keep directory listings in its page cache, which pyfuse3 3.5 cannot ask for.

FUSE lets a filesystem answer ``opendir`` with two flags: FOPEN_CACHE_DIR (keep the entries that
readdir returns in the directory's page cache) and FOPEN_KEEP_CACHE (do not drop that cache when the
directory is opened again). With both, a second listing of an unchanged directory is served by the
kernel alone: no READDIRPLUS request and no Python at all. The kernel drops the cache itself
whenever the directory changes through the mount (create, unlink, rename, ...) or its mtime moves;
nothing else changes a mounted union, so keeping it is always right here. fuse-overlayfs does the
same. Without it every ``ls`` of a 10,000-entry directory costs ~20 ms of requests instead of ~2 ms.

pyfuse3 fills libfuse's ``struct fuse_file_info`` for ``opendir`` with the handle number only, then
calls libfuse's ``fuse_reply_open``. This module points pyfuse3's import of that one function (its
GOT slot, found from the extension's ELF relocations) at a small wrapper that sets the two flag bits
when the handle is an open directory, then calls the real function. The bits' positions are part of
libfuse 3's ABI (struct fuse_file_info: ``int flags``, then the bit-fields ``writepage``,
``direct_io``, ``keep_cache``, ``flush``, ``nonseekable``, ``flock_release``, ``cache_readdir``, ...,
then ``uint64_t fh`` at byte 16), which programs built against any libfuse 3 rely on.

Anything unexpected (another architecture, a pyfuse3 that is not a shared object, a slot that
does not hold what it should), or ``LAMINA_NO_PATCHES=1`` (see :mod:`unionfs.startup`), leaves
pyfuse3 untouched: listings then simply are not cached. The ELF work is :mod:`unionfs.got`'s.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable

from unionfs import startup
from unionfs.got import Unsupported as _Unsupported
from unionfs.got import check_machine
from unionfs.got import import_slot_offset as _import_slot_offset
from unionfs.got import mapping_span as _mapping_span
from unionfs.got import mappings as _mappings
from unionfs.got import write_pointer as _write_pointer

log = logging.getLogger(__name__)

_KEEP_CACHE_BIT = 1 << 2  # struct fuse_file_info bit-field word (byte 4): keep_cache
_CACHE_READDIR_BIT = 1 << 6  # ... cache_readdir
_FLAGS_WORD_OFFSET = 4
_FH_OFFSET = 16

_REPLY_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

# Kept alive for the life of the process: the slot points at this callback from then on.
_installed: list[object] = []


def enable(is_directory_handle: Callable[[int], bool], *, extension_path: str | None = None,
           libfuse_name: str = "libfuse3.so.3", forward_to: int | None = None) -> bool:
    """Make pyfuse3's opendir replies ask the kernel to cache listings. True when in place.

    ``is_directory_handle(fh)`` tells a handle returned by ``opendir`` from one returned by ``open``
    (which shares ``fuse_reply_open``; the flags would be harmless there, but are not set).
    ``forward_to``: the address of the function the wrapper calls instead of libfuse's (tests).
    """
    if _installed:
        return True
    if not startup.patches_enabled():
        log.debug("listing cache: off (%s)", startup.NO_PATCHES_ENV)
        return False
    try:
        check_machine()
        if extension_path is None:
            import pyfuse3

            extension_path = os.path.realpath(pyfuse3.__file__ or "")
        libfuse = ctypes.CDLL(libfuse_name)
        real = ctypes.cast(libfuse.fuse_reply_open, ctypes.c_void_p).value
        if not real:
            raise _Unsupported("libfuse has no fuse_reply_open")
        mappings = _mappings()
        start, end = _mapping_span(mappings, extension_path)
        slot = start + _import_slot_offset(extension_path, b"fuse_reply_open")
        current = ctypes.c_void_p.from_address(slot).value
        if current != real and not (start <= (current or 0) < end):
            raise _Unsupported(f"the slot holds {current!r}, neither libfuse's function nor a lazy stub")
    except (OSError, ValueError, AttributeError, IndexError, struct.error, _Unsupported) as e:
        log.debug("listing cache: not enabled: %s", e)
        return False

    call_real = _REPLY_OPEN(forward_to or real)

    def reply_open(req: int | None, fi: int | None) -> int:
        try:
            if fi and is_directory_handle(ctypes.c_uint64.from_address(fi + _FH_OFFSET).value):
                word = ctypes.c_uint32.from_address(fi + _FLAGS_WORD_OFFSET)
                word.value |= _KEEP_CACHE_BIT | _CACHE_READDIR_BIT
        except Exception:  # never keep the kernel's request from its reply
            log.exception("listing cache: could not mark an opendir reply")
        return int(call_real(req, fi))

    callback = _REPLY_OPEN(reply_open)
    try:
        _write_pointer(slot, ctypes.cast(callback, ctypes.c_void_p).value or 0, mappings)
    except OSError as e:
        log.debug("listing cache: not enabled: %s", e)
        return False
    _installed.extend((callback, call_real, slot, current))
    log.debug("listing cache: opendir replies ask the kernel to cache listings")
    return True


def disable() -> None:
    """Give pyfuse3 its own import back (tests)."""
    if _installed:
        _callback, _call_real, slot, original = _installed
        _write_pointer(int(slot), int(original), _mappings())  # type: ignore[call-overload]
        _installed.clear()
