"""Where every file of an image comes from: a pure pass over the layer directories, bottom to top.

The union filesystem answers "which layer provides this file?" for one path at a time, at lookup.
This module answers it for the whole image at once, plus the questions a union filesystem never
asks: which lower copies a path *shadows*, which layer *deleted* it, and how many bytes each layer
carries that nobody can see any more (dive's "wasted space").

It replays the layers the way overlayfs stacks them, from the base upwards. Within one layer the
order matters, as in the OCI applier: first the layer's whiteouts and opaque directories hide what
lies below, then the layer's own entries land on top. A non-directory over a directory hides the
whole lower subtree; a directory over a directory merges (unless the upper one is opaque). Markers
are recognised only through :mod:`unionfs.core.ondisk`, the one definition of the on-disk format.

Bytes are apparent sizes (``st_size`` of regular files and symlinks; a hard link counted once per
layer), the size a layer tar carries, not the blocks the unpacked directory happens to use.

Nothing here mounts or needs a store: the input is a list of directories, so tests can build
layers by hand and the CLI can feed it the store's unpacked layers.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from lamina.store import fdtree
from unionfs.core import ondisk


class Event(Enum):
    """What a layer did to one path."""

    ADDED = "added"          # the path did not exist below
    CHANGED = "changed"      # the layer's copy shadows a lower copy
    DELETED = "deleted"      # a whiteout for the path itself
    HIDDEN = "hidden"        # gone with a parent: parent whited out, made opaque, or replaced by a file
    OPAQUE = "opaque"        # a directory made opaque: the lower directories' contents are hidden


@dataclass(frozen=True)
class PathEvent:
    layer: int               # 0-based index, bottom layer first
    event: Event
    cause: str = ""          # for HIDDEN: the path whose whiteout/opaque/replacement hid this one


@dataclass
class LayerInput:
    """One layer as the analysis sees it: its directory and what the image says about it."""

    path: Path
    digest: str = ""         # diff id ("sha256:...") or any identifier to show
    instruction: str = ""    # the history entry's ``created_by``, cleaned for display
    scan: _LayerScan | None = None  # the layer's entries when they come from elsewhere (a TOC), not ``path``


@dataclass
class LayerCopy:
    """One layer's copy of a path."""

    layer: int
    is_dir: bool
    size: int
    kind: str = "file"       # "dir", "file", "symlink" or "other" (device, fifo, socket)


@dataclass
class PathHistory:
    """Everything the layers did to one path, bottom to top."""

    path: str
    events: list[PathEvent] = field(default_factory=list)
    copies: list[LayerCopy] = field(default_factory=list)
    visible: bool = False    # present in the merged image

    @property
    def provider(self) -> int | None:
        """The layer whose copy the merged image shows, or None when the path is gone."""
        return self.copies[-1].layer if self.visible and self.copies else None

    @property
    def is_dir(self) -> bool:
        return bool(self.copies) and self.copies[-1].is_dir

    @property
    def lower_copies(self) -> list[LayerCopy]:
        """Lower layers' copies of this path that sit under the provider's, bottom first.

        A file hides (shadows) the copies below it; a directory merges with the directories below
        it. Only copies since the last removal count: a copy that was deleted and later re-created
        is not shadowed, it was removed (see :attr:`deleted_by`); a removal in layer L happens
        before layer L's own entries land, so a copy in L itself survives it. Nothing older shows
        through a non-directory, so the list starts at the topmost lower non-directory copy.
        """
        if self.provider is None:
            return []
        last_gone = max((e.layer for e in self.events
                         if e.event in (Event.DELETED, Event.HIDDEN, Event.OPAQUE)), default=-1)
        lowers = [c for c in self.copies[:-1] if c.layer >= last_gone]
        for i in range(len(lowers) - 1, -1, -1):
            if not lowers[i].is_dir:
                return lowers[i:]
        return lowers

    @property
    def shadowed(self) -> list[int]:
        """The layers of :attr:`lower_copies`."""
        return [c.layer for c in self.lower_copies]

    @property
    def deleted_by(self) -> list[PathEvent]:
        """Whiteouts (own or a parent's) and opaque directories that removed a copy of this path."""
        return [e for e in self.events if e.event in (Event.DELETED, Event.HIDDEN)]

    def spans(self) -> list[tuple[LayerCopy, int | None]]:
        """Each copy with the layer where it stops being the one the merged view shows.

        ``(copy, end)``: the merged view of layers ``0..n`` shows ``copy`` when
        ``copy.layer <= n < end`` (``end`` None: up to the top). A copy ends where the next copy of
        the path lands or where a whiteout, opaque directory or replacing file removes it. A
        removal in a layer happens before that layer's own entries land, so a copy in the removing
        layer itself starts afresh there. Everything that asks "what did the image look like up to
        layer n" (the tree views, the explorable page) reads these spans, not the rules again.
        """
        removals = sorted({e.layer for e in self.events if e.event in (Event.DELETED, Event.HIDDEN)})
        spans: list[tuple[LayerCopy, int | None]] = []
        for i, copy in enumerate(self.copies):
            ends = [layer for layer in removals if layer > copy.layer]
            if i + 1 < len(self.copies):
                ends.append(self.copies[i + 1].layer)
            spans.append((copy, min(ends) if ends else None))
        return spans

    def copy_at(self, upto: int) -> LayerCopy | None:
        """The copy the merged view of layers ``0..upto`` shows, or None when the path is not there."""
        for copy, end in reversed(self.spans()):
            if copy.layer <= upto and (end is None or upto < end):
                return copy
        return None


@dataclass
class LayerReport:
    index: int
    path: Path
    digest: str
    instruction: str
    size: int = 0                    # bytes of files and symlinks in this layer
    files: int = 0                   # entries of any kind in this layer (markers excluded)
    added: int = 0
    changed: int = 0
    deleted: int = 0                 # paths shown below that this layer removes (whiteouts, opaque dirs)
    wasted: int = 0                  # bytes of this layer hidden by later layers
    whiteouts: list[str] = field(default_factory=list)     # paths this layer deletes
    opaque_dirs: list[str] = field(default_factory=list)   # directories this layer makes opaque
    redirects: dict[str, str] = field(default_factory=dict)  # renamed directory -> its lower path

    @property
    def is_empty(self) -> bool:
        return self.files == 0 and not self.whiteouts and not self.opaque_dirs


@dataclass
class StackAnalysis:
    layers: list[LayerReport]
    paths: dict[str, PathHistory]
    top_is_container: bool = False   # the last layer is a container's upper directory, not an image's

    @property
    def image_layers(self) -> list[LayerReport]:
        return self.layers[:-1] if self.top_is_container else self.layers

    @property
    def container_layer(self) -> LayerReport | None:
        return self.layers[-1] if self.top_is_container and self.layers else None

    def layer_name(self, index: int) -> str:
        """``layer 3``, or ``the container layer`` for a container's upper directory."""
        if self.top_is_container and index == len(self.layers) - 1:
            return "container layer"
        return f"layer {index + 1}"

    @property
    def total_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def wasted_bytes(self) -> int:
        return sum(layer.wasted for layer in self.layers)

    @property
    def image_bytes(self) -> int:
        """Bytes visible in the merged image."""
        return self.total_bytes - self.wasted_bytes

    @property
    def efficiency(self) -> float:
        """1 - wasted/total, as dive scores an image: 1.0 when no layer carries invisible bytes."""
        total = self.total_bytes
        return 1.0 if total == 0 else 1.0 - self.wasted_bytes / total

    def history(self, path: str) -> PathHistory | None:
        return self.paths.get(normalize(path))


def normalize(path: str) -> str:
    """``a/b/``, ``/a//b``, ``./a/b`` -> ``/a/b``; the root is ``/``. Lexical: ``..`` never leaves it."""
    # One leading slash only: POSIX lets normpath keep a leading "//".
    return posixpath.normpath("/" + path.lstrip("/"))


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


@dataclass
class _LayerScan:
    """What one layer directory holds, markers already decoded."""

    entries: list[tuple[str, str, int, int, int]] = field(default_factory=list)  # path, kind, size, dev, ino
    whiteouts: list[str] = field(default_factory=list)
    opaque_dirs: list[str] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)


def scan_layer(root: Path) -> _LayerScan:
    """Walk one layer directory, sorting its entries into files, whiteouts and opaque directories.

    The directory may be a running container's upper: it is walked by directory descriptors and
    never through a symlink (:mod:`store.fdtree`), so a directory swapped for a symlink to a host
    directory shows nothing of the host.
    """
    scan = _LayerScan()
    if not root.is_dir():
        raise FileNotFoundError(f"layer directory missing: {root}")
    with fdtree.opened(fdtree.open_root(root)) as root_fd:
        if ondisk.is_opaque_dir(root_fd):
            scan.opaque_dirs.append("/")
        pending = [""]  # directories to scan, relative to the root
        while pending:
            rel_dir = pending.pop()
            try:
                dir_fd = fdtree.open_beneath(root_fd, rel_dir, fdtree.DIR_FLAGS)
            except OSError:  # no longer a directory (or gone): nothing below it to scan
                continue
            with fdtree.opened(dir_fd):
                if rel_dir and ondisk.is_opaque_dir(dir_fd):
                    scan.opaque_dirs.append("/" + rel_dir)
                redirect = ondisk.read_redirect(dir_fd) if rel_dir else None
                if redirect is not None:   # only a container's upper has them: a layer tar cannot
                    scan.redirects["/" + rel_dir] = redirect
                pending.extend(_scan_dir(scan, dir_fd, rel_dir))
    # Sorted, so reports read the same on every run and a parent comes before its children.
    scan.entries.sort()
    scan.whiteouts.sort()
    scan.opaque_dirs.sort()
    return scan


def _scan_dir(scan: _LayerScan, dir_fd: int, rel_dir: str) -> list[str]:
    """Record the entries of one open directory; its subdirectories, relative to the layer."""
    merged_dir = "/" + rel_dir
    subdirs = []
    for name in sorted(os.listdir(dir_fd)):
        if ondisk.is_marker_name(name):
            hidden = ondisk.whited_out_name(name)
            if hidden is not None:
                scan.whiteouts.append(_join(merged_dir, hidden))
            # The opaque marker file was already seen by is_opaque_dir on its directory.
            continue
        path = _join(merged_dir, name)
        try:
            st = fdtree.lstat_in(dir_fd, name)
        except FileNotFoundError:
            continue
        if ondisk.is_whiteout_stat(st):
            scan.whiteouts.append(path)
            continue
        kind = _kind(st.st_mode)
        size = st.st_size if kind in ("file", "symlink") else 0
        scan.entries.append((path, kind, size, st.st_dev, st.st_ino if st.st_nlink > 1 else 0))
        if kind == "dir":
            subdirs.append(f"{rel_dir}/{name}" if rel_dir else name)
    return subdirs


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "symlink" if stat.S_ISLNK(mode) else "other"


class _Merged:
    """The merged tree while replaying: which paths are visible, as a parent -> children index."""

    def __init__(self) -> None:
        self.children: dict[str, set[str]] = {"/": set()}
        self.visible: set[str] = {"/"}

    def add(self, path: str, is_dir: bool) -> None:
        self.visible.add(path)
        if path != "/":
            parent = path.rsplit("/", 1)[0] or "/"
            self.children.setdefault(parent, set()).add(path)
        if is_dir:
            self.children.setdefault(path, set())

    def subtree(self, path: str) -> Iterator[str]:
        """``path``'s visible descendants (not ``path`` itself)."""
        todo = list(self.children.get(path, ()))
        while todo:
            p = todo.pop()
            yield p
            todo.extend(self.children.get(p, ()))

    def remove(self, path: str, keep_self: bool = False) -> list[str]:
        """Drop ``path``'s subtree (and ``path`` unless ``keep_self``); return what was dropped."""
        gone = list(self.subtree(path))
        for p in gone:
            self.visible.discard(p)
            self.children.pop(p, None)
        if keep_self:
            self.children[path] = set()
        elif path in self.visible:
            self.visible.discard(path)
            self.children.pop(path, None)
            parent = path.rsplit("/", 1)[0] or "/"
            self.children.get(parent, set()).discard(path)
            gone.append(path)
        return gone


def analyze(layers: Sequence[LayerInput], top_is_container: bool = False) -> StackAnalysis:
    """Replay ``layers`` (bottom first) and account for every path and every byte.

    ``top_is_container``: the last directory is a container's upper directory (same format).

    Error handling: a missing layer directory raises FileNotFoundError; unreadable entries raise
    the OSError of the walk. Nothing is written.
    """
    reports = [LayerReport(i, layer.path, layer.digest, layer.instruction) for i, layer in enumerate(layers)]
    histories: dict[str, PathHistory] = {}
    merged = _Merged()

    def history(path: str) -> PathHistory:
        h = histories.get(path)
        if h is None:
            h = histories[path] = PathHistory(path)
        return h

    def hide(path: str, layer: int, cause: str, keep_self: bool = False) -> int:
        """Take ``path``'s subtree (and ``path`` unless ``keep_self``) out of the merged view;
        return how many visible paths went."""
        removed = merged.remove(path, keep_self=keep_self)
        for gone in removed:
            h = histories[gone]
            h.visible = False
            if gone == path and not keep_self and cause == path:
                h.events.append(PathEvent(layer, Event.DELETED))
            else:
                h.events.append(PathEvent(layer, Event.HIDDEN, cause))
        return len(removed)

    for index, layer in enumerate(layers):
        report = reports[index]
        scan = layer.scan if layer.scan is not None else scan_layer(layer.path)

        # First what this layer removes from below, then what it adds (the OCI applier's order).
        for path in scan.whiteouts:
            report.whiteouts.append(path)
            if path in merged.visible:
                report.deleted += hide(path, index, cause=path)
        for path in scan.opaque_dirs:
            report.opaque_dirs.append(path)
            if path in merged.visible:
                # What an opaque directory hides is gone from the image as surely as what a whiteout
                # removes (dive counts it so too): `RUN rm -rf /d && mkdir /d` deletes d's old files.
                report.deleted += hide(path, index, cause=path, keep_self=True)
                history(path).events.append(PathEvent(index, Event.OPAQUE))

        report.redirects = dict(scan.redirects)
        seen_inodes: set[tuple[int, int]] = set()
        for path, kind, size, dev, ino in scan.entries:
            is_dir = kind == "dir"
            report.files += 1
            if ino:
                if (dev, ino) in seen_inodes:
                    size = 0  # a hard link's bytes are carried once
                seen_inodes.add((dev, ino))
            report.size += size
            h = history(path)
            previous = h.copies[-1] if h.visible and h.copies else None
            if previous is not None and not (is_dir and previous.is_dir):
                # A non-directory replaces whatever was there; a directory replaces a non-directory.
                if previous.is_dir:
                    report.deleted += hide(path, index, cause=path, keep_self=True)
                report.changed += 1
                h.events.append(PathEvent(index, Event.CHANGED))
            elif previous is None:
                report.added += 1
                h.events.append(PathEvent(index, Event.ADDED))
            # else: a directory over a directory merges; it is scaffolding, not a change.
            h.copies.append(LayerCopy(index, is_dir, size, kind))
            h.visible = True
            merged.add(path, is_dir)

    _charge_wasted_bytes(reports, histories)
    return StackAnalysis(reports, histories, top_is_container)


def _charge_wasted_bytes(reports: list[LayerReport], histories: dict[str, PathHistory]) -> None:
    """Charge every copy the merged image does not show to the layer that added it."""
    for h in histories.values():
        shown = h.copies[-1] if h.visible and h.copies else None
        for copy in h.copies:
            if copy is not shown:
                reports[copy.layer].wasted += copy.size


def clean_instruction(created_by: str) -> str:
    """Docker's ``/bin/sh -c #(nop) COPY ...`` -> ``COPY ...``; ``/bin/sh -c cmd`` -> ``RUN cmd``."""
    text = created_by.strip()
    if text.startswith("/bin/sh -c #(nop) "):
        return text[len("/bin/sh -c #(nop) "):].strip()
    if text.startswith("/bin/sh -c "):
        return "RUN " + text[len("/bin/sh -c "):].strip()
    return text


def instructions_for_layers(history: Sequence[dict[str, object]], layer_count: int) -> list[str]:
    """Map an OCI config's ``history`` onto the non-empty layers, bottom first.

    Entries with ``empty_layer: true`` (ENV, CMD, ...) made no layer. When the history does not
    account for every layer (images from tools that drop it), the unmatched layers get "".
    """
    made_layers = [clean_instruction(str(entry.get("created_by", "")))
                   for entry in history if not entry.get("empty_layer", False)]
    if len(made_layers) != layer_count:
        # Align from the top: the most recent history entries describe the most recent layers.
        if len(made_layers) > layer_count:
            made_layers = made_layers[len(made_layers) - layer_count:]
        else:
            made_layers = [""] * (layer_count - len(made_layers)) + made_layers
    return made_layers
