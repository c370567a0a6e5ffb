"""Helpers shared by the unit tests of the pure core (test_unionfs_core*.py): layer directories,
path walks through a UnionFS, and the kernel's whiteout format."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unionfs.core import Caller, UnionFS
from unionfs.core.nodes import Node

IS_ROOT = os.geteuid() == 0
ME = Caller(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())


class Layers:
    def __init__(self, tmp: Path, nlowers: int = 2) -> None:
        self.lowers = [tmp / f"l{i}" for i in range(nlowers)]
        self.upper = tmp / "upper"
        self.work = tmp / "work"
        for d in [*self.lowers, self.upper, self.work]:
            d.mkdir()
        self.traces: list[str] = []

    def open(self, **kw: object) -> UnionFS:
        return UnionFS([str(p) for p in self.lowers], str(self.upper), str(self.work),
                       trace=self.traces.append, **kw)  # type: ignore[arg-type]


def walk(fs: UnionFS, path: str) -> Node:
    node = fs.root
    for part in [p for p in path.split("/") if p]:
        child = fs.lookup(node, part)
        assert child is not None, f"{path}: {part} missing"
        node = child
    return node


def names(fs: UnionFS, path: str = "") -> set[str]:
    return {e.name for e in fs.list_dir(walk(fs, path))}


def read(fs: UnionFS, path: str) -> bytes:
    fd, _ = fs.open(walk(fs, path), os.O_RDONLY)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        fs.release(walk(fs, path), fd)


def write_file(p: Path, data: str | bytes = "x", mode: int | None = None) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(p, mode)
    return p


def whiteout(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, trusted xattrs, chown)")
