"""Reading a directory tree that an untrusted process may be changing while we read it.

A running container's upper directory is written by the processes inside it. A host-side reader
that checks an entry (``lstat``) and then uses its path (``open``, ``scandir``, ``getxattr``) can be
fooled between the two: the container swaps the file for a symlink to a host path (renameat2 with
RENAME_EXCHANGE, in a loop) and the reader, running as the host user or root, copies the host file
into an image (docker's CVE-2018-15664, ``docker cp``). So every step here is relative to a
directory descriptor the reader already holds, and no step follows a symlink:

* directories and files are opened one component at a time with ``O_NOFOLLOW`` relative to their
  parent's descriptor (a symlink put in their place fails with ELOOP instead of being followed);
* what an entry *is* comes from ``fstat`` of the descriptor that is then read, never from an
  earlier ``lstat`` of its name;
* extended attributes of entries that cannot be opened (symlinks, devices) are read through
  ``/proc/self/fd/DIRFD/NAME`` without following the last component: the only path walked is the
  directory we hold.

:func:`open_beneath` opens a relative path under a root descriptor the same way, with the kernel's
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` where it exists and a component-by-component walk
otherwise.

Error handling: an entry that turns into a symlink raises ``OSError(ELOOP)``; one that vanishes,
``FileNotFoundError``; callers decide whether to retry, skip or fail.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the reader; O_NOCTTY: nor a tty adopt it.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (new syscalls share one table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_OPENAT2_MAX_PATH = 4000  # below PATH_MAX (4096), with room for the terminating NUL


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_have_openat2: bool | None = None  # None: not tried yet


def _openat2(dir_fd: int, path: str, flags: int) -> int | None:
    """``openat2`` confined to ``dir_fd`` with no symlinks at all; None when the kernel lacks it."""
    global _libc, _have_openat2
    if _have_openat2 is False:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        _have_openat2 = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _have_openat2 is None:
        # ENOSYS: older kernel; EPERM: a seccomp filter that predates openat2.
        _have_openat2 = False
        return None
    raise OSError(err, os.strerror(err), path)


def _walk_open(dir_fd: int, parts: list[str], flags: int) -> int:
    current = dir_fd
    try:
        for part in parts[:-1]:
            try:
                following = os.open(part, DIR_FLAGS, dir_fd=current)
            except NotADirectoryError:
                # O_DIRECTORY answers ENOTDIR for a symlink; say ELOOP, as openat2 does.
                if stat.S_ISLNK(os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            if current != dir_fd:
                os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_beneath(dir_fd: int, path: str, flags: int = FILE_FLAGS) -> int:
    """Open ``path`` (relative) under ``dir_fd`` without following a symlink or leaving the tree.

    Error handling: an absolute path or a ``..`` component raises ``OSError(EXDEV)``, as openat2
    does; a symlink at any component raises ``OSError(ELOOP)``.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise OSError(errno.EXDEV, "path leaves the tree", path)
    if not parts:
        return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=dir_fd)
    joined = "/".join(parts)
    # openat2 takes at most PATH_MAX; a deeper path is walked (the walk has no such limit).
    fd = _openat2(dir_fd, joined, flags) if len(os.fsencode(joined)) < _OPENAT2_MAX_PATH else None
    return fd if fd is not None else _walk_open(dir_fd, parts, flags)


def open_root(path: str | os.PathLike[str]) -> int:
    """A descriptor of the tree's root directory (which must not itself be a symlink)."""
    return os.open(path, DIR_FLAGS)


def open_dir_in(dir_fd: int, name: str) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_file_in(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading without following it; the descriptor and its ``fstat``.

    The caller must check the type in the returned stat: whatever is there now is what was opened.
    """
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def lstat_in(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def entry_path(dir_fd: int, name: str) -> str:
    """A path for calls that have no ``dir_fd`` (``getxattr``), to be used with follow_symlinks=False.

    Only the magic link of a directory we hold is followed; ``name`` itself never is.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def dir_path(dir_fd: int) -> str:
    """A path naming the open directory ``dir_fd`` itself, for calls with follow_symlinks=False."""
    return f"/proc/self/fd/{dir_fd}/."


def list_names(dir_fd: int) -> list[str]:
    """The names in the open directory, sorted by their bytes (``os.listdir`` reads a duplicate)."""
    return sorted(os.listdir(dir_fd), key=os.fsencode)


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block ends."""
    try:
        yield fd
    finally:
        os.close(fd)


class ExactReader:
    """Exactly ``size`` bytes of an open file: zeros past a shrunken end, nothing past ``size``.

    A file a running container truncates or grows while it is packed still gives a tar entry of
    the size its header announced (the entry is then as torn as the container's write, but the
    archive is intact).
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.remaining = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.remaining:
            n = self.remaining
        chunks: list[bytes] = []
        wanted = n
        while wanted:
            data = os.read(self.fd, wanted)
            if not data:
                chunks.append(bytes(wanted))
                break
            chunks.append(data)
            wanted -= len(data)
        self.remaining -= n
        return b"".join(chunks)
