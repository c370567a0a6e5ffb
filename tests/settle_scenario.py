"""An upper directory with every kind of entry, and the two ways of making it a stored layer.

Used by tests/test_store_settle.py, in-process (as root) and as a script run as root of a user
namespace with a range of ids mapped (``python tests/settle_scenario.py WORKDIR``), the way a
rootless RUN step's upper is committed. The oracle is the unpacker: the settled upper must be,
entry for entry, the directory that unpacking the tar packed from the same upper gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from lamina.store.layer_pack import IdMap, pack_layer
from lamina.store.layer_unpack import is_host_root, unpack_layer
from unionfs.core import ondisk

OTHER_ID = 1000  # an id other than the committer's, mapped in the namespace
NS_MTIME = 1_700_000_000_123_456_789


def make_upper(root: Path) -> None:
    """Fill ``root`` (which must not exist) as a RUN step could have left it."""
    root.mkdir()
    privileged = is_host_root()
    (root / "a").mkdir()
    plain = root / "a/plain"
    plain.write_text("plain\n")
    os.link(plain, root / "a/hardlink")
    for name, mode in (("exec", 0o755), ("readonly", 0o444), ("nothing", 0o000), ("setuid", 0o4755)):
        (root / "a" / name).write_bytes(name.encode())
        os.chmod(root / "a" / name, mode)
    (root / "a/big").write_bytes(hashlib.sha256(b"big").digest() * (3 << 15))
    os.utime(root / "a/plain", ns=(NS_MTIME, NS_MTIME))
    os.setxattr(root / "a/plain", "user.kept", b"value")
    os.setxattr(root / "a/plain", "user.overlay.origin", b"private")
    os.setxattr(root / "a/plain", "user.fuseoverlayfs.x", b"private")
    if privileged:
        os.setxattr(root / "a/plain", "trusted.lamina-test", b"dropped")
    (root / "owned").mkdir(mode=0o750)
    (root / "owned/file").write_text("someone else's\n")
    os.chmod(root / "owned/file", 0o640)
    os.symlink("../a/plain", root / "owned/link")
    (root / "owned/setcap").write_bytes(b"\x7fELF")
    os.chmod(root / "owned/setcap", 0o755)
    with contextlib.suppress(OSError):  # EINVAL where only one id is mapped
        for path in (root / "owned/file", root / "owned/setcap", root / "owned"):
            os.chown(path, OTHER_ID, OTHER_ID)
        os.chown(root / "owned/link", OTHER_ID, OTHER_ID, follow_symlinks=False)
    with contextlib.suppress(PermissionError):  # a user namespace without CAP_SETFCAP over its owner
        # cap_net_raw+ep; set after chown (chown drops it), as a RUN's setcap would leave it.
        os.setxattr(root / "owned/setcap", "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
    # Hard links whose first name gets settled before the second is packed.
    os.link(root / "owned/file", root / "owned/file-link")
    os.link(root / "a/readonly", root / "a/readonly-link")
    (root / "ro").mkdir()
    (root / "ro/inside").write_text("x")
    os.chmod(root / "ro", 0o555)
    os.symlink("/nowhere", root / "a/dangling")
    os.mkfifo(root / "a/fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "a/sock"))
    os.mknod(root / "a/gone", stat.S_IFCHR, os.makedev(0, 0))
    (root / "a/.wh.also-gone").write_bytes(b"")
    (root / "opaque").mkdir()
    ondisk.mark_opaque(str(root / "opaque"))
    (root / "opaque/new").write_text("n")
    (root / "opaque-by-file").mkdir()
    (root / "opaque-by-file" / ondisk.OPAQUE_MARKER).write_bytes(b"")
    # A file whose owner the union recorded in an override (a single-id user's chown).
    (root / "a/overridden").write_text("o")
    ondisk.write_owner_override(str(root / "a/overridden"), ondisk.OwnerOverride(7, 8, 0o600))
    if privileged:
        os.mknod(root / "a/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        fd = ondisk.write_device_placeholder(os.open(root / "a", os.O_RDONLY), "null",
                                             ondisk.OwnerOverride.for_device(0, 0, stat.S_IFCHR | 0o666, 1, 3))
        os.close(fd)
    (root / "deep/er/still").mkdir(parents=True)
    (root / "deep/er/still/leaf").write_text("leaf")
    os.utime(root / "deep/er", ns=(NS_MTIME, NS_MTIME))


def snapshot(root: Path) -> dict[str, Any]:
    """Everything on disk about every entry below ``root`` that a layer's reader could see.

    Whiteouts' times and the access times of directories and symlinks are left out (made at
    unpack time, or moved by this walk, which lists directories and follows symlinks)."""
    entries: dict[str, Any] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            record: dict[str, Any] = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
            whiteout = ondisk.is_whiteout_stat(st)
            if not whiteout:
                record["mtime_ns"] = st.st_mtime_ns
            if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode) and not whiteout:
                record["atime_ns"] = st.st_atime_ns
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1 and (st.st_dev, st.st_ino) in inodes:
                    record = {"hardlink_to": inodes[(st.st_dev, st.st_ino)]}
                else:
                    inodes[(st.st_dev, st.st_ino)] = rel
                    record["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                record["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                record["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                record["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False)
                                    for n in sorted(os.listxattr(path, follow_symlinks=False))}
            entries[rel] = record
    root_st = os.lstat(root)
    entries["."] = {"mode": oct(root_st.st_mode), "uid": root_st.st_uid, "gid": root_st.st_gid,
                    "xattrs": {n: os.getxattr(root, n) for n in sorted(os.listxattr(root))}}
    return entries


def _pack(root: Path, settle: bool = False) -> tuple[bytes, str]:
    out = io.BytesIO()
    result = pack_layer(root, out, compress=False, idmap=IdMap(), settle=settle)
    return out.getvalue(), result.diff_id


def compare_both_ways(work: Path) -> dict[str, Any]:
    """Make the same upper twice; unpack one's tar (the old way) and settle the other (the new
    way). Returns what the caller asserts on."""
    make_upper(work / "upper-old")
    make_upper(work / "upper-new")
    # The two uppers differ only in their times of creation: give them the same.
    _same_times(work / "upper-old", work / "upper-new")
    old_tar, old_diff_id = _pack(work / "upper-old")
    (work / "layer.tar").write_bytes(old_tar)
    unpack_layer(work / "layer.tar", work / "unpacked", work / "tmp")
    _, new_diff_id = _pack(work / "upper-new", settle=True)
    # Snapshots first: packing reads files, which moves their access times.
    found = {"unpacked": snapshot(work / "unpacked"), "settled": snapshot(work / "upper-new")}
    return {"old_diff_id": old_diff_id, "new_diff_id": new_diff_id,
            "repacked_settled": _pack(work / "upper-new")[1], "repacked_unpacked": _pack(work / "unpacked")[1],
            **found}


def _same_times(source: Path, dest: Path) -> None:
    """Copy every entry's times from ``source`` to the same path in ``dest`` (deepest first)."""
    for dirpath, dirnames, filenames in os.walk(source, topdown=False):
        for name in dirnames + filenames + ([""] if dirpath != str(source) else []):
            path = os.path.join(dirpath, name) if name else dirpath
            other = os.path.join(dest, os.path.relpath(path, source))
            st = os.lstat(path)
            os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


if __name__ == "__main__":
    import json

    found = compare_both_ways(Path(sys.argv[1]))
    print(json.dumps(found, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
