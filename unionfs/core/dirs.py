"""Opening a union's directories: the lower layers, the upper, and the workdir's scratch and index.

What a mount holds open for its whole life, and checks once at the start: every layer exists and is
a directory, the workdir sits on the upper's filesystem. WORK/work (the scratch directory copy-ups
and whiteouts are built in) is emptied at every mount: what is left there is a crashed copy-up.
WORK/lamina-index (see unionfs.core.hardlinks) is kept across mounts.

Error handling: every problem is a :class:`UnionError` with one readable line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from unionfs.core import fsat, ondisk
from unionfs.core.backing import Layer, remove_tree_at
from unionfs.core.hardlinks import INDEX_SUBDIR

WORK_SUBDIR = "work"


class UnionError(Exception):
    """A configuration problem found when opening the layers (one readable line)."""


@dataclass
class UnionDirs:
    """The open directories of a union.

    Resource handling: owns every descriptor in ``fds`` (the layers, the workdir and its two
    subdirectories) until ``close``.
    """

    lowers: list[Layer] = field(default_factory=list)
    upper: Layer | None = None
    work_fd: int = -1  # WORK/work; -1 for a read-only union
    index_fd: int = -1  # WORK/lamina-index; -1 for a read-only union
    index_used: bool = False  # the index held something at mount
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def open_union_dirs(lowers: list[str], upper: str | None, work: str | None,
                    opened: dict[str, int] | None = None) -> UnionDirs:
    """Open the layers (top lower first) and, for a writable union, the upper and workdir.

    ``opened``: directories already opened (by path as given), taken out of the dict as they are
    used (see unionfs.detached_layers); the rest are opened here.
    """
    if not lowers and upper is None:
        raise UnionError("no lowerdir given")
    if upper is not None and work is None:
        raise UnionError("upperdir needs a workdir")
    dirs = UnionDirs()
    pre_opened = opened if opened is not None else {}
    try:
        dirs.lowers = [_open_layer(dirs, pre_opened, p, 1 + i, f"lower:{i}:{p}", i)
                       for i, p in enumerate(lowers)]
        if upper is not None:
            dirs.upper = _open_layer(dirs, pre_opened, upper, 0, "upper", -1)
            assert work is not None
            _open_work(dirs, pre_opened, work)
    except BaseException:
        dirs.close()
        raise
    return dirs


def _open_dir(opened: dict[str, int], path: str) -> int:
    fd = opened.pop(path, None)
    return fsat.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if fd is None else fd


def _open_layer(dirs: UnionDirs, opened: dict[str, int], path: str, slot: int, label: str,
                index: int) -> Layer:
    try:
        fd = _open_dir(opened, path)
    except FileNotFoundError:
        raise UnionError(f"{path}: no such directory") from None
    except NotADirectoryError:
        raise UnionError(f"{path}: not a directory") from None
    except OSError as e:
        raise UnionError(f"{path}: {e.strerror}") from None
    dirs.fds.append(fd)
    placeholders = ondisk.read_placeholder_list(fd) if index >= 0 else frozenset()
    return Layer(path=path, fd=fd, slot=slot, label=label, index=index, dev=os.fstat(fd).st_dev,
                 placeholders=placeholders)


def _open_work(dirs: UnionDirs, opened: dict[str, int], work: str) -> None:
    """Open (creating if needed) WORK/work, emptied, and WORK/lamina-index."""
    assert dirs.upper is not None
    try:
        wfd = _open_dir(opened, work)
    except OSError as e:
        raise UnionError(f"{work}: {e.strerror}") from None
    dirs.fds.append(wfd)
    if os.fstat(wfd).st_dev != dirs.upper.dev:
        raise UnionError(f"{work}: workdir and upperdir must be on the same filesystem")
    remove_tree_at(wfd, WORK_SUBDIR)
    fsat.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
    try:
        fsat.mkdir(INDEX_SUBDIR, 0o700, dir_fd=wfd)
    except FileExistsError:
        pass
    dirs.index_fd = fsat.open(INDEX_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=wfd)
    dirs.fds.append(dirs.index_fd)
    dirs.index_used = bool(os.listdir(dirs.index_fd))
    dirs.work_fd = fsat.open(WORK_SUBDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=wfd)
    dirs.fds.append(dirs.work_fd)
