"""fallocate(2) cases run through a mounted union; shared by tests/test_unionfs_fallocate.py and,
as a script, by the unprivileged user there (``python fallocate_cases.py MOUNTPOINT``: JSON out).

``prepare_lower(dir)`` writes the lower files; ``run_cases(mountpoint)`` creates the new files
through the mount, applies one fallocate per file and reports what it saw: the error, size, blocks
and a hash of the contents, each taken after a stat before the call (so stale cached attributes
would show).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

# The modes the kernel's FUSE client forwards to a server (fs/fuse/file.c, fuse_file_fallocate).
FORWARDED = {
    "allocate": 0,
    "keep_size": FALLOC_FL_KEEP_SIZE,
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero_range": FALLOC_FL_ZERO_RANGE,
    "zero_range_keep_size": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
}
# Refused before any FUSE server sees them: by the VFS (punch hole without keep size) or by the
# FUSE client itself (collapse, insert, unshare).
NOT_FORWARDED = {
    "punch_hole_alone": FALLOC_FL_PUNCH_HOLE,
    "collapse_range": FALLOC_FL_COLLAPSE_RANGE,
    "insert_range": FALLOC_FL_INSERT_RANGE,
    "unshare_range": FALLOC_FL_UNSHARE_RANGE,
}
MODES = {**FORWARDED, **NOT_FORWARDED}
# (offset, length): inside, unaligned at the start, straddling the end, past the end, invalid.
RANGES = [(8192, 8192), (1, 5000), (36000, 20000), (1 << 20, 4096), (0, 0)]
ORIGINS = ("lower", "new")
CONTENT = bytes((i * 7 + i // 4096) % 251 for i in range(40000))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def case_names() -> list[tuple[str, str, int, int, int]]:
    """(file name, origin, mode, offset, length) of every case."""
    return [(f"{origin}-{mode_name}-{i}", origin, mode, offset, length)
            for origin in ORIGINS for mode_name, mode in MODES.items()
            for i, (offset, length) in enumerate(RANGES)]


def prepare_lower(lower: str) -> None:
    for name, origin, *_ in case_names():
        if origin == "lower":
            with open(os.path.join(lower, name), "wb") as f:
                f.write(CONTENT)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> str:
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return "ok"
    code = ctypes.get_errno()
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]  # not its alias ENOTSUP


def run_cases(mountpoint: str) -> dict[str, dict[str, object]]:
    outcomes: dict[str, dict[str, object]] = {}
    for name, origin, mode, offset, length in case_names():
        path = os.path.join(mountpoint, name)
        if origin == "new":
            with open(path, "wb") as f:
                f.write(CONTENT)
        os.stat(path)  # the kernel and the server now hold attributes from before the call
        fd = os.open(path, os.O_RDWR)
        try:
            result = _fallocate(fd, mode, offset, length)
            fstat = os.fstat(fd)
        finally:
            os.close(fd)
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
        outcomes[name] = {"result": result, "size": st.st_size, "fstat_size": fstat.st_size,
                          "blocks": st.st_blocks, "read": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()[:16],
                          "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    return outcomes


if __name__ == "__main__":
    print(json.dumps(run_cases(sys.argv[1])))
