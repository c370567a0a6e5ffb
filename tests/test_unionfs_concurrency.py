"""Many requests waiting at once (big copy-ups in worker threads) through a real mount.

fuse-overlayfs serves this; so must lamina: every handler that waits has a request loop started
for it (unionfs.copy_ups), and loops that find others idle leave again. The mount must outlive
all of that: pyfuse3.main returning while spare loops still serve once unmounted the union.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from unionfs.copy_ups import THREAD_COPY_BYTES

pytestmark = [pytest.mark.fuse, pytest.mark.root]

FILES = 12
SIZE = 4 * THREAD_COPY_BYTES  # each copy-up runs in a worker thread


def _append_one_byte(path: Path, errors: list[BaseException]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    except OSError as e:
        errors.append(e)


def test_concurrent_big_copy_ups_leave_the_mount_serving(union_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    chunk = os.urandom(SIZE)
    for i in range(FILES):
        (lower / f"f{i}").write_bytes(chunk)
    mnt = union_mount([lower], upper, work).mountpoint
    for round_ in range(2):
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_append_one_byte, args=(mnt / f"f{i}", errors)) for i in range(FILES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"round {round_}: {errors[:3]}"
        assert os.path.ismount(mnt)
        for i in range(FILES):
            assert os.stat(mnt / f"f{i}").st_size == SIZE + round_ + 1
    # the union still answers new requests after the spare loops went idle
    (mnt / "after").write_bytes(b"ok")
    assert (upper / "after").read_bytes() == b"ok"
    assert (upper / "f0").read_bytes() == chunk + b"xx"
