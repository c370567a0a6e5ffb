"""Print a union mount's tree as lines to compare: one line per entry, sorted by path.

Used by bench/outside/fsstress.sh to compare what a FUSE union showed before its unmount with what
the kernel's overlayfs shows over the same layers afterwards. Each line holds what the union must
keep true: type, mode, owner, size, mtime (ns), device numbers, symlink target, a SHA-256 of
regular files' contents and the user.* extended attributes. Inode numbers, atime and ctime are left
out: they legitimately differ between two mounts of the same layers. So is the link count: for a
lower file with several names the kernel's overlayfs (index=off) reports the lower inode's count,
names it has whited out included, and splits a name off at copy-up, where lamina counts the names
the union shows and keeps them linked (docs/outside-suites.md).

Usage: python3 tree_snapshot.py ROOT > snapshot.txt
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys


def _xattrs(path: str) -> str:
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
    except OSError as e:
        return f"xattr-error:{e.errno}"
    parts = []
    for n in names:
        try:
            v = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            parts.append(f"{n}=error:{e.errno}")
            continue
        parts.append(f"{n}={hashlib.sha256(v).hexdigest()[:16]}")
    return ",".join(parts)


def _content(path: str, st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            return f"read-error:{e.errno}"
        return h.hexdigest()[:32]
    if stat.S_ISLNK(st.st_mode):
        return "-> " + os.readlink(path)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"dev {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return ""


def describe(root: str, path: str) -> str | None:
    rel = os.path.relpath(path, root)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # Listed but not there: the kernel's overlayfs lists a lower whiteout (a 0:0 character
        # device, which fsstress's mknod makes in the lower layer) in a directory only that layer
        # holds; lamina does not list it. Neither can open it: it is not part of the tree.
        return None
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else "-"
    return (f"{rel} {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} size={size} "
            f"mtime={st.st_mtime_ns} "
            f"{_content(path, st)} {_xattrs(path)}").rstrip()


def snapshot(root: str) -> list[str]:
    lines = [describe(root, root)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            lines.append(describe(root, os.path.join(dirpath, name)))
    return sorted(line for line in lines if line is not None)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tree_snapshot.py ROOT")
    sys.stdout.write("".join(line + "\n" for line in snapshot(sys.argv[1])))
