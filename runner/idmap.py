"""The uid/gid maps of a container's user namespace.

* real root: the identity map of the whole id range (files owned by uid N on disk are uid N inside);
* a user with subordinate ids in /etc/subuid and /etc/subgid: 0 -> the user, 1..N -> the
  subordinate range, written by the setuid helpers ``newuidmap`` / ``newgidmap``;
* a user without: the single map 0 -> the user, which a process may write for itself once
  ``setgroups`` is denied.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from lamina.errors import ContainerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdMap:
    """One line of a uid_map/gid_map: ``inside outside count``."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMapping:
    uids: list[IdMap]
    gids: list[IdMap]
    helper: bool  # written by newuidmap/newgidmap (setgroups stays allowed)

    @property
    def single(self) -> bool:
        return len(self.uids) == 1 and self.uids[0].count == 1


def _subordinate_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) != 3 or fields[0] not in (user, str(uid)):
                    continue
                try:
                    start, count = int(fields[1]), int(fields[2])
                except ValueError:
                    continue
                if count > 0:
                    return start, count
    except OSError:
        return None
    return None


def current_mapping() -> IdMapping:
    """The mapping lamina uses for the calling user."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        full = [IdMap(0, 0, 4294967295)]
        return IdMapping(full, full, helper=False)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    subuid = _subordinate_range("/etc/subuid", user, uid)
    subgid = _subordinate_range("/etc/subgid", user, uid)
    if subuid and subgid and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return IdMapping([IdMap(0, uid, 1), IdMap(1, subuid[0], subuid[1])],
                         [IdMap(0, gid, 1), IdMap(1, subgid[0], subgid[1])], helper=True)
    return IdMapping([IdMap(0, uid, 1)], [IdMap(0, gid, 1)], helper=False)


def apply_mapping(pid: int, mapping: IdMapping) -> None:
    """Write ``mapping`` for process ``pid`` (which has just unshared its user namespace)."""
    if mapping.helper:
        for tool, maps in (("newuidmap", mapping.uids), ("newgidmap", mapping.gids)):
            args = [tool, str(pid)]
            for m in maps:
                args += [str(m.inside), str(m.outside), str(m.count)]
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ContainerError(f"{tool} failed: {proc.stderr.strip() or proc.returncode}")
        return
    try:
        if os.geteuid() != 0:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        for name, maps in (("uid_map", mapping.uids), ("gid_map", mapping.gids)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("".join(f"{m.inside} {m.outside} {m.count}\n" for m in maps))
    except OSError as e:
        raise ContainerError(f"cannot write the user namespace's id map: {e.strerror}") from e


def is_mapped(inside: int, map_file: str) -> bool:
    """True when id ``inside`` is mapped in this process's namespace (``/proc/self/uid_map`` etc.)."""
    try:
        with open(map_file) as f:
            for line in f:
                a, _, c = (int(x) for x in line.split())
                if a <= inside < a + c:
                    return True
    except (OSError, ValueError):
        return True
    return False
