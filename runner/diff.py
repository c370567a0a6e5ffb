"""``lamina diff``: what a container changed, read from its upper directory (docker's A/C/D lines).

An entry of the upper is ``D`` when it is a whiteout, ``C`` when the path also exists in a lower
layer (a copied-up file or a directory whose contents changed), ``A`` otherwise; everything below an
added directory is added too. Whiteouts and opaque markers are recognised by :mod:`unionfs.ondisk`
only.
"""

from __future__ import annotations

import os
from pathlib import Path

from unionfs import ondisk


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
    """(kind, container path) pairs sorted by path; ``lowers`` top first."""
    result: list[tuple[str, str]] = []

    def walk(directory: Path, rel: str, added: bool) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name == ondisk.OPAQUE_MARKER:
                continue
            hidden = ondisk.whited_out_name(entry.name)
            if hidden is not None:
                result.append(("D", "/" + (f"{rel}/{hidden}" if rel else hidden)))
                continue
            st = entry.stat(follow_symlinks=False)
            if ondisk.is_whiteout_stat(st):
                result.append(("D", "/" + child_rel))
                continue
            entry_added = added or not _in_lowers(lowers, child_rel)
            result.append(("A" if entry_added else "C", "/" + child_rel))
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), child_rel, entry_added)

    walk(upper, "", False)
    result.sort(key=lambda item: item[1])
    return result
