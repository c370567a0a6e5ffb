"""unionfs.lowlevel_ops without a mount: its preconditions, and the ops struct it gives libfuse."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from unionfs import got, lowlevel_ops
from unionfs.startup import NO_PATCHES_ENV

pyfuse3 = pytest.importorskip("pyfuse3")

OPS_SIZE = 44 * 8  # struct fuse_lowlevel_ops in libfuse 3.14 (through lseek)


async def no_handler(fh: int, mode: int, offset: int, length: int) -> None:
    raise AssertionError("not called")


def pyfuse3_span() -> tuple[int, int]:
    return got.mapping_span(got.mappings(), got.pyfuse3_extension())


def fake_ops(lookup: int, readdirplus: int, fallocate: int = 0) -> ctypes.Array[ctypes.c_void_p]:
    ops = (ctypes.c_void_p * (OPS_SIZE // 8))()
    ops[2], ops[40], ops[41] = lookup, fallocate or None, readdirplus
    return ops


def test_the_copy_carries_the_operation_and_nothing_else_changes() -> None:
    start, end = pyfuse3_span()
    ops = fake_ops(start + 16, start + 32)
    copy = lowlevel_ops._ops_with_fallocate(ctypes.addressof(ops), OPS_SIZE, 0xABC0, (start, end))
    words = (ctypes.c_void_p * (OPS_SIZE // 8)).from_buffer(copy)
    assert words[40] == 0xABC0
    assert [words[i] for i in range(len(ops)) if i != 40] == [ops[i] for i in range(len(ops)) if i != 40]
    assert ops[40] is None  # pyfuse3's own struct is left as it was


@pytest.mark.parametrize("layout", ["foreign pointers", "fallocate already set", "struct too small"])
def test_an_unknown_layout_is_refused(layout: str) -> None:
    start, end = pyfuse3_span()
    ops, size = fake_ops(start + 16, start + 32), OPS_SIZE
    if layout == "foreign pointers":
        ops = fake_ops(end + 4096, start + 32)
    elif layout == "fallocate already set":
        ops = fake_ops(start + 16, start + 32, fallocate=start + 48)
    else:
        size = 41 * 8
    with pytest.raises(got.Unsupported):
        lowlevel_ops._ops_with_fallocate(ctypes.addressof(ops), size, 0xABC0, (start, end))


def slot_value() -> int | None:
    slot, _start, _end = got.import_slot(got.pyfuse3_extension(), b"fuse_session_new", got.mappings())
    return ctypes.c_void_p.from_address(slot).value


def test_the_switch_leaves_pyfuse3_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_PATCHES_ENV, "1")
    before = slot_value()
    assert not lowlevel_ops.install(no_handler)
    assert slot_value() == before and not lowlevel_ops.active()


def test_an_unknown_extension_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_PATCHES_ENV, raising=False)
    not_elf = tmp_path / "fake.so"
    not_elf.write_bytes(b"not an ELF object" * 8)
    before = slot_value()
    assert not lowlevel_ops.install(no_handler, extension_path=str(not_elf))
    assert slot_value() == before


def test_fallocate_reports_the_filesystem_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as raised:
            lowlevel_ops.fallocate(fd, 0, 0, 4096)  # not open for writing
        assert raised.value.errno == errno.EBADF
    finally:
        os.close(fd)
