"""``USER`` / ``-u user[:group]`` resolved against the image's own /etc/passwd and /etc/group.

Docker's rules (runc's ``user.GetExecUser``): a name must exist in /etc/passwd; a number need not,
and then the group is 0 and HOME is ``/``; a group name must exist in /etc/group; supplementary
groups are every /etc/group entry listing the user's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina.errors import ContainerError


@dataclass(frozen=True)
class ExecUser:
    uid: int
    gid: int
    home: str = "/"
    groups: list[int] = field(default_factory=list)


def _read_db(path: str | None) -> list[list[str]]:
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def resolve_user(spec: str, passwd_path: str | None, group_path: str | None) -> ExecUser:
    """Resolve ``user[:group]`` (names or numbers); raise ContainerError naming what is missing."""
    user_part, _, group_part = (spec or "0").partition(":")
    passwd = [e for e in _read_db(passwd_path) if len(e) >= 7]
    groups = [e for e in _read_db(group_path) if len(e) >= 3]

    entry = None
    for e in passwd:
        if e[0] == user_part or (user_part.isdigit() and e[2] == user_part):
            entry = e
            break
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
            for g in groups:
                if g[0] == group_part:
                    gid = int(g[2])
                    break
            else:
                raise ContainerError(f"unable to find group {group_part}: no matching entries in group file")
    supplementary: list[int] = []
    if name is not None and not group_part:
        for g in groups:
            members = g[3].split(",") if len(g) > 3 and g[3] else []
            if name in members and g[2].isdigit() and int(g[2]) != gid:
                supplementary.append(int(g[2]))
    return ExecUser(uid, gid, home, supplementary)
