"""Filesystem work of COPY, ADD and WORKDIR, done directly on layer directories (no mount needed).

A layer made by COPY is *the diff against its parent*: a fresh directory holding the copied files
and the directories above them, nothing else. To decide where files go (docker's destination rules:
is ``/app`` an existing directory?) and to read files out of another stage (``COPY --from``), we look
at the parent's layers through :class:`LayerView`: the core's read-only merged view
(:mod:`unionfs.core.view`), which merges layers by the same rules as the union filesystem, plus
symlinks resolved inside the image root, never on the host.

Ownership: root chowns for real; an unprivileged user cannot, so the intended owner and mode go to
the owner-override xattr (as the store's unpacker does), which the store writes into the layer tar.
Files that belong to container root need no override when unprivileged: the store maps the user's
own uid to 0.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from unionfs.core import ondisk
from unionfs.core.stack import LayerStack
from unionfs.core.view import MergedView, ViewEntry

MAX_SYMLINKS = 40
PRIVILEGED = os.geteuid() == 0


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class Entry:
    """The top-most entry of a merged path: its backing file and its stat."""

    path: str  # container path, normalised, absolute
    backing: str  # host path of the top-most layer's file
    st: os.stat_result
    lower_dirs: tuple[tuple[int, str], ...]  # a directory's merged layer directories (ViewEntry.sources)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)


class LayerView:
    """An image's merged root (:class:`unionfs.core.view.MergedView`) with its symlinks resolved
    inside the image, for lookups and copying out. Its layer descriptors close with the object."""

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self._view = MergedView(stack)
        self.close = weakref.finalize(self, self._view.close)

    def _entry(self, found: ViewEntry) -> Entry:
        return Entry(found.path, self._view.host_path(found), found.st, found.sources)

    def lookup(self, path: str, follow: bool = True) -> Entry | None:
        """The entry at container path ``path``; intermediate symlinks are always followed (inside
        the image), the last one only when ``follow``. None when nothing is there."""
        pending = [p for p in path.split("/") if p not in ("", ".")]
        pending.reverse()
        resolved: list[str] = []
        root = self._view.root()
        current = root
        links = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if resolved:
                    resolved.pop()
                # Re-walk from the root: cheap for the short paths Dockerfiles use.
                pending.extend(reversed(resolved))
                resolved = []
                current = root
                continue
            if current is None or not current.is_dir:
                return None
            child = self._view.child(current, part)
            if child is None:
                return None
            if stat.S_ISLNK(child.st.st_mode) and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = self._view.readlink(child)
                pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                if not target.startswith("/"):
                    # Relative: walk again from the root through the directory holding the link.
                    pending.extend(reversed(resolved))
                resolved = []
                current = root
                continue
            resolved.append(part)
            current = child
        return self._entry(current) if current is not None else None

    def list_dir(self, entry: Entry) -> Iterator[tuple[str, str, os.stat_result, tuple[tuple[int, str], ...]]]:
        """(name, backing, stat, merged dirs) of each visible child of a merged directory, by name."""
        directory = ViewEntry(entry.path or "/", 0, "", entry.st, entry.lower_dirs)
        for child in self._view.listdir(directory):
            yield child.name, self._view.host_path(child), child.st, child.sources

    def exists_as_dir(self, path: str) -> bool:
        entry = self.lookup(path)
        return entry is not None and entry.is_dir

    def read_file(self, path: str) -> bytes | None:
        entry = self.lookup(path)
        if entry is None or not stat.S_ISREG(entry.st.st_mode):
            return None
        with open(entry.backing, "rb") as f:
            return f.read()


# --- writing into a layer directory ------------------------------------------------------------


def intended_owner(backing: str, st: os.stat_result) -> tuple[int, int, int]:
    """(uid, gid, st_mode) a layer file stands for, the owner override winning over the real owner.

    An unprivileged user's own files are container root's."""
    uid, gid, mode = ondisk.effective_owner(backing, st)
    if not PRIVILEGED and ondisk.read_owner_override(backing) is None and not stat.S_ISLNK(st.st_mode):
        if uid == os.getuid():
            uid = 0
        if gid == os.getgid():
            gid = 0
    return uid, gid, mode


def set_owner_mode(path: str, uid: int, gid: int, mode: int) -> None:
    """Give ``path`` (just created by us) the owner and permission bits an image should record."""
    st = os.lstat(path)
    perms = mode & 0o7777
    if stat.S_ISLNK(st.st_mode):
        if PRIVILEGED:
            os.lchown(path, uid, gid)
        return
    if PRIVILEGED:
        os.lchown(path, uid, gid)
        os.chmod(path, perms)
        return
    # Unprivileged: keep what we need to read the layer ourselves; record the rest (and, for a
    # device placeholder, the device it stands for).
    disk = perms | (0o700 if stat.S_ISDIR(st.st_mode) else 0o600)
    device = ondisk.device_placeholder(path, st)
    if device is not None:
        major, minor = os.major(device[1]), os.minor(device[1])
        ondisk.write_owner_override(path, ondisk.OwnerOverride.for_device(uid, gid, device[0] | perms, major, minor))
    elif (uid, gid) != (0, 0) or disk != perms:
        ondisk.write_owner_override(path, ondisk.OwnerOverride(uid, gid, perms))
    else:
        try:
            os.removexattr(path, ondisk.OWNER_OVERRIDE_XATTR, follow_symlinks=False)
        except OSError:
            pass
    os.chmod(path, disk)


def copy_times(st: os.stat_result, path: str) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@dataclass
class Ownership:
    """Who copied files belong to: a fixed owner (``--chown`` or root for context files) or the
    source's own (``COPY --from``); and an optional ``--chmod``."""

    uid: int | None = 0
    gid: int | None = 0
    chmod: int | None = None

    def resolve(self, src_uid: int, src_gid: int, src_mode: int) -> tuple[int, int, int]:
        uid = src_uid if self.uid is None else self.uid
        gid = src_gid if self.gid is None else self.gid
        mode = (src_mode & ~0o7777) | self.chmod if self.chmod is not None else src_mode
        return uid, gid, mode


def ensure_parents(diff: str, view: LayerView, container_dir: str, new_owner: tuple[int, int] = (0, 0)) -> str:
    """Create ``container_dir`` (and its parents) inside the diff directory, copying metadata from
    the parent image where a directory already exists there (so the layer does not change it);
    directories the image lacks are made 0755 and owned by ``new_owner``. Return the host path."""
    parts = [p for p in posixpath.normpath(container_dir).split("/") if p]
    current_container = "/"
    host = diff
    for part in parts:
        current_container = posixpath.join(current_container, part)
        host = os.path.join(host, part)
        st = _lstat(host)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                continue
            os.unlink(host)
        os.mkdir(host, 0o755)
        existing = view.lookup(current_container, follow=False)
        if existing is not None and existing.is_dir:
            uid, gid, mode = intended_owner(existing.backing, existing.st)
            set_owner_mode(host, uid, gid, mode)
            copy_times(existing.st, host)
        else:
            set_owner_mode(host, new_owner[0], new_owner[1], stat.S_IFDIR | 0o755)
    return host


def settle_dir_times(diff: str, view: LayerView, container_dir: str, new_dir_ns: int) -> None:
    """Give the directories on the way to ``container_dir`` in the diff their final times, once
    everything has been written into them (adding an entry changes a directory's mtime).

    A directory the image already has keeps the image's times; a directory the step made gets
    ``new_dir_ns``, so a step that runs no command gives the same layer for the same input
    (BuildKit stamps such directories with the build's clock, which makes every layer differ)."""
    parts = [p for p in posixpath.normpath(container_dir).split("/") if p]
    for depth in range(len(parts), 0, -1):
        host = os.path.join(diff, *parts[:depth])
        st = _lstat(host)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue
        existing = view.lookup("/" + "/".join(parts[:depth]), follow=False)
        if existing is not None and existing.is_dir:
            copy_times(existing.st, host)
        else:
            os.utime(host, ns=(new_dir_ns, new_dir_ns), follow_symlinks=False)


def clamp_times(root: str, epoch: int) -> None:
    """``SOURCE_DATE_EPOCH``: no entry below ``root`` (a new layer) keeps a time later than
    ``epoch``, as BuildKit's rewrite-timestamp does to the layers it writes."""
    limit = epoch * 1_000_000_000
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mtime_ns > limit or st.st_atime_ns > limit:
                os.utime(path, ns=(min(st.st_atime_ns, limit), min(st.st_mtime_ns, limit)),
                         follow_symlinks=False)


def resolve_dir_in_image(view: LayerView, container_dir: str) -> str:
    """Docker resolves symlinks of the destination inside the image: ``COPY x /lib/`` with ``/lib ->
    usr/lib`` writes to ``/usr/lib``. Return the resolved container path of the deepest existing
    prefix, joined with the rest."""
    parts = [p for p in posixpath.normpath(container_dir).split("/") if p]
    resolved = "/"
    for i, part in enumerate(parts):
        candidate = posixpath.join(resolved, part)
        entry = view.lookup(candidate, follow=False)
        if entry is None:
            return posixpath.join(candidate, *parts[i + 1:])
        if entry.is_symlink:
            target = view.lookup(candidate, follow=True)
            if target is None:
                return posixpath.join(candidate, *parts[i + 1:])
            resolved = target.path
        else:
            resolved = candidate
    return resolved


def remove_existing(host: str) -> None:
    st = _lstat(host)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(host)
    else:
        os.unlink(host)


def copy_view_entry(view: LayerView, backing: str, st: os.stat_result, merged: tuple[tuple[int, str], ...], dst: str,
                    owner: Ownership) -> None:
    """Copy a merged entry of another image/stage (``COPY --from``) to ``dst``, keeping owners unless
    ``owner`` fixes them."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        if not os.path.isdir(dst) or os.path.islink(dst):
            remove_existing(dst)
            os.mkdir(dst, 0o700)
        entry = Entry("", backing, st, merged)
        for name, cbacking, cst, cmerged in view.list_dir(entry):
            copy_view_entry(view, cbacking, cst, cmerged, os.path.join(dst, name), owner)
    else:
        remove_existing(dst)
        device = ondisk.device_placeholder(backing, st)
        if device is None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            device = stat.S_IFMT(mode), st.st_rdev
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(backing), dst)
        elif device is not None:
            _make_device(dst, *device)
        elif stat.S_ISREG(mode):
            shutil.copyfile(backing, dst, follow_symlinks=False)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            return
    src_uid, src_gid, src_mode = intended_owner(backing, st)
    uid, gid, new_mode = owner.resolve(src_uid, src_gid, src_mode)
    set_owner_mode(dst, uid, gid, new_mode)
    copy_times(st, dst)


def _make_device(dst: str, kind: int, rdev: int) -> None:
    """A device node at ``dst``: real as root, else a placeholder (see :mod:`unionfs.core.ondisk`)."""
    if PRIVILEGED:
        os.mknod(dst, kind | 0o600, rdev)
        return
    parent, name = os.path.split(dst)
    dir_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        override = ondisk.OwnerOverride.for_device(0, 0, kind | 0o600, os.major(rdev), os.minor(rdev))
        os.close(ondisk.write_device_placeholder(dir_fd, name, override))
    finally:
        os.close(dir_fd)


def prune_empty_dirs(diff: str, container_dirs: list[str], view: LayerView) -> None:
    """Remove the mount points a RUN step's ``--mount`` targets left in its upper directory (empty
    directories or empty files the parent image did not have, and copied-up parents left unchanged):
    build scaffolding must not land in a layer."""
    for container_dir in sorted(container_dirs, key=lambda p: -p.count("/")):
        parts = [p for p in posixpath.normpath(container_dir).split("/") if p]
        # A file mount point (binding a single file) is an empty file the sandbox created.
        if parts:
            host = os.path.join(diff, *parts)
            st = _lstat(host)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0 and \
                    view.lookup("/" + "/".join(parts), follow=False) is None:
                os.unlink(host)
                parts.pop()
        while parts:
            host = os.path.join(diff, *parts)
            container = "/" + "/".join(parts)
            st = _lstat(host)
            if st is None or not stat.S_ISDIR(st.st_mode) or os.listdir(host) or ondisk.is_opaque_dir(host):
                break
            lower = view.lookup(container, follow=False)
            if lower is not None:
                # A copied-up parent of a mount point: drop it only when the step changed nothing
                # about it but its modification time.
                if not lower.is_dir or intended_owner(host, st) != intended_owner(lower.backing, lower.st):
                    break
            os.rmdir(host)
            parts.pop()
