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

Why not a way that leaves pyfuse3's relocations alone (looked for again, 2026-12):

* pyfuse3 3.5.0, the newest release on PyPI, answers ``opendir`` with a handle number only
  (handlers.pxi: ``c.fi.fh = await operations.opendir(...)``, then ``fuse_reply_open``); its
  ``FileInfo`` (fh, direct_io, keep_cache, nonseekable) serves ``open`` and ``create`` alone, and
  has no ``cache_readdir``. Its README says no new features are planned, pull requests may be
  accepted: an ``opendir`` that may return a ``FileInfo`` with ``cache_readdir`` is the clean fix,
  and this module should go once a release has it.
* libfuse's low-level API has no session-wide switch; the flag exists only in the opendir reply.
* The kernel's "no opendir" mode (answer the first OPENDIR with ENOSYS; Linux then opens every
  directory itself with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR and never sends OPENDIR or RELEASEDIR
  again) needs no patch, but every READDIRPLUS then carries handle 0, and pyfuse3's ``readdir``
  is given the handle and not the inode: the server could not tell which directory is listed.
  (Tried on Linux 6.18 with pyfuse3 3.5: one OPENDIR, answered ENOSYS; the second and third
  listings sent no READDIRPLUS; every READDIRPLUS had handle 0.)

Trick "listing-cache" of the inventory in :mod:`unionfs.startup`: ``LAMINA_NO_PATCHES=1`` leaves
pyfuse3 untouched. So does any failed precondition, each checked before anything is written, and
each logged (INFO) with the reason; listings then simply are not cached:

* the machine: x86_64 (the relocation types :mod:`unionfs.got` reads, the struct layout);
* the symbol: pyfuse3's extension imports ``fuse_reply_open`` through a GOT slot (a pyfuse3 with
  libfuse linked in statically has none);
* the linking: that slot is bound to ``fuse_reply_open`` of a loaded libfuse 3 shared object, at
  least 3.5 (where ``cache_readdir`` appeared), and the wrapper forwards to exactly that function,
  even when pyfuse3 brings its own copy of libfuse;
* a self-test, when the server mounts (:func:`enable` is called just before ``pyfuse3.init``):
  after the slot is written it must read back as the wrapper, and a call through it with a probe
  ``fuse_file_info`` (declared with named bit-fields, so the C compiler's layout rules and not this
  module's masks decide where ``cache_readdir`` is) must set exactly the two flags for a directory
  handle and nothing for another handle. Otherwise the slot is given back (logged as a WARNING).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable

from unionfs import got, startup

log = logging.getLogger(__name__)

_KEEP_CACHE_BIT = 1 << 2  # struct fuse_file_info bit-field word (byte 4): keep_cache
_CACHE_READDIR_BIT = 1 << 6  # ... cache_readdir
_FLAGS_WORD_OFFSET = 4
_FH_OFFSET = 16
_LIBFUSE_WITH_CACHE_READDIR = 305  # fuse_version() of libfuse 3.5: FUSE_MAKE_VERSION(3, 5)

_REPLY_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class FileInfo(ctypes.Structure):
    """libfuse 3's ``struct fuse_file_info`` up to ``poll_events`` (fuse_common.h), for the self-test:
    the bit-fields are named, so ctypes lays them out by the platform's C rules."""

    _fields_ = [("flags", ctypes.c_int32),
                ("writepage", ctypes.c_uint32, 1), ("direct_io", ctypes.c_uint32, 1),
                ("keep_cache", ctypes.c_uint32, 1), ("flush", ctypes.c_uint32, 1),
                ("nonseekable", ctypes.c_uint32, 1), ("flock_release", ctypes.c_uint32, 1),
                ("cache_readdir", ctypes.c_uint32, 1), ("noflush", ctypes.c_uint32, 1),
                ("padding", ctypes.c_uint32, 24), ("padding2", ctypes.c_uint32),
                ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64), ("poll_events", ctypes.c_uint32)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


class _Wrapper:
    """What pyfuse3's slot points at: marks directory replies, then calls libfuse's function."""

    def __init__(self, is_directory_handle: Callable[[int], bool], forward_to: int) -> None:
        self.is_directory_handle = is_directory_handle
        self.forward = _REPLY_OPEN(forward_to)
        self.probe_handle: int | None = None  # during the self-test: the one directory handle

    def __call__(self, req: int | None, fi: int | None) -> int:
        try:
            if fi:
                fh = ctypes.c_uint64.from_address(fi + _FH_OFFSET).value
                if fh == self.probe_handle if self.probe_handle is not None else self.is_directory_handle(fh):
                    word = ctypes.c_uint32.from_address(fi + _FLAGS_WORD_OFFSET)
                    word.value |= _KEEP_CACHE_BIT | _CACHE_READDIR_BIT
        except Exception:  # never keep the kernel's request from its reply
            log.exception("listing cache: could not mark an opendir reply")
        return int(self.forward(req, fi))


# Kept alive for the life of the process: the slot points at the callback from then on.
_installed: list[object] = []


def enable(is_directory_handle: Callable[[int], bool], *, extension_path: str | None = None,
           forward_to: int | None = None) -> bool:
    """Make pyfuse3's opendir replies ask the kernel to cache listings. True when in place.

    ``is_directory_handle(fh)`` tells a handle returned by ``opendir`` from one returned by ``open``
    (which shares ``fuse_reply_open``; the flags would be harmless there, but are not set).
    ``forward_to``: the address of the function the wrapper calls instead of libfuse's (tests).
    Every failed precondition leaves pyfuse3 as it is and logs why (see the module docstring).
    """
    if _installed:
        return True
    if not startup.patches_enabled():
        log.debug("listing cache: off (%s)", startup.NO_PATCHES_ENV)
        return False
    try:
        slot, bound = _check_preconditions(extension_path)
    except (OSError, ValueError, AttributeError, IndexError, struct.error, got.Unsupported) as e:
        log.info("listing cache: off, the kernel will not keep listings: %s", e)
        return False
    wrapper = _Wrapper(is_directory_handle, bound)
    callback = _REPLY_OPEN(wrapper)
    callback_address = ctypes.cast(callback, ctypes.c_void_p).value or 0
    try:
        got.write_pointer(slot, callback_address, got.mappings())
    except OSError as e:
        log.info("listing cache: off, the kernel will not keep listings: %s", e)
        return False
    _installed.extend((callback, wrapper, slot, bound))
    failure = _self_test(slot, callback_address, wrapper)
    if failure is not None:
        disable()
        log.warning("listing cache: off, the kernel will not keep listings: self-test: %s", failure)
        return False
    if forward_to is not None:
        wrapper.forward = _REPLY_OPEN(forward_to)
    log.debug("listing cache: opendir replies ask the kernel to cache listings")
    return True


def _check_preconditions(extension_path: str | None) -> tuple[int, int]:
    """(address of pyfuse3's slot for fuse_reply_open, the function it is bound to), or raise
    :class:`unionfs.got.Unsupported` naming the precondition that fails."""
    got.check_machine()
    extension = os.path.realpath(extension_path or got.pyfuse3_extension())
    mappings = got.mappings()
    start, _end = got.mapping_span(mappings, extension)
    slot = start + got.import_slot_offset(extension, b"fuse_reply_open")
    bound = ctypes.c_void_p.from_address(slot).value or 0
    library, symbol = _resolve(bound)
    if symbol != "fuse_reply_open" or not os.path.basename(library).startswith("libfuse3.so"):
        raise got.Unsupported(f"pyfuse3's fuse_reply_open is bound to {symbol or hex(bound)} in {library}, "
                              "not to a shared libfuse 3")
    version = int(ctypes.CDLL(library).fuse_version())
    if not _LIBFUSE_WITH_CACHE_READDIR <= version < 400:
        raise got.Unsupported(f"{library}: libfuse version {version}, not 3.5 or later")
    return slot, bound


def _resolve(address: int) -> tuple[str, str]:
    """(the loaded object, the symbol) that ``address`` lies in, by dladdr(3)."""
    info = _DlInfo()
    if not address or not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return "(nothing loaded)", ""
    return os.fsdecode(info.dli_fname or b""), os.fsdecode(info.dli_sname or b"")


def _self_test(slot: int, callback_address: int, wrapper: _Wrapper) -> str | None:
    """Call what pyfuse3's slot now holds, with probes, forwarding to a recorder instead of libfuse.
    None when everything is as designed, otherwise what was not."""
    if ctypes.c_void_p.from_address(slot).value != callback_address:
        return "the slot does not hold the wrapper after writing it"
    if FileInfo.fh.offset != _FH_OFFSET:
        return f"fuse_file_info.fh at byte {FileInfo.fh.offset}, not {_FH_OFFSET}"
    forwarded: list[tuple[int, int]] = []

    def record(req: int | None, fi: int | None) -> int:
        forwarded.append((req or 0, fi or 0))
        return 0

    recorder = _REPLY_OPEN(record)
    real, wrapper.forward, wrapper.probe_handle = wrapper.forward, recorder, 0x5A5A
    try:
        through_slot = _REPLY_OPEN(callback_address)
        directory = FileInfo(flags=os.O_RDONLY | os.O_DIRECTORY, fh=0x5A5A, lock_owner=7)
        other = FileInfo(flags=os.O_RDWR, fh=0x5A5B, direct_io=1, lock_owner=7)
        through_slot(0x1234, ctypes.addressof(directory))
        through_slot(0x5678, ctypes.addressof(other))
    finally:
        wrapper.forward, wrapper.probe_handle = real, None
    if forwarded != [(0x1234, ctypes.addressof(directory)), (0x5678, ctypes.addressof(other))]:
        return f"the wrapper forwarded {forwarded}"
    marked = _fields(directory)
    if marked != {**_fields(FileInfo(flags=os.O_RDONLY | os.O_DIRECTORY, fh=0x5A5A, lock_owner=7)),
                  "keep_cache": 1, "cache_readdir": 1}:
        return f"a directory reply came out as {marked}"
    if _fields(other) != _fields(FileInfo(flags=os.O_RDWR, fh=0x5A5B, direct_io=1, lock_owner=7)):
        return f"another reply came out as {_fields(other)}"
    return None


def _fields(info: FileInfo) -> dict[str, int]:
    return {name: getattr(info, name) for name, *_ in FileInfo._fields_}


def disable() -> None:
    """Give pyfuse3 its own import back (tests, and a failed self-test)."""
    if _installed:
        _callback, _wrapper, slot, original = _installed
        got.write_pointer(int(slot), int(original), got.mappings())  # type: ignore[call-overload]
        _installed.clear()
