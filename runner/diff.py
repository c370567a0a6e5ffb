"""``lamina diff``: what a container changed, read from its upper directory (docker's A/C/D lines).

An entry of the upper is ``D`` when it is a whiteout, ``C`` when the image (the merged view of its
layers, :mod:`unionfs.core.view`) shows something at that path (a copied-up file, a directory whose
contents changed), ``A`` otherwise; everything below an added directory is added too. An opaque
directory of the upper that replaces one of the image is ``D``: it hides everything the image held
there, and the entries it holds now follow as ``A`` or ``C``, as podman and docker report it
(containers/storage's and moby's overlay change walkers). Whiteouts and opaque markers are
recognised by :mod:`unionfs.core.ondisk` only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lamina.store import fdtree
from unionfs.core import ondisk
from unionfs.core.stack import LayerStack
from unionfs.core.view import MergedView


def changes(upper: Path, lowers: LayerStack) -> list[tuple[str, str]]:
    """(kind, container path) pairs sorted by path.

    The upper may belong to a running container that swaps entries for symlinks while it is read: it
    is walked by directory descriptors, never following a symlink (:mod:`store.fdtree`). The lowers
    are stored layers, which nothing changes.
    """
    result: list[tuple[str, str]] = []
    try:
        root_fd = fdtree.open_root(upper)
    except FileNotFoundError:
        return result
    with fdtree.opened(root_fd), MergedView(lowers) as image:
        pending = [("", False)]  # (directory relative to the upper, everything below it is added)
        while pending:
            rel, added = pending.pop()
            try:
                dir_fd = fdtree.open_beneath(root_fd, rel, fdtree.DIR_FLAGS)
            except OSError:  # replaced by a symlink or a file since: nothing below it to list
                continue
            with fdtree.opened(dir_fd):
                pending.extend(_list_dir(dir_fd, rel, added, image, result))
    result.sort(key=lambda item: item[1])
    return result


def _list_dir(dir_fd: int, rel: str, added: bool, image: MergedView,
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
        entry_added = added or image.lookup(child_rel) is None
        kind = "A" if entry_added else "C"
        if stat.S_ISDIR(st.st_mode) and not entry_added and ondisk.is_opaque_at(dir_fd, name):
            kind = "D"  # it hides the image's directory: what it holds now is listed below it
        result.append((kind, "/" + child_rel))
        if stat.S_ISDIR(st.st_mode):
            subdirs.append((child_rel, entry_added))
    return subdirs
