"""Find and rewrite the GOT slot through which a loaded ELF object calls an imported function.

pyfuse3 3.5 does not expose parts of libfuse that a union filesystem needs (FOPEN_CACHE_DIR on
opendir, the FALLOCATE request). Its extension calls libfuse through its global offset table, so
pointing one slot at a ctypes callback changes what that one call does, for pyfuse3 only. This
module holds the ELF reading and the pointer writing; :mod:`unionfs.listing_cache` and
:mod:`unionfs.lowlevel_ops` decide what to put there, and check everything first.

Only x86_64 relocation types are understood; anything else raises :class:`Unsupported`, and callers
then leave pyfuse3 as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys

_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_SHT_RELA = 4
_PT_LOAD = 1
_PROT_READ = 1
_PROT_WRITE = 2
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

Mappings = list[tuple[int, int, str, str]]


class Unsupported(Exception):
    """The object, the machine or the slot is not what the patch expects: leave it alone."""


def check_machine() -> None:
    """Raise :class:`Unsupported` unless this is a little-endian x86_64 process."""
    if sys.byteorder != "little" or os.uname().machine != "x86_64" or struct.calcsize("P") != 8:
        raise Unsupported(f"not on x86_64 ({os.uname().machine})")


def pyfuse3_extension() -> str:
    """The path of pyfuse3's loaded extension module (importing pyfuse3)."""
    import pyfuse3

    return os.path.realpath(pyfuse3.__file__ or "")


def import_slot(path: str, symbol: bytes, mappings: Mappings) -> tuple[int, int, int]:
    """(slot address, first address, end address) of the loaded object ``path``'s GOT slot for
    ``symbol``, in this process."""
    start, end = mapping_span(mappings, path)
    return start + import_slot_offset(path, symbol), start, end


def import_slot_offset(path: str, symbol: bytes) -> int:
    """Where, from the start of the loaded object ``path``, lies the GOT slot through which it
    calls ``symbol``."""
    slot = _import_slots(path).get(symbol)
    if slot is None:
        raise Unsupported(f"{path}: no relocation for {symbol.decode()}")
    return slot


@functools.lru_cache(maxsize=4)
def _import_slots(path: str) -> dict[bytes, int]:
    """Every imported symbol's GOT slot in ``path``, as offsets from the object's start. Reads
    only the headers and tables it needs (the object is megabytes), once per object."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = os.pread(fd, 64, 0)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise Unsupported(f"{path}: not a little-endian 64-bit ELF object")
        e_phoff, e_shoff = struct.unpack_from("<QQ", header, 0x20)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", header, 0x36)
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize) per section
        sections = list(struct.iter_unpack("<IIQQQQIIQQ", os.pread(fd, e_shnum * e_shentsize, e_shoff)))

        def contents(index: int) -> bytes:
            return os.pread(fd, sections[index][5], sections[index][4])

        programs = struct.iter_unpack("<IIQQQQQQ", os.pread(fd, e_phnum * e_phentsize, e_phoff))
        first_load = min(p_vaddr for p_type, _flags, _offset, p_vaddr, *_rest in programs if p_type == _PT_LOAD)
        base = first_load & ~(_PAGE_SIZE - 1)
        slots: dict[bytes, int] = {}
        for _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize in sections:
            if sh_type != _SHT_RELA or not sh_entsize:
                continue
            strings = contents(sections[sh_link][6])
            names = [strings[st_name:strings.index(b"\0", st_name)]
                     for st_name, *_rest in struct.iter_unpack("<IBBHQQ", contents(sh_link))]
            for r_offset, r_info, _addend in struct.iter_unpack("<QQq", os.pread(fd, sh_size, sh_offset)):
                if r_info & 0xFFFFFFFF in (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT) and r_info >> 32:
                    slots.setdefault(names[r_info >> 32], int(r_offset) - base)
    finally:
        os.close(fd)
    return slots


def mappings() -> Mappings:
    """This process's memory mappings: (start, end, permissions, path) from /proc/self/maps."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found.append((lo, hi, fields[1], fields[5].strip() if len(fields) == 6 else ""))
    return found


def mapping_span(mappings: Mappings, path: str) -> tuple[int, int]:
    """First and last address of the loaded object ``path``."""
    real = os.path.realpath(path)
    spans = [(lo, hi) for lo, hi, _perms, mapped in mappings if mapped == real]
    if not spans:
        raise Unsupported(f"{path} is not loaded")
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def write_pointer(address: int, value: int, mappings: Mappings) -> None:
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
