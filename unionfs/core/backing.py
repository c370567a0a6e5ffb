"""Fd-relative access to the backing directories (layers and workdir).

Every layer is opened once, as a directory file descriptor, when the filesystem starts. From then on
every backing system call is relative to that descriptor (``dir_fd=``), never a full path: paths near
PATH_MAX keep working (the relative path is always shorter than the one the caller used), and a
process that pivots its root or moves the layer directories cannot make us touch the wrong file.

Calls that have no ``*at`` form in Python (xattrs, renameat2) go through ``/proc/self/fd/N/REL`` or
ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from unionfs.core import fsat

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

# Files up to this size are copied in one go, without looking for holes.
_SMALL_FILE = 64 * 1024

# Longest relative path we pass through /proc/self/fd/N/ without first opening its parent.
_PROC_PATH_BUDGET = 4000


@dataclass(eq=False)
class Layer:
    """One backing directory of the union, opened once."""

    path: str
    fd: int
    slot: int  # 0 for the upper, 1 + index for lowers: used in inode numbers
    label: str  # "upper" or "lower:INDEX:PATH" (user.lamina.layer and --trace)
    index: int = -1  # lower index (0 = top lower); -1 for the upper
    dev: int = field(default=0)

    @property
    def is_upper(self) -> bool:
        return self.index < 0


def rel(path: str) -> str:
    """The relative path to hand to ``*at`` calls ('' is the layer root)."""
    return path or "."


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition("/")
    return head, tail


def lstat_at(fd: int, path: str) -> os.stat_result | None:
    """lstat relative to ``fd``; None when the name (or a parent) does not exist."""
    try:
        if len(path) < fsat.LONG:  # the hot path (every lookup): no long-path wrapper
            return os.stat(path or ".", dir_fd=fd, follow_symlinks=False)
        return fsat.stat(path, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return None
        raise


def exists_at(fd: int, path: str) -> bool:
    return lstat_at(fd, path) is not None


@contextmanager
def proc_path(fd: int, path: str) -> Iterator[str]:
    """A path naming ``path`` under ``fd`` for calls without ``dir_fd`` (xattrs), fd-relative still."""
    if len(path) < _PROC_PATH_BUDGET:
        yield f"/proc/self/fd/{fd}/{path}" if path else f"/proc/self/fd/{fd}"
        return
    parent, name = split(path)
    pfd = fsat.open(parent, O_PATH_DIR, dir_fd=fd)
    try:
        yield f"/proc/self/fd/{pfd}/{name}"
    finally:
        os.close(pfd)


def getxattr_at(fd: int, path: str, name: str) -> bytes | None:
    """One xattr of the object at ``path`` (never following a final symlink); None when absent.

    An empty ``path`` means the directory ``fd`` itself: ``/proc/self/fd/N`` would name the proc
    symlink, not the directory, once symlinks are not followed.
    """
    if path and len(path) >= _PROC_PATH_BUDGET:
        with proc_path(fd, path) as p:
            return _getxattr(p, name)
    # the hot path (every lookup): no context manager
    return _getxattr(f"/proc/self/fd/{fd}/{path}" if path else fd, name)


def _getxattr(target: str | int, name: str) -> bytes | None:
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def listxattr_at(fd: int, path: str) -> list[str]:
    if path and len(path) >= _PROC_PATH_BUDGET:
        with proc_path(fd, path) as p:
            return _listxattr(p)
    return _listxattr(f"/proc/self/fd/{fd}/{path}" if path else fd)


def _listxattr(target: str | int) -> list[str]:
    try:
        if isinstance(target, int):
            return os.listxattr(target)
        return os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return []
        raise


def setxattr_at(fd: int, path: str, name: str, value: bytes, flags: int = 0) -> None:
    if not path:
        os.setxattr(fd, name, value, flags)
        return
    with proc_path(fd, path) as p:
        os.setxattr(p, name, value, flags, follow_symlinks=False)


def removexattr_at(fd: int, path: str, name: str) -> None:
    if not path:
        os.removexattr(fd, name)
        return
    with proc_path(fd, path) as p:
        os.removexattr(p, name, follow_symlinks=False)


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int = 0) -> None:
    if _renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


def open_dir_at(fd: int, path: str) -> int:
    """An O_PATH descriptor of the directory ``path`` under ``fd`` (usable as ``dir_fd``)."""
    return fsat.open(rel(path), O_PATH_DIR, dir_fd=fd)


def remove_tree_at(fd: int, path: str) -> None:
    """rm -rf ``path`` under ``fd`` (fd-relative all the way down, so long paths work)."""
    st = lstat_at(fd, path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        fsat.unlink(path, dir_fd=fd)
        return
    dfd = fsat.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        with os.scandir(dfd) as it:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in names:
            if is_dir:
                remove_tree_at(dfd, name)
            else:
                fsat.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    fsat.rmdir(path, dir_fd=fd)


def copy_file_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes keeping holes: SEEK_DATA/SEEK_HOLE to find data, copy_file_range to move it."""
    if size <= _SMALL_FILE:
        _copy_range(src_fd, dst_fd, 0, size)  # too small to hold a hole worth looking for
        if os.fstat(dst_fd).st_size != size:
            os.ftruncate(dst_fd, size)
        return
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno != errno.EINVAL:
                raise
            data = pos  # SEEK_DATA unsupported: treat everything as data
        try:
            hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        _copy_range(src_fd, dst_fd, data, hole - data)
        pos = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _copy_by_pread(src_fd, dst_fd, offset + done, length - done)
        if n == 0:
            break
        done += n


def _copy_by_pread(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    buf = os.pread(src_fd, min(length, 1 << 20), offset)
    if buf:
        os.pwrite(dst_fd, buf, offset)
    return len(buf)
