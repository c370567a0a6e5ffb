"""Copy-up: making the upper hold its own copy of a lower object before it changes.

Order, as the kernel's overlayfs does it: parents first (each directory copied with its owner, mode,
times and xattrs, not its contents); then the object is built under a temporary name in the workdir
(data with holes kept, then owner, then mode -- after chown, which clears setuid/setgid -- then
xattrs, then times), and only then renamed into place. A crash leaves at most a stray file in the
workdir, which is emptied at the next mount; the upper never holds a half-copied file.

The data copy of a regular file is split from the rest (``CopyJob.copy_data``) so the adapter can run
it in a worker thread: it touches only the two descriptors the job owns.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from unionfs.core import fsat, ondisk
from unionfs.core.backing import Layer, copy_file_data, getxattr_at, listxattr_at, lstat_at
from unionfs.core.nodes import OVERRIDE_UNKNOWN, Node
from unionfs.core.tree import UnionTree, ensure_writable

log = logging.getLogger(__name__)

# Xattrs never copied up: the union's own markers (they describe the lower layer, not the object).
_SKIP_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


@dataclass
class CopyJob:
    """One object being copied up; owns ``src_fd``/``dst_fd`` until ``finish_copy_up``."""

    node: Node
    layer: Layer
    path: str
    st: os.stat_result
    tmp: str
    src_fd: int = -1
    dst_fd: int = -1
    copy_bytes: int = 0

    def copy_data(self) -> None:
        """Copy the file's data, holes kept (thread-safe: touches only this job's descriptors)."""
        if self.copy_bytes:
            copy_file_data(self.src_fd, self.dst_fd, self.copy_bytes)

    def close(self) -> None:
        for fd in (self.src_fd, self.dst_fd):
            if fd >= 0:
                os.close(fd)
        self.src_fd = self.dst_fd = -1


def begin_copy_up(tree: UnionTree, node: Node, truncate: bool) -> CopyJob | None:
    """Copy up the parents and create the object in the workdir; None when already in the upper."""
    if node.in_upper:
        return None
    ensure_writable(tree)
    if node.deleted:
        raise OSError(errno.ENOENT, "copy-up of a removed file")
    parent = node.parent
    if parent is not None and not parent.in_upper:
        copy_up(tree, parent)
    layer, path = node.lowers[0]
    st = lstat_at(layer.fd, path)
    if st is None:
        raise OSError(errno.ENOENT, "lower object vanished", path)
    tmp = tree.tmp_name()
    job = CopyJob(node, layer, path, st, tmp)
    work = tree.work_fd
    mode = st.st_mode
    if stat.S_ISREG(mode):
        job.src_fd = fsat.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer.fd)
        job.dst_fd = fsat.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work)
        job.copy_bytes = 0 if truncate else st.st_size
    elif stat.S_ISDIR(mode):
        fsat.mkdir(tmp, 0o700, dir_fd=work)
    elif stat.S_ISLNK(mode):
        fsat.symlink(fsat.readlink(path, dir_fd=layer.fd), tmp, dir_fd=work)
    else:
        # fifos, sockets and device nodes keep their type and device number
        fsat.mknod(tmp, (mode & ~0o7777) | 0o600, st.st_rdev, dir_fd=work)
    return job


def finish_copy_up(tree: UnionTree, job: CopyJob) -> None:
    """Owner, mode, xattrs and times; then rename into the upper and update the node."""
    node, st = job.node, job.st
    work = tree.work_fd
    assert tree.upper is not None
    try:
        target: int | str = job.dst_fd if job.dst_fd >= 0 else f"/proc/self/fd/{work}/{job.tmp}"
        is_link = stat.S_ISLNK(st.st_mode)
        copy_xattrs(job.layer, job.path, target, is_link)
        origin_recorded = _set_xattr_if_allowed(target, tree.origin_xattr, f"{job.layer.slot}:{st.st_ino}".encode())
        if not node.is_dir:
            if st.st_nlink > 1 and tree.index.enabled:
                recorded = tree.index.recorded_link_count(node)  # names removed before this copy-up
                count = st.st_nlink if recorded is None else recorded
                _set_xattr_if_allowed(target, tree.index.nlink_xattr, str(count).encode())
        # A directory's mode is set once it is in place: moving a read-only directory to another
        # parent needs write permission on it (for '..') when we are not root.
        copy_owner_mode_times(target, st, is_link, chmod=not node.is_dir)
        if job.dst_fd >= 0:
            fsat.utime(job.dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        job.close()
        _discard(work, job.tmp)
        raise
    job.close()
    if node.deleted or node.in_upper:
        # removed or copied up by someone else while the data was copied (in a worker thread)
        _discard(work, job.tmp)
        return
    upath = node.path()
    if not origin_recorded and tree.index.enabled:
        # user.* xattrs are refused on symlinks, fifos and devices: the index remembers their origin
        ust = os.lstat(f"/proc/self/fd/{work}/{job.tmp}")
        tree.index.record_origin(ust.st_ino, f"{job.layer.slot}:{st.st_ino}")
    ppath = upath.rpartition("/")[0] or "."
    # Copy-up is not a change the user made: the parent keeps its times (as with the kernel).
    pst = fsat.stat(ppath, dir_fd=tree.upper.fd)
    fsat.rename(job.tmp, upath, src_dir_fd=work, dst_dir_fd=tree.upper.fd)
    fsat.utime(ppath, ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=tree.upper.fd)
    if node.is_dir:
        fsat.chmod(upath or ".", st.st_mode & 0o7777, dir_fd=tree.upper.fd)
    node.in_upper = True
    node.owner_override = OVERRIDE_UNKNOWN  # the copy's own xattr from now on
    # The parent's cached listing named the lower copy: entries made from it must see the upper one.
    tree.touch(node, node.parent, *(p for p, _ in node.links))
    if tree.on_copy_up is not None:
        tree.on_copy_up(node)
    if not node.is_dir:
        # The node keeps its lower identity (recorded in the origin xattr, so a remount finds it
        # again). Other names of a lower hardlink reach the copy: the ones we know are linked now,
        # the others find it through the index when they are looked up.
        if st.st_nlink > 1 and tree.index.enabled:
            tree.index.link_copy(tree.upper.fd, upath, job.layer.slot, st.st_ino)
            tree.index.drop_link_count_record(node)  # the index entry holds the count from now on
        _link_known_aliases(tree, node, upath)
    tree.emit(f"copy-up /{upath} from {job.layer.label.rsplit(':', 1)[0]}")


def copy_up(tree: UnionTree, node: Node, truncate: bool = False) -> None:
    """Copy up ``node`` (and its parents) synchronously."""
    job = begin_copy_up(tree, node, truncate)
    if job is None:
        return
    try:
        job.copy_data()
    except BaseException:
        job.close()
        _discard(tree.work_fd, job.tmp)
        raise
    finish_copy_up(tree, job)


def _link_known_aliases(tree: UnionTree, node: Node, upath: str) -> None:
    """Lower hardlinks we know as one node stay one file: link the copy to their other names."""
    assert tree.upper is not None
    for parent, name in node.links:
        if not parent.in_upper:
            copy_up(tree, parent)
        alias = parent.child_path(name)
        if lstat_at(tree.upper.fd, alias) is None:
            link_keeping_parent_times(tree.upper.fd, upath, alias)


def link_keeping_parent_times(ufd: int, src: str, dst: str) -> None:
    """Hard link in the upper as part of a copy-up: the new name's parent keeps its times."""
    ppath = dst.rpartition("/")[0] or "."
    pst = fsat.stat(ppath, dir_fd=ufd)
    fsat.link(src, dst, src_dir_fd=ufd, dst_dir_fd=ufd, follow_symlinks=False)
    fsat.utime(ppath, ns=(pst.st_atime_ns, pst.st_mtime_ns), dir_fd=ufd)


def _set_xattr_if_allowed(target: int | str, name: str, value: bytes) -> bool:
    """Set an xattr; False where the kernel refuses it (trusted.* as a user, user.* on a symlink or
    device, no xattr support), as its own copy-up skips those too."""
    try:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
            raise
        return False
    return True


def _discard(work_fd: int, tmp: str) -> None:
    from unionfs.core.backing import remove_tree_at

    try:
        remove_tree_at(work_fd, tmp)
    except OSError:
        log.debug("could not remove %s from the workdir", tmp)


def copy_xattrs(layer: Layer, path: str, target: int | str, is_link: bool) -> None:
    for name in listxattr_at(layer.fd, path):
        if name.startswith(_SKIP_PREFIXES):
            continue
        value = getxattr_at(layer.fd, path, name)
        if value is None:
            continue
        _set_xattr_if_allowed(target, name, value)


def copy_owner_mode_times(target: int | str, st: os.stat_result, is_link: bool, chmod: bool = True) -> None:
    """chown (or record an owner override), then chmod (chown clears setuid), then times."""
    follow = isinstance(target, int)
    try:
        if (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()):
            pass  # the copy is ours already
        elif isinstance(target, int):
            os.fchown(target, st.st_uid, st.st_gid)
        else:
            fsat.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        if not is_link and ondisk.read_owner_override(target) is None:
            ondisk.write_owner_override(target, ondisk.OwnerOverride(st.st_uid, st.st_gid, st.st_mode & 0o7777))
    if chmod and not is_link:
        if isinstance(target, int):
            os.fchmod(target, st.st_mode & 0o7777)
        else:
            fsat.chmod(target, st.st_mode & 0o7777)
    if not isinstance(target, int):
        fsat.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=follow)

