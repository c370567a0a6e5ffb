"""``USER`` / ``-u user[:group]`` resolved against the image's own /etc/passwd and /etc/group.

Docker's rules (runc's ``user.GetExecUser``): a name must exist in /etc/passwd; a number need not,
and then the group is 0 and HOME is ``/``; a group name must exist in /etc/group; supplementary
groups are every /etc/group entry listing the user's name.

This parser is the only way lamina learns an image's users. Nothing on the host side calls the C
library's ``getpwnam``/``getgrnam`` (or Python's ``pwd``/``grp``) for them: with a container's root
those would read its ``/etc/nsswitch.conf`` and load its ``libnss_*.so`` into a host process
(CVE-2019-14271, ``docker cp``). The files are streamed line by line with lamina's limits
(:mod:`lamina.bounded`): an image whose /etc/passwd is a sparse 512 MiB file costs one line of
memory and is refused past the limit, not read whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from lamina.bounded import TEXT_LIMIT, bounded_lines
from lamina.errors import ContainerError

# Opens an image's database (its path inside the image) for reading, or returns None when absent.
Opener = Callable[[str], "IO[bytes] | None"]


@dataclass(frozen=True)
class ExecUser:
    uid: int
    gid: int
    home: str = "/"
    groups: list[int] = field(default_factory=list)


def open_host_path(path: str | None) -> IO[bytes] | None:
    """An opened database file at a path of this process's view (None when absent or unreadable)."""
    if path is None:
        return None
    try:
        return open(path, "rb")
    except OSError:
        return None


def database_entries(stream: IO[bytes] | None, name: str, min_fields: int) -> Iterator[list[str]]:
    """The ``:``-separated entries of an image's passwd or group file ``name``, streamed.

    Comments, blank lines and entries with fewer than ``min_fields`` fields are skipped. Closes
    ``stream``. InputTooLarge past lamina's line or total limit.
    """
    if stream is None:
        return
    with stream:
        for raw in bounded_lines(stream, f"the image's {name}", total_limit=TEXT_LIMIT):
            line = raw.decode("utf-8", "replace")
            if not line or line.startswith("#"):
                continue
            fields = line.split(":")
            if len(fields) >= min_fields:
                yield fields


def find_entry(stream: IO[bytes] | None, name: str, min_fields: int,
               match: Callable[[list[str]], bool]) -> list[str] | None:
    """The first entry of the database ``name`` for which ``match`` is true, or None."""
    return next((fields for fields in database_entries(stream, name, min_fields) if match(fields)), None)


def resolve_user(spec: str, passwd_path: str | None, group_path: str | None) -> ExecUser:
    """Resolve ``user[:group]`` (names or numbers); raise ContainerError naming what is missing."""
    return resolve_user_in(spec, lambda db: open_host_path(passwd_path if db == "/etc/passwd" else group_path))


def resolve_user_in(spec: str, open_db: Opener) -> ExecUser:
    """:func:`resolve_user` with the image's databases opened by ``open_db("/etc/passwd")`` and
    ``open_db("/etc/group")``."""
    user_part, _, group_part = (spec or "0").partition(":")
    entry = find_entry(open_db("/etc/passwd"), "/etc/passwd", 7,
                       lambda e: e[0] == user_part or (user_part.isdigit() and e[2] == user_part))
    if entry is not None:
        try:
            uid, gid, home, name = int(entry[2]), int(entry[3]), entry[5] or "/", entry[0]
        except ValueError as err:
            raise ContainerError(f"malformed /etc/passwd entry for user {user_part!r}") from err
    elif user_part.isdigit():
        uid, gid, home, name = int(user_part), 0, "/", None
    else:
        raise ContainerError(f"unable to find user {user_part}: no matching entries in passwd file")

    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            group = find_entry(open_db("/etc/group"), "/etc/group", 3, lambda g: g[0] == group_part)
            if group is None or not group[2].isdigit():
                raise ContainerError(f"unable to find group {group_part}: no matching entries in group file")
            gid = int(group[2])
    supplementary: list[int] = []
    if name is not None and not group_part:
        for g in database_entries(open_db("/etc/group"), "/etc/group", 3):
            members = g[3].split(",") if len(g) > 3 and g[3] else []
            if name in members and g[2].isdigit() and int(g[2]) != gid:
                supplementary.append(int(g[2]))
    return ExecUser(uid, gid, home, supplementary)
