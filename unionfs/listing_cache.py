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


def _import_slot_offset(path: str, symbol: bytes) -> int:
    """Where, from the start of the loaded object ``path``, lies the GOT slot through which it
    calls ``symbol``. Reads only the headers and tables it needs (the object is megabytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = os.pread(fd, 64, 0)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise _Unsupported(f"{path}: not a little-endian 64-bit ELF object")
        e_phoff, e_shoff = struct.unpack_from("<QQ", header, 0x20)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", header, 0x36)
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize) per section
        sections = list(struct.iter_unpack("<IIQQQQIIQQ", os.pread(fd, e_shnum * e_shentsize, e_shoff)))

        def contents(index: int) -> bytes:
            return os.pread(fd, sections[index][5], sections[index][4])

        slot = None
        for _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize in sections:
            if sh_type != _SHT_RELA or not sh_entsize:
                continue
            strings = contents(sections[sh_link][6])
            wanted = [index for index, (st_name, *_rest) in enumerate(struct.iter_unpack("<IBBHQQ", contents(sh_link)))
                      if strings.startswith(symbol + b"\0", st_name)]
            infos = {index << 32 | kind for index in wanted for kind in (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT)}
            relocations = struct.iter_unpack("<QQq", os.pread(fd, sh_size, sh_offset))
            slot = next((r_offset for r_offset, r_info, _addend in relocations if r_info in infos), None)
            if slot is not None:
                break
        if slot is None:
            raise _Unsupported(f"{path}: no relocation for {symbol.decode()}")
        programs = struct.iter_unpack("<IIQQQQQQ", os.pread(fd, e_phnum * e_phentsize, e_phoff))
        first_load = min(p_vaddr for p_type, _flags, _offset, p_vaddr, *_rest in programs if p_type == _PT_LOAD)
    finally:
        os.close(fd)
    return int(slot) - (first_load & ~(_PAGE_SIZE - 1))


def _mappings() -> list[tuple[int, int, str, str]]:
    """This process's memory mappings: (start, end, permissions, path) from /proc/self/maps."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found.append((lo, hi, fields[1], fields[5].strip() if len(fields) == 6 else ""))
    return found


def _mapping_span(mappings: list[tuple[int, int, str, str]], path: str) -> tuple[int, int]:
    """First and last address of the loaded object ``path``."""
    real = os.path.realpath(path)
    spans = [(lo, hi) for lo, hi, _perms, mapped in mappings if mapped == real]
    if not spans:
        raise _Unsupported(f"{path} is not loaded")
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def _write_pointer(address: int, value: int, mappings: list[tuple[int, int, str, str]]) -> None:
    """Store a pointer, making its page writable for the moment if it is read-only (RELRO)."""
    page = address & ~(_PAGE_SIZE - 1)
    writable = next(("w" in perms for lo, hi, perms, _path in mappings if lo <= address < hi), True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if not writable and libc.mprotect(page, _PAGE_SIZE, _PROT_READ | _PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    ctypes.c_void_p.from_address(address).value = value
    if not writable:
        libc.mprotect(page, _PAGE_SIZE, _PROT_READ)
