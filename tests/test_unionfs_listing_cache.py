"""unionfs.listing_cache: opendir replies that ask the kernel to keep listings (FOPEN_CACHE_DIR)."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs import got, listing_cache
from unionfs.startup import NO_PATCHES_ENV

pyfuse3 = pytest.importorskip("pyfuse3")

KEEP_CACHE, CACHE_READDIR = 1 << 2, 1 << 6


@pytest.fixture(autouse=True)
def patches_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the patch: whatever LAMINA_NO_PATCHES the suite runs with."""
    monkeypatch.delenv(NO_PATCHES_ENV, raising=False)


def test_the_switch_leaves_pyfuse3_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_PATCHES_ENV, "1")
    before = ctypes.c_void_p.from_address(_pyfuse3_slot()).value
    assert not listing_cache.enable(lambda fh: True)
    assert ctypes.c_void_p.from_address(_pyfuse3_slot()).value == before


class FileInfo(ctypes.Structure):
    """libfuse 3's struct fuse_file_info, as far as the wrapper reads and writes it (the bits as one
    word: independent of listing_cache.FileInfo's named bit-fields)."""

    _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint32), ("padding2", ctypes.c_uint32),
                ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64), ("poll_events", ctypes.c_uint32)]


@pytest.fixture
def hooked() -> Iterator[list[tuple[int, int]]]:
    """The hook installed in this process, forwarding to a recorder instead of libfuse."""
    forwarded: list[tuple[int, int]] = []

    def record(req: int | None, fi: int | None) -> int:
        info = FileInfo.from_address(fi or 0)
        forwarded.append((req or 0, info.bits))
        return 0

    recorder = listing_cache._REPLY_OPEN(record)
    directory_handles = {7}
    assert listing_cache.enable(directory_handles.__contains__,
                                forward_to=ctypes.cast(recorder, ctypes.c_void_p).value)
    try:
        yield forwarded
    finally:
        listing_cache.disable()


def _pyfuse3_slot() -> int:
    """The address of pyfuse3's GOT slot for fuse_reply_open in this process."""
    path = os.path.realpath(pyfuse3.__file__)
    start, _end = got.mapping_span(got.mappings(), path)
    return start + got.import_slot_offset(path, b"fuse_reply_open")


def _pyfuse3_reply_open() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """What pyfuse3 calls when it answers open or opendir: the function its GOT slot holds now."""
    return listing_cache._REPLY_OPEN(ctypes.c_void_p.from_address(_pyfuse3_slot()).value)


def test_opendir_replies_are_marked_and_others_left_alone(hooked: list[tuple[int, int]]) -> None:
    reply_open = _pyfuse3_reply_open()
    directory, regular = FileInfo(fh=7, bits=0), FileInfo(fh=8, bits=1 << 1)
    assert reply_open(0x1234, ctypes.addressof(directory)) == 0
    assert reply_open(0x5678, ctypes.addressof(regular)) == 0
    assert hooked == [(0x1234, KEEP_CACHE | CACHE_READDIR), (0x5678, 1 << 1)]
    assert directory.bits == KEEP_CACHE | CACHE_READDIR and directory.fh == 7


def test_disable_gives_pyfuse3_its_import_back() -> None:
    slot = _pyfuse3_slot()
    original = ctypes.c_void_p.from_address(slot).value
    assert listing_cache.enable(lambda fh: False)
    try:
        assert ctypes.c_void_p.from_address(slot).value != original
    finally:
        listing_cache.disable()
    assert ctypes.c_void_p.from_address(slot).value == original
    assert not listing_cache._installed


def test_an_unknown_object_is_refused_not_patched(tmp_path: Path) -> None:
    not_elf = tmp_path / "fake.so"
    not_elf.write_bytes(b"not an ELF object")
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(Path(os.path.realpath(pyfuse3.__file__)).read_bytes()[:200])
    for path in (not_elf, truncated, tmp_path / "missing.so"):
        assert listing_cache.enable(lambda fh: True, extension_path=str(path)) is False
        assert not listing_cache._installed


# --- each precondition, forced to fail: pyfuse3 left as it is, and one log line says why ----------


def _refused(caplog: pytest.LogCaptureFixture, level: int, reason: str, **kwargs: str) -> None:
    slot = _pyfuse3_slot()
    before = ctypes.c_void_p.from_address(slot).value
    caplog.clear()
    assert listing_cache.enable(lambda fh: True, **kwargs) is False
    assert ctypes.c_void_p.from_address(slot).value == before and not listing_cache._installed
    lines = [r.getMessage() for r in caplog.records if r.name == listing_cache.__name__ and r.levelno == level]
    assert len(lines) == 1 and "listing cache: off" in lines[0] and reason in lines[0], lines


def test_another_machine_is_refused(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((*real[:4], "aarch64")))
    _refused(caplog, logging.INFO, "not on x86_64 (aarch64)")


def test_an_extension_without_the_import_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    import _ctypes  # loaded, an ELF extension, and it calls no libfuse

    _refused(caplog, logging.INFO, "no relocation for fuse_reply_open", extension_path=_ctypes.__file__)


def test_a_slot_bound_elsewhere_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """pyfuse3 built another way (its import resolved to something that is not a libfuse 3's
    fuse_reply_open): here, the slot made to hold libc's getpid for the test."""
    slot = _pyfuse3_slot()
    original = ctypes.c_void_p.from_address(slot).value or 0
    getpid = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value or 0
    got.write_pointer(slot, getpid, got.mappings())
    try:
        _refused(caplog, logging.INFO, "getpid in")
    finally:
        got.write_pointer(slot, original, got.mappings())


def test_an_old_libfuse_is_refused(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The one this machine has is 3.14: ask for one newer than any libfuse 3."""
    monkeypatch.setattr(listing_cache, "_LIBFUSE_WITH_CACHE_READDIR", 399)
    _refused(caplog, logging.INFO, "not 3.5 or later")


@pytest.mark.allow_log("listing cache: off")
def test_a_wrong_bit_fails_the_self_test(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """The wrapper's masks must agree with the C compiler's bit-field layout."""
    monkeypatch.setattr(listing_cache, "_CACHE_READDIR_BIT", 1 << 7)  # noflush's bit
    _refused(caplog, logging.WARNING, "self-test: a directory reply came out as")


@pytest.mark.allow_log("listing cache: off")
def test_a_write_that_did_not_land_fails_the_self_test(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    real_write = got.write_pointer
    monkeypatch.setattr(got, "write_pointer", lambda address, value, mappings: None)
    monkeypatch.setattr(listing_cache, "disable", lambda: listing_cache._installed.clear())
    _refused(caplog, logging.WARNING, "self-test: the slot does not hold the wrapper")
    assert got.write_pointer is not real_write


def test_the_self_test_passes_here_and_the_wrapper_then_forwards_to_libfuse() -> None:
    slot = _pyfuse3_slot()
    bound = ctypes.c_void_p.from_address(slot).value
    assert listing_cache.enable(lambda fh: True)
    try:
        wrapper = listing_cache._installed[1]
        assert isinstance(wrapper, listing_cache._Wrapper) and wrapper.probe_handle is None
        assert ctypes.cast(wrapper.forward, ctypes.c_void_p).value == bound
    finally:
        listing_cache.disable()
