"""``lamina diff``: what a container changed, read from its upper directory (docker's A/C/D lines).

An entry of the upper is ``D`` when it is a whiteout, ``C`` when the path also exists in a lower
layer (a copied-up file or a directory whose contents changed), ``A`` otherwise; everything below an
added directory is added too. Whiteouts and opaque markers are recognised by :mod:`unionfs.core.ondisk`
only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lamina.store import fdtree
from unionfs.core import ondisk


def _in_lowers(lowers: list[Path], rel: str) -> bool:
    for lower in lowers:  # top first
        path = lower / rel
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(path.parent / (ondisk.WHITEOUT_PREFIX + path.name)):
                return False
            continue
        return not ondisk.is_whiteout_stat(st)
    return False


def changes(upper: Path, lowers: list[Path]) -> list[tuple[str, str]]:
    """(kind, container path) pairs sorted by path; ``lowers`` top first.

    The upper may belong to a running container that swaps entries for symlinks while it is read: it
    is walked by directory descriptors, never following a symlink (:mod:`store.fdtree`). The lowers
    are stored layers, which nothing changes.
    """
    result: list[tuple[str, str]] = []
    try:
        root_fd = fdtree.open_root(upper)
    except FileNotFoundError:
        return result
    with fdtree.opened(root_fd):
        pending = [("", False)]  # (directory relative to the upper, everything below it is added)
        while pending:
            rel, added = pending.pop()
            try:
                dir_fd = fdtree.open_beneath(root_fd, rel, fdtree.DIR_FLAGS)
            except OSError:  # replaced by a symlink or a file since: nothing below it to list
                continue
            with fdtree.opened(dir_fd):
                pending.extend(_list_dir(dir_fd, rel, added, lowers, result))
    result.sort(key=lambda item: item[1])
    return result


def _list_dir(dir_fd: int, rel: str, added: bool, lowers: list[Path],
              result: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """Append the changes of one open directory to ``result``; its subdirectories to walk."""
    subdirs = []
    for name in sorted(os.listdir(dir_fd)):
        child_rel = f"{rel}/{name}" if rel else name
        if name == ondisk.OPAQUE_MARKER:
            continue
        hidden = ondisk.whited_out_name(name)
        if hidden is not None:
            result.append(("D", "/" + (f"{rel}/{hidden}" if rel else hidden)))
            continue
        try:
            st = fdtree.lstat_in(dir_fd, name)
        except FileNotFoundError:
            continue
        if ondisk.is_whiteout_stat(st):
            result.append(("D", "/" + child_rel))
            continue
        entry_added = added or not _in_lowers(lowers, child_rel)
        result.append(("A" if entry_added else "C", "/" + child_rel))
        if stat.S_ISDIR(st.st_mode):
            subdirs.append((child_rel, entry_added))
    return subdirs
