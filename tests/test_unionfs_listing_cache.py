"""unionfs.listing_cache: opendir replies that ask the kernel to keep listings (FOPEN_CACHE_DIR)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs import listing_cache
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
    """libfuse 3's struct fuse_file_info, as far as the wrapper reads and writes it."""

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
    start, _end = listing_cache._mapping_span(listing_cache._mappings(), path)
    return start + listing_cache._import_slot_offset(path, b"fuse_reply_open")


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
