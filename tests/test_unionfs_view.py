"""The read-only merged view (unionfs.core.view) against the kernel's overlayfs as the oracle.

The same layers are mounted with ``mount -t overlay`` (root only) and the whole merged tree is
compared: names, types, permission bits, owners, sizes, contents and symlink targets.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from unionfs.core import ondisk
from unionfs.core.stack import LayerStack
from unionfs.core.view import MergedView

Tree = dict[str, tuple[object, ...]]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs and trusted xattrs need root")


def _describe(st: os.stat_result, read: object, link: object) -> tuple[object, ...]:
    kind = stat.S_IFMT(st.st_mode)
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = hashlib.sha256(read()).hexdigest()  # type: ignore[operator]
    elif stat.S_ISLNK(st.st_mode):
        content = link()  # type: ignore[operator]
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
    return kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, content


def kernel_tree(root: Path) -> Tree:
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            tree["/" + os.path.relpath(path, root)] = _describe(
                st, lambda p=path: Path(p).read_bytes(), lambda p=path: os.readlink(p))
    return tree


def view_tree(stack: LayerStack) -> Tree:
    tree: Tree = {}
    with MergedView(stack) as view:
        for entry in view.walk():
            tree[entry.path] = _describe(entry.st, lambda e=entry: view.read_bytes(e),
                                         lambda e=entry: view.readlink(e))
    return tree


def whiteout(parent: Path, name: str) -> None:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ondisk.make_whiteout(fd, name)
    finally:
        os.close(fd)


def write(path: Path, text: str = "x", mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def build_layers(base: Path, redirects: bool) -> LayerStack:
    """Three layers in the kernel's format: whiteouts, opaque directories, nested deletions,
    a file replaced by a directory and back, and (when asked) a renamed directory's redirect."""
    bottom, middle, top = (base / n for n in ("bottom", "middle", "top"))
    write(bottom / "etc" / "passwd", "root:x:0:0::/root:/bin/sh\n")
    write(bottom / "etc" / "group", "root:x:0:\n")
    write(bottom / "etc" / "sub" / "f", "lower sub\n", 0o600)
    write(bottom / "usr" / "bin" / "tool", "#!/bin/sh\n", 0o755)
    os.symlink("usr/bin/tool", bottom / "tool-link")
    write(bottom / "nest" / "x" / "y" / "z" / "deep", "deep\n")
    write(bottom / "nest" / "x" / "keep", "keep\n")
    write(bottom / "was-file", "file\n")
    write(bottom / "was-dir" / "inside", "inside\n")
    write(bottom / "ren" / "src" / "inner" / "f", "renamed contents\n")
    os.chown(bottom / "usr" / "bin" / "tool", 123, 456)
    os.mkfifo(bottom / "fifo")

    whiteout(middle / "etc" if (middle / "etc").mkdir(parents=True) is None else middle, "group")
    write(middle / "etc" / "sub" / "new", "opaque's own\n")
    os.setxattr(middle / "etc" / "sub", ondisk.TRUSTED_OPAQUE, b"y")
    (middle / "nest" / "x").mkdir(parents=True)
    whiteout(middle / "nest" / "x", "y")
    write(middle / "was-file" / "now-dir", "dir now\n")
    write(middle / "was-dir", "file now\n", 0o640)
    write(middle / "usr" / "bin" / "tool", "#!/bin/sh\necho new\n", 0o750)
    if redirects:
        (middle / "ren" / "dst").mkdir(parents=True)
        os.setxattr(middle / "ren" / "dst", ondisk.TRUSTED_REDIRECT, b"src")  # renamed in place
        whiteout(middle / "ren", "src")
        write(bottom / "away" / "old" / "g", "moved far\n")
        (middle / "moved" / "here").mkdir(parents=True)
        os.setxattr(middle / "moved" / "here", ondisk.TRUSTED_REDIRECT, b"/away/old")  # to elsewhere
        (middle / "away").mkdir()
        whiteout(middle / "away", "old")

    write(top / "nest" / "x" / "y" / "new", "recreated\n")
    write(top / "etc" / "sub" / "top", "top\n")
    os.symlink("/etc/passwd", top / "abs-link")
    write(top / "etc" / "passwd", "changed\n", 0o640)
    return LayerStack.from_bottom_up([bottom, middle, top])


def _mount_overlay(stack: LayerStack, mnt: Path, redirects: bool) -> bool:
    options = "lowerdir=" + ":".join(str(p) for p in stack.top_down())
    if redirects:
        options += ",redirect_dir=follow"
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)],
                            capture_output=True, text=True)
    return result.returncode == 0


@needs_root
@pytest.mark.parametrize("redirects", [False, True], ids=["plain", "redirects"])
def test_view_matches_kernel_overlayfs(tmp_path: Path, redirects: bool) -> None:
    stack = build_layers(tmp_path, redirects)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount_overlay(stack, mnt, redirects):
        pytest.skip("the kernel's overlayfs refuses this mount here" + (" (redirect_dir)" if redirects else ""))
    try:
        expected = kernel_tree(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    if redirects and not {"/ren/dst/inner/f", "/moved/here/g"} <= set(expected):
        pytest.skip("this kernel does not follow redirects in lower layers")
    assert "/etc/group" not in expected and "/nest/x/y/z" not in expected  # the layers say something
    assert view_tree(stack) == expected


def test_oci_whiteout_files_mean_the_same(tmp_path: Path) -> None:
    """``.wh.NAME`` and ``.wh..wh..opq`` (the OCI tar form) hide what char 0/0 and xattrs hide."""
    low, up = tmp_path / "low", tmp_path / "up"
    write(low / "gone")
    write(low / "d" / "hidden")
    write(low / "kept")
    write(up / ".wh.gone", "")
    write(up / "d" / ".wh..wh..opq", "")
    write(up / "d" / "mine")
    with MergedView(LayerStack.from_bottom_up([low, up])) as view:
        assert [e.path for e in view.walk()] == ["/d", "/d/mine", "/kept"]
        assert view.lookup("/gone") is None and view.lookup("/.wh.gone") is None
        entry = view.lookup("/kept")
        assert entry is not None and view.read_bytes(entry) == b"x"
        with pytest.raises(PermissionError):
            view.open(entry, os.O_WRONLY)
        with pytest.raises(FileNotFoundError):
            view.stat("/d/hidden")
