"""Fd-relative access to the backing directories (layers and workdir).

Every layer is opened once, as a directory file descriptor, when the filesystem starts. From then on
every backing system call is relative to that descriptor (``dir_fd=``), never a full path: paths near
PATH_MAX keep working (the relative path is always shorter than the one the caller used), and a
process that pivots its root or moves the layer directories cannot make us touch the wrong file.

Calls that have no ``*at`` form in Python (xattrs, renameat2) go through ctypes (getxattrat and
listxattrat where the kernel has them) or ``/proc/self/fd/N/REL``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from unionfs.core import fsat

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

# getxattrat(2) and listxattrat(2), Linux 6.13: xattrs of a path relative to a directory descriptor
# in one system call, where going through /proc/self/fd/N/PATH costs a procfs lookup and a magic
# link on every call (a third of a lookup's getxattr time here). Their numbers are the same on every
# architecture that has the generic table; elsewhere, and on older kernels (ENOSYS), the /proc path.
_SYS_GETXATTRAT = 464
_SYS_LISTXATTRAT = 465
_AT_SYMLINK_NOFOLLOW = 0x100
_XATTR_GUESS = 256  # bytes: overlay markers and lamina's own xattrs fit


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


_getxattrat = _libc["syscall"]  # [] makes a function object of its own, with its own argtypes
_getxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p,
                        ctypes.POINTER(_XattrArgs), ctypes.c_size_t]
_getxattrat.restype = ctypes.c_long
_listxattrat = _libc["syscall"]
_listxattrat.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p,
                         ctypes.c_size_t]
_listxattrat.restype = ctypes.c_long
_AT_FDCWD = -100


def _xattrat_answers_like_getxattr() -> bool:
    """Whether getxattrat works here: not only the kernel must have it, a seccomp filter (as in a
    container) may answer EPERM for calls it does not know, which must not read as "no xattr"."""
    if os.uname().machine not in ("x86_64", "aarch64", "riscv64"):
        return False
    probe = "user.lamina.probe"
    try:
        os.getxattr("/", probe)
        want = 0
    except OSError as e:
        want = e.errno or 0
    args = _XattrArgs(0, 0, 0)
    got = 0 if _getxattrat(_SYS_GETXATTRAT, _AT_FDCWD, b"/", 0, probe.encode(), ctypes.byref(args),
                           ctypes.sizeof(args)) >= 0 else ctypes.get_errno()
    return got == want and want != errno.EPERM


_xattrat_usable = _xattrat_answers_like_getxattr()

# What a missing or unreadable xattr looks like to the callers below: absent, not an error; and
# an object whose xattrs cannot be listed: it has none.
_XATTR_ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES)
_XATTRS_UNLISTABLE = (errno.ENOTSUP, errno.EPERM, errno.EACCES)

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
    # Device placeholders of a lower (ondisk.read_placeholder_list): left out of the merged view.
    placeholders: frozenset[str] = field(default_factory=frozenset)

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
    if path and _xattrat_usable:
        value = _getxattr_by_syscall(fd, path, name)
        if value is not NotImplemented:
            return value
    # the hot path (every lookup): no context manager
    return _getxattr(f"/proc/self/fd/{fd}/{path}" if path else fd, name)


def _getxattr_by_syscall(fd: int, path: str, name: str) -> Any:
    """getxattrat(2); NotImplemented when the kernel lacks it."""
    bpath, bname = os.fsencode(path), os.fsencode(name)

    def call(buf: Any, size: int) -> int:
        args = _XattrArgs(ctypes.addressof(buf) if buf is not None else 0, size, 0)
        return int(_getxattrat(_SYS_GETXATTRAT, fd, bpath, _AT_SYMLINK_NOFOLLOW, bname, ctypes.byref(args),
                               ctypes.sizeof(args)))

    data, err = _sized_call(call, _XATTR_GUESS)
    if data is not None:
        return data
    if err == errno.ENOSYS:
        return NotImplemented
    if err in _XATTR_ABSENT:
        return None
    raise OSError(err, os.strerror(err), path)


def _sized_call(call: Callable[[Any, int], int], guess: int) -> tuple[bytes | None, int]:
    """Run a getxattr- or listxattr-style system call with a buffer big enough for the answer:
    (the bytes, 0), or (None, errno). ENOSYS also turns the *xattrat calls off for good."""
    global _xattrat_usable
    size = guess
    while True:
        buf = ctypes.create_string_buffer(size)
        n = call(buf, size)
        if n >= 0:
            return buf.raw[:n], 0
        err = ctypes.get_errno()
        if err == errno.ERANGE:
            n = call(None, 0)  # how big is it now?
            if n >= 0:
                size = max(n, 1)
                continue
            err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _xattrat_usable = False
        return None, err


def _getxattr(target: str | int, name: str) -> bytes | None:
    try:
        if isinstance(target, int):
            return os.getxattr(target, name)
        return os.getxattr(target, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in _XATTR_ABSENT:
            return None
        raise


def listxattr_at(fd: int, path: str) -> list[str]:
    if path and len(path) >= _PROC_PATH_BUDGET:
        with proc_path(fd, path) as p:
            return _listxattr(p)
    if path and _xattrat_usable:
        names = _listxattr_by_syscall(fd, path)
        if names is not NotImplemented:
            return names
    return _listxattr(f"/proc/self/fd/{fd}/{path}" if path else fd)


def _listxattr_by_syscall(fd: int, path: str) -> Any:
    """listxattrat(2); NotImplemented when the kernel lacks it."""
    bpath = os.fsencode(path)

    def call(buf: Any, size: int) -> int:
        return int(_listxattrat(_SYS_LISTXATTRAT, fd, bpath, _AT_SYMLINK_NOFOLLOW, buf, size))

    data, err = _sized_call(call, 4 * _XATTR_GUESS)
    if data is not None:
        return [os.fsdecode(x) for x in data.split(b"\0") if x]
    if err == errno.ENOSYS:
        return NotImplemented
    if err in _XATTRS_UNLISTABLE:
        return []
    raise OSError(err, os.strerror(err), path)


def _listxattr(target: str | int) -> list[str]:
    try:
        if isinstance(target, int):
            return os.listxattr(target)
        return os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in _XATTRS_UNLISTABLE:
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
