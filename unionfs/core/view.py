"""A read-only merged view of a layer stack, without a mount: lookup, stat, listing, walk, reading.

For code that needs to see an image's root as the union shows it but has no reason to mount it: the
builder looking for ``COPY`` destinations and reading files out of other stages, ``lamina diff``
deciding what a container's upper directory changed. It follows the same rules as the live
filesystem (:mod:`unionfs.core.merge`) and reads the layers through the one on-disk format
(:mod:`unionfs.core.ondisk`): whiteouts, opaque directories, redirects. The kernel's overlayfs
mounted on the same layers shows the same tree (tests/test_unionfs_view.py checks it).

Resource handling: a :class:`MergedView` holds one descriptor per layer, opened when it is made;
``close()`` (or leaving its ``with`` block) releases them. Every path is resolved relative to those
descriptors, and a symlink is never followed: the layers are read as they are stored.

Error handling: a layer that cannot be opened raises OSError when the view is made; a name that is
not there is None from :meth:`MergedView.lookup`, never an exception.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from unionfs.core import fsat, merge, ondisk
from unionfs.core.stack import LayerStack

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class ViewEntry:
    """One entry of the merged tree, where its top copy lives, and (for a directory) what merges."""

    path: str  # in the union: "/" or "/a/b"
    layer: int  # the layer of the top copy: an index into the stack's top_down()
    layer_path: str  # the top copy's path in that layer ("" for the layer root)
    st: os.stat_result  # the top copy's lstat
    sources: tuple[tuple[int, str], ...] = ()  # a directory's merged directories, top first

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class MergedView:
    """The merged tree of ``stack`` as the union (and the kernel's overlayfs) would show it."""

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self._roots = stack.top_down()
        self._fds: list[int] = []
        try:
            for root in self._roots:
                self._fds.append(os.open(root, _DIR_FLAGS))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> MergedView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- lookup ----------------------------------------------------------------------------------

    def root(self) -> ViewEntry | None:
        """The root directory; None for an empty stack."""
        if not self._fds:
            return None
        return ViewEntry("/", 0, "", os.fstat(self._fds[0]), tuple((i, "") for i in range(len(self._fds))))

    def lookup(self, path: str) -> ViewEntry | None:
        """The entry at ``path`` (from the union's root; no symlink followed), or None."""
        entry = self.root()
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if entry is None or part == "..":
                return None  # ".." is a question of symlink resolution: the caller's, not ours
            entry = self.child(entry, part)
        return entry

    def child(self, parent: ViewEntry, name: str) -> ViewEntry | None:
        """The entry ``name`` of the merged directory ``parent`` (see :mod:`unionfs.core.merge`)."""
        if not parent.is_dir or ondisk.is_marker_name(name):
            return None
        parent_paths = dict(parent.sources)
        top: tuple[int, str, os.stat_result] | None = None
        merged: list[tuple[int, str]] = []
        redirect: str | None = None
        for index, fd in enumerate(self._fds):
            last = False
            if redirect is not None and redirect.startswith("/"):
                path = redirect.strip("/")
                reach = merge.reach(ondisk.held_ancestors_at(fd, path))
                if reach is merge.Reach.HIDDEN:
                    break
                if reach is merge.Reach.ABSENT:
                    continue
                last = reach is merge.Reach.OPAQUE_ABOVE
            elif index in parent_paths:
                path = merge.path_below(parent_paths[index], name, redirect)
            else:
                continue
            held, st = ondisk.held_at(fd, path)
            step = merge.lookup_step(held, bool(merged))
            if step is merge.Step.LOOK_BELOW:
                if last:
                    break
                continue
            if step is merge.Step.ENTRY:
                assert st is not None
                return ViewEntry(join_view(parent.path, name), index, path, st)
            if step in (merge.Step.HIDDEN, merge.Step.END):
                break
            assert st is not None
            if top is None:
                top = (index, path, st)
            merged.append((index, path))
            if step is merge.Step.MERGE_LAST or last:
                break
            if held.redirect is not None:
                redirect = held.redirect  # applies to the layers below this one
        if top is None:
            return None
        return ViewEntry(join_view(parent.path, name), top[0], top[1], top[2], tuple(merged))

    # --- listing ---------------------------------------------------------------------------------

    def names(self, directory: ViewEntry) -> list[str]:
        """The names in a merged directory, sorted (no '.', '..' or markers)."""
        if not directory.is_dir:
            raise NotADirectoryError(directory.path)
        scans = (self._scan(index, path) for index, path in directory.sources)
        return sorted(merge.merge_listing(scans))

    def _scan(self, index: int, path: str) -> Iterator[tuple[str, bool | None]]:
        """``(name, True)`` per entry of one layer's directory, ``(name, None)`` per whiteout."""
        fd = fsat.open(path or ".", _DIR_FLAGS, dir_fd=self._fds[index])
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = entry.name
                    if ondisk.is_marker_name(name):
                        hidden = ondisk.whited_out_name(name)
                        if hidden is not None:
                            yield hidden, None
                        continue
                    if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) \
                            or entry.is_symlink():
                        yield name, True
                    else:
                        whiteout = ondisk.is_whiteout_stat(entry.stat(follow_symlinks=False))
                        yield name, None if whiteout else True
        finally:
            os.close(fd)

    def listdir(self, directory: ViewEntry) -> list[ViewEntry]:
        """The entries of a merged directory, sorted by name."""
        found = (self.child(directory, name) for name in self.names(directory))
        return [entry for entry in found if entry is not None]

    def walk(self, top: ViewEntry | None = None) -> Iterator[ViewEntry]:
        """Every entry below ``top`` (default: the root), depth first, by name, each directory
        before what it holds."""
        start = top if top is not None else self.root()
        if start is None:
            return
        pending = [iter(self.listdir(start))]
        while pending:
            entry = next(pending[-1], None)
            if entry is None:
                pending.pop()
                continue
            yield entry
            if entry.is_dir:
                pending.append(iter(self.listdir(entry)))

    # --- reading ---------------------------------------------------------------------------------

    def open(self, entry: ViewEntry, flags: int = os.O_RDONLY) -> int:
        """A read-only descriptor of the entry's top copy (the caller closes it)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            raise PermissionError("a merged view is read-only")
        return fsat.open(entry.layer_path or ".", flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._fds[entry.layer])

    def read_bytes(self, entry: ViewEntry) -> bytes:
        fd = self.open(entry)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def readlink(self, entry: ViewEntry) -> str:
        return fsat.readlink(entry.layer_path, dir_fd=self._fds[entry.layer])

    def stat(self, path: str) -> os.stat_result:
        """The lstat of the entry at ``path``; FileNotFoundError when the union shows nothing there."""
        entry = self.lookup(path)
        if entry is None:
            raise FileNotFoundError(path)
        return entry.st

    def host_path(self, entry: ViewEntry) -> str:
        """The host path of the entry's top copy, for callers that must hand a path on."""
        root = str(self._roots[entry.layer])
        return os.path.join(root, entry.layer_path) if entry.layer_path else root


def join_view(parent: str, name: str) -> str:
    """A union path: ``/`` joined with ``name`` is ``/name``."""
    return f"{parent.rstrip('/')}/{name}"

