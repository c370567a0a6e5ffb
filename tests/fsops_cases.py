"""The differential test's hand-written cases: regressions found by the random runs, kept small and
explicit. See tests/fsops.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsops_lowers import PAST, _whiteout

# --- hand-written cases (regressions found by the random runs, kept small and explicit) ------------


def _lowers_setgid_dir(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "sg").mkdir(parents=True)
    os.chown(bottom / "sg", 1000, 1000)
    os.chmod(bottom / "sg", 0o2775)
    (bottom / "sg" / "old").mkdir()
    (top / "plain").mkdir(parents=True)
    (top / "plain" / "f").write_bytes(b"x")
    return [top, bottom]


def _lowers_one_file(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d" / "f").write_bytes(b"lower data")
    os.utime(bottom / "d" / "f", (PAST, PAST))
    top.mkdir()
    (top / "g").write_bytes(b"top")
    return [top, bottom]


def _lowers_hardlinks(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    for d in ("p", "q"):
        (bottom / d).mkdir(parents=True)
    (bottom / "p" / "f").write_bytes(b"0123456789")
    os.link(bottom / "p" / "f", bottom / "q" / "g")
    for p in (bottom / "p", bottom / "q"):
        os.utime(p, (PAST, PAST))
    top.mkdir()
    return [top, bottom]


def _lowers_dirs(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "a" / "b" / "c").mkdir(parents=True)
    (bottom / "a" / "b" / "c" / "f").write_bytes(b"f")
    (bottom / "a" / "b" / "c" / "g").write_bytes(b"g")
    os.mkfifo(bottom / "a" / "fifo", 0o644)
    (bottom / "a" / "file").write_bytes(b"data")
    for p in (bottom / "a" / "b" / "c", bottom / "a" / "b", bottom / "a"):
        os.utime(p, (PAST, PAST))
    top.mkdir()
    (top / "a").mkdir()
    os.utime(top / "a", (PAST + 5, PAST + 5))
    return [top, bottom]


def _lowers_dir_over_file(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d" / "x").write_bytes(b"a file in the lower layer")
    (top / "d" / "x").mkdir(parents=True)
    (top / "d" / "x" / "f").write_bytes(b"f")
    for p in (top / "d" / "x", top / "d", bottom / "d"):
        os.utime(p, (PAST, PAST))
    return [top, bottom]


def _lowers_whited_out_parent(base: Path) -> list[Path]:
    top, middle, bottom = base / "l0", base / "l1", base / "l2"
    for rel in ("a/d/kept", "a/b/f", "c/old"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(rel.encode())
    (top / "n").mkdir()
    middle.mkdir()
    _whiteout(middle / "a")
    (bottom / "a" / "d").mkdir(parents=True)
    (bottom / "a" / "d" / "hidden").write_bytes(b"hidden by the middle layer")
    (bottom / "a" / "x").write_bytes(b"x")
    for p in (top / "a" / "d", top / "a" / "b", top / "a", top / "c", top / "n", bottom / "a" / "d",
              bottom / "a"):
        os.utime(p, (PAST, PAST))
    return [top, middle, bottom]


CASES: dict[str, tuple[Callable[[Path], list[Path]], list[list[Any]]]] = {
    # mkdir inside a (copied-up) setgid directory inherits S_ISGID and the group, as on any fs.
    "setgid-mkdir": (_lowers_setgid_dir, [["mkdir", "sg/new", 0o755], ["stat", "sg/new"],
                                          ["chmod", "", 0o2755], ["mkdir", "n", 0o755], ["stat", "n"],
                                          ["rmtree_mkdir", "sg/old"], ["stat", "sg/old"]]),
    # The mount's root directory takes user xattrs like any directory.
    "root-xattr": (_lowers_one_file, [["setxattr", "", "user.a", "6869"], ["getxattr", "", "user.a"],
                                      ["listxattr", ""], ["removexattr", "", "user.a"]]),
    # Files hardlinked in a lower layer through copy-up: nlink, data, xattrs of each name, and the
    # times of their parents, exactly as the kernel (index=on by default: the link holds).
    "hardlink-copyup": (_lowers_hardlinks, [["write", "p/f", 2, "4142"], ["stat", "p/f"], ["stat", "q/g"],
                                            ["read", "q/g"], ["setxattr", "q/g", "user.x", "31"],
                                            ["listxattr", "p/f"], ["stat", "p"], ["stat", "q"],
                                            ["link", "q/g", "q/h"], ["stat", "p/f"], ["unlink", "q/g"],
                                            ["stat", "p/f"]]),
    # The same when the other name was never looked up before the write (no tree walk in between).
    "hardlink-copyup-cold": (_lowers_hardlinks, [["write", "p/f", 2, "4142"], ["read", "q/g"], ["stat", "q/g"],
                                                 ["stat", "p/f"]]),
    # Removing or renaming one name of a lower hardlink changes the other names' link count.
    "hardlink-unlink": (_lowers_hardlinks, [["unlink", "q/g"], ["stat", "p/f"], ["link", "p/f", "q/h"],
                                            ["stat", "p/f"], ["rename", "q/h", "p/h"], ["stat", "p/f"],
                                            ["stat", "p/h"]]),
    # Renaming a lower directory away updates its old parent's times; its whiteouts stay meaningful
    # (or, when it is copied up whole, are dropped: an opaque copy has nothing below to hide).
    "rename-lower-dir": (_lowers_dirs, [["unlink", "a/b/c/f"], ["rename", "a/b/c", "a/n"], ["stat", "a/b"],
                                        ["readdir", "a/n"], ["stat", "a"], ["rename", "a/n", "m"],
                                        ["readdir", "m"], ["stat", "a"]]),
    # The same for a directory of the top lower over a file of the one below (whiteout needed).
    "rename-dir-over-lower-file": (_lowers_dir_over_file, [["rename", "d/x", "y"], ["stat", "d"],
                                                            ["readdir", "d"], ["readdir", "y"]]),
    # A file deleted inside a lower directory stays deleted when the directory is renamed (in a user
    # namespace the directory is copied up whole: the copy must be of the merged view).
    "rename-dir-with-deleted-file": (_lowers_dirs, [["unlink", "a/b/c/f"], ["rename", "a/b", "n"],
                                                     ["readdir", "n/c"], ["stat", "n/c/f"], ["stat", "n/c"]]),
    # The same with the deleted file's directory given an old time: dropping its whiteout when the
    # directory is copied up whole (user namespace) is no change anybody made, and keeps its mtime.
    "rename-dir-with-deleted-file-times": (_lowers_dirs, [
        ["unlink", "a/b/c/f"], ["utime", "a/b/c", (PAST + 7) * 10**9, (PAST + 7) * 10**9 + 5], ["rename", "a/b", "n"],
        ["stat", "n/c"], ["rename_exchange", "n", "a"], ["stat", "a/c"]]),
    # An open FIFO whose name is renamed over still answers fstat.
    "fifo-replaced-open": (_lowers_dirs, [["replaced_open", "a/file", "a/fifo"], ["stat", "a/fifo"]]),
    # A name removed while the kernel still holds its node (FORGET not yet sent): the backing
    # filesystem must not give its inode number to a new file meanwhile (ext4 reuses a freed number
    # at once), or the new file's number would collide with the live node's and change at remount.
    "removed-while-held": (_lowers_hardlinks, [
        ["create", "n", 0o644, "6e"], ["while_held", "n", [["unlink", "n"], ["create", "m", 0o644, ""],
                                                        ["create", "a", 0o644, ""]]],
        ["mkdir", "d", 0o755], ["while_held", "d", [["rmdir", "d"], ["mkdir", "e", 0o755],
                                                    ["mkfifo", "b", 0o644]]],
        ["create", "x", 0o644, "78"], ["create", "y", 0o644, "79"],
        ["while_held", "y", [["rename", "x", "y"], ["symlink", "n", "c"], ["mkdir", "f", 0o700]]],
        ["mkdir", "g", 0o755], ["create", "g/h", 0o644, ""], ["link", "g/h", "i"],
        ["while_held", "g/h", [["unlink", "g/h"], ["stat", "i"], ["create", "g/j", 0o644, ""]]],
        ["while_held", "p/f", [["unlink", "p/f"], ["stat", "q/g"], ["create", "p/k", 0o644, ""]]]]),
    # The same for a lower hardlink whose other name the kernel has not seen yet: that name is the
    # removed node itself (one file), not a new one.
    "removed-while-held-cold": (_lowers_hardlinks, [
        ["while_held", "p/f", [["unlink", "p/f"], ["stat", "q/g"], ["create", "p/k", 0o644, ""]]],
        ["read", "q/g"]]),
    # A lower directory renamed away keeps hidden what a middle layer whited out above it (its
    # redirect is walked per layer), also after a remount; and a redirect into an opaque directory
    # still reaches the lowers.
    "rename-dir-under-whited-out-parent": (_lowers_whited_out_parent, [
        ["rename", "a/d", "n/m"], ["readdir", "n/m"], ["rmtree_mkdir", "c"], ["rename", "a", "c/a"],
        ["readdir", "c/a"], ["stat", "c/a/b"]]),
    # fstat of a file open after unlink counts the names it still has (the kernel asks the upper
    # inode, or for an indexed lower hardlink the merged count): another name of a lower hardlink
    # (never looked up before: a cold case, no tree walks in between), the last name of it, an upper
    # hardlink.
    "unlinked-open-hardlink-cold": (_lowers_hardlinks, [
        ["unlinked_open", "p/f"], ["stat", "q/g"], ["unlinked_open", "q/g"], ["create", "n", 0o644, "6e"],
        ["link", "n", "m"], ["unlinked_open", "n"], ["stat", "m"], ["unlinked_open", "m"]]),
    # A rename of a lower directory over a non-empty upper-only one fails, but the kernel got as far
    # as the upper rename (with RENAME_WHITEOUT), and ext4 stamps the source's parent on the way.
    # Over a merged target the kernel refuses before touching anything.
    "rename-over-nonempty-upper-dir": (_lowers_dirs, [
        ["mkdir", "n", 0o755], ["create", "n/f", 0o644, ""], ["rename", "a/b", "n"], ["stat", "a"],
        ["rename", "a/b/c", "a"], ["stat", "a/b"], ["rename", "n", "a/b"], ["stat", ""]]),
    # The same refusal below a renamed lower directory (found by seed 22 in a user namespace): the
    # kernel reaches the source's lower through its redirect, so it tries RENAME_WHITEOUT and ext4
    # stamps the source's parent; where lamina copied the directory up whole instead (user
    # namespace), nothing below shows that name and the kernel itself would leave the time alone
    # (see ENOTEMPTY_STAMP_NOTE).
    "rename-refused-below-renamed-lower-dir": (_lowers_dirs, [
        ["rename", "a", "n"], ["mkdir", "m", 0o755], ["create", "m/f", 0o644, ""], ["stat", "n/b"],
        ["rename", "n/b/c", "m"], ["stat", "n/b"], ["readdir", "n/b"], ["stat", "n"]]),
    # An append right after a listing, with no stat between, on a fresh mount: the kernel starts
    # an O_APPEND write at the size it holds, so a listing must not have told it a wrong one (a
    # lower file, then one the first append copied up; then an upper file made through the mount).
    "append-after-listing-cold": (_lowers_one_file, [
        ["append_after_listing", "d/f", "6d6f640a"], ["append_after_listing", "d/f", "6d6f640a"],
        ["append_after_listing", "g", "6d6f640a"], ["create", "d/n", 0o644, "6e6577"],
        ["append_after_listing", "d/n", "6d6f640a"], ["read", "d/f"], ["read", "g"], ["read", "d/n"]]),
    # The same while another thread lists the directory all the time.
    "append-while-listing-cold": (_lowers_one_file, [
        ["append_while_listing", "d/f", "61626364656667"], ["append_while_listing", "g", "6162636465666768"]]),
    # open(O_RDONLY | O_TRUNC) truncates (Linux does, whatever the access mode), lower or upper.
    "open-rdonly-trunc": (_lowers_one_file, [
        ["open_rdonly_trunc", "d/f"], ["stat", "d/f"], ["create", "n", 0o644, "6e6577"],
        ["open_rdonly_trunc", "n"], ["stat", "n"], ["symlink", "g", "s"], ["open_rdonly_trunc", "s"],
        ["stat", "g"]]),
    # A copied-up file keeps its inode number, also after a remount.
    "copyup-ino-remount": (_lowers_one_file, [["write", "d/f", 2, "4142"], ["chmod", "g", 0o600],
                                              ["read", "d/f"]]),
}
