"""Resolve container paths inside a root directory so that ``..`` and symlinks never leave it.

A container path (from ``-v``, ``-w``, WORKDIR, VOLUME, or a mount target of the builder) is walked
one component at a time against the root, exactly as the kernel would walk it after a chroot: ``..``
at the root stays at the root, and a symlink's target is spliced in (absolute targets restart at the
root). The result names a host path under ``root`` whose existing components are all real
directories, so ``mount(2)`` (which follows symlinks) cannot be steered out of the root.

Resolution happens before the container's first process runs, so the tree cannot change under us.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

MAX_SYMLINKS = 40


def resolve_in_root(root: str, path: str) -> str:
    """The host path under ``root`` that container path ``path`` names; ELOOP after 40 symlinks."""
    pending = deque(path.split("/"))
    components: list[str] = []
    links = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if components:
                components.pop()
            continue
        candidate = os.path.join(root, *components, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            components.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                components = []
            pending.extendleft(reversed(target.split("/")))
            continue
        components.append(part)
    return os.path.join(root, *components)


def container_relative(root: str, host_path: str) -> str:
    """The container path of a host path returned by :func:`resolve_in_root`."""
    rel = os.path.relpath(host_path, root)
    return "/" if rel == "." else "/" + rel


def make_dirs_in_root(root: str, path: str, mode: int = 0o755) -> str:
    """Resolve ``path`` in ``root`` and create the missing directories; return the host path.

    Each missing component is created only after its parent resolved inside the root, and a
    component that exists but is not a directory fails with ENOTDIR.
    """
    target = resolve_in_root(root, path)
    rel = os.path.relpath(target, root)
    current = root
    if rel != ".":
        for part in rel.split("/"):
            current = os.path.join(current, part)
            try:
                os.mkdir(current, mode)
            except FileExistsError:
                st = os.lstat(current)
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                             container_relative(root, current)) from None
    return target


def make_file_in_root(root: str, path: str) -> str:
    """Resolve ``path`` in ``root``, create its parents and an empty file if missing (a bind target)."""
    target = resolve_in_root(root, path)
    parent = os.path.dirname(target)
    make_dirs_in_root(root, container_relative(root, parent))
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.close(fd)
    except FileExistsError:
        pass
    return target
