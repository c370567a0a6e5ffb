"""``os`` calls relative to a directory descriptor that also work for relative paths longer than
PATH_MAX allows.

A merged path can be longer than any path a caller passed: a process inside a deep directory uses
short relative names, while our relative path from the layer root carries the whole prefix. For
paths past ``LONG``, the leading directories are opened (O_PATH) a chunk at a time and the call is
made on the remainder, as the kernel itself walks components.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

LONG = 3000
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def open_prefix(fd: int, path: str, owned: list[int]) -> tuple[int, str]:
    """(a descriptor of a deep ancestor, the short rest of ``path``); new descriptors go to ``owned``."""
    cur, rest = fd, path
    while len(rest) >= LONG:
        cut = rest.rfind("/", 0, LONG)
        if cut <= 0:
            break
        cur = os.open(rest[:cut], _O_PATH_DIR, dir_fd=cur)
        owned.append(cur)
        rest = rest[cut + 1:]
    return cur, rest


def _close(owned: list[int]) -> None:
    for fd in owned:
        os.close(fd)


def _single(fn: Callable[..., Any], index: int = 0) -> Callable[..., Any]:
    def call(*args: Any, dir_fd: int | None = None, **kw: Any) -> Any:
        path = args[index]
        if dir_fd is None or not isinstance(path, str) or len(path) < LONG:
            return fn(*args, dir_fd=dir_fd, **kw)
        owned: list[int] = []
        try:
            d, rest = open_prefix(dir_fd, path, owned)
            new_args = list(args)
            new_args[index] = rest or "."
            return fn(*new_args, dir_fd=d, **kw)
        finally:
            _close(owned)

    call.__name__ = fn.__name__
    return call


def _double(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(src: str, dst: str, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None,
             **kw: Any) -> Any:
        if (src_dir_fd is None or len(src) < LONG) and (dst_dir_fd is None or len(dst) < LONG):
            return fn(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)
        owned: list[int] = []
        try:
            if src_dir_fd is not None and len(src) >= LONG:
                src_dir_fd, src = open_prefix(src_dir_fd, src, owned)
            if dst_dir_fd is not None and len(dst) >= LONG:
                dst_dir_fd, dst = open_prefix(dst_dir_fd, dst, owned)
            return fn(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)
        finally:
            _close(owned)

    call.__name__ = fn.__name__
    return call


stat = _single(os.stat)
open = _single(os.open)
mkdir = _single(os.mkdir)
mknod = _single(os.mknod)
symlink = _single(os.symlink, 1)
readlink = _single(os.readlink)
unlink = _single(os.unlink)
rmdir = _single(os.rmdir)
chmod = _single(os.chmod)
chown = _single(os.chown)
utime = _single(os.utime)
rename = _double(os.rename)
link = _double(os.link)
