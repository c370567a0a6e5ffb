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
does not hold what it should) leaves pyfuse3 untouched: listings then simply are not cached.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

_KEEP_CACHE_BIT = 1 << 2  # struct fuse_file_info bit-field word (byte 4): keep_cache
_CACHE_READDIR_BIT = 1 << 6  # ... cache_readdir
_FLAGS_WORD_OFFSET = 4
_FH_OFFSET = 16

_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_SHT_RELA = 4
_PT_LOAD = 1
_PROT_READ = 1
_PROT_WRITE = 2
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_REPLY_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

# Kept alive for the life of the process: the slot points at this callback from then on.
_installed: list[object] = []


class _Unsupported(Exception):
    pass


def enable(is_directory_handle: Callable[[int], bool], *, extension_path: str | None = None,
           libfuse_name: str = "libfuse3.so.3", forward_to: int | None = None) -> bool:
    """Make pyfuse3's opendir replies ask the kernel to cache listings. True when in place.

    ``is_directory_handle(fh)`` tells a handle returned by ``opendir`` from one returned by ``open``
    (which shares ``fuse_reply_open``; the flags would be harmless there, but are not set).
    ``forward_to``: the address of the function the wrapper calls instead of libfuse's (tests).
    """
    if _installed:
        return True
    if sys.byteorder != "little" or os.uname().machine != "x86_64" or struct.calcsize("P") != 8:
        log.debug("listing cache: not on x86_64; listings are not cached by the kernel")
        return False
    try:
        if extension_path is None:
            import pyfuse3

            extension_path = os.path.realpath(pyfuse3.__file__ or "")
        libfuse = ctypes.CDLL(libfuse_name)
        real = ctypes.cast(libfuse.fuse_reply_open, ctypes.c_void_p).value
        if not real:
            raise _Unsupported("libfuse has no fuse_reply_open")
        slot = _import_slot(extension_path, b"fuse_reply_open")
        current = ctypes.c_void_p.from_address(slot).value
        start, end = _mapping_span(extension_path)
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
        _write_pointer(slot, ctypes.cast(callback, ctypes.c_void_p).value or 0)
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
        _write_pointer(int(slot), int(original))  # type: ignore[call-overload]
        _installed.clear()


def _import_slot(path: str, symbol: bytes) -> int:
    """The address of the GOT slot through which the loaded shared object ``path`` calls ``symbol``."""
    with open(path, "rb") as f:
        image = f.read()
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise _Unsupported(f"{path}: not a little-endian 64-bit ELF object")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", image, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum) = struct.unpack_from("<HHHH", image, 0x36)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    offset = None
    for _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize in sections:
        if sh_type != _SHT_RELA or not sh_entsize:
            continue
        symtab = sections[sh_link]
        strtab = sections[symtab[6]]
        for r in range(sh_size // sh_entsize):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", image, sh_offset + r * sh_entsize)
            if r_info & 0xFFFFFFFF not in (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT):
                continue
            st_name = struct.unpack_from("<I", image, symtab[4] + (r_info >> 32) * symtab[9])[0]
            name_at = strtab[4] + st_name
            if image[name_at:image.index(b"\0", name_at)] == symbol:
                offset = r_offset
                break
        if offset is not None:
            break
    if offset is None:
        raise _Unsupported(f"{path}: no relocation for {symbol.decode()}")
    first_load = min(
        struct.unpack_from("<IIQQ", image, e_phoff + i * e_phentsize)[3]
        for i in range(e_phnum)
        if struct.unpack_from("<I", image, e_phoff + i * e_phentsize)[0] == _PT_LOAD
    )
    start, _end = _mapping_span(path)
    return start - (first_load & ~(_PAGE_SIZE - 1)) + offset


def _mapping_span(path: str) -> tuple[int, int]:
    """First and last address of the loaded object ``path`` in this process (from /proc/self/maps)."""
    real = os.path.realpath(path)
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    if not spans:
        raise _Unsupported(f"{path} is not loaded")
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def _write_pointer(address: int, value: int) -> None:
    """Store a pointer, making its page writable for the moment if it is read-only (RELRO)."""
    page = address & ~(_PAGE_SIZE - 1)
    writable = True
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split(maxsplit=2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                writable = "w" in perms
                break
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if not writable and libc.mprotect(page, _PAGE_SIZE, _PROT_READ | _PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    ctypes.c_void_p.from_address(address).value = value
    if not writable:
        libc.mprotect(page, _PAGE_SIZE, _PROT_READ)
