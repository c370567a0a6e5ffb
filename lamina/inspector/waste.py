"""Wasted space, named: the bytes a stack carries that its merged view never shows.

Two accounts of the same stack:

* :func:`hidden_files`: lamina's own. Every copy of a path that the merged image does not show
  (shadowed by a later copy, deleted by a whiteout, hidden with a parent by a whiteout, an opaque
  directory or a file put over a directory), with the layer that added it and the layer that hid
  it. Their sum is :attr:`StackAnalysis.wasted_bytes`, to the byte.

* :func:`dive_score`: dive's (github.com/wagoodman/dive, ``dive/filetree/efficiency.go`` and
  ``dive/image/analysis.go``), recomputed from the same layers so that a dive CI threshold means
  the same here. dive visits the *leaves* of each layer's own tree (files, empty directories and
  whiteouts) and, per path, adds up the bytes of every leaf it met (``CumulativeSize``) and keeps
  the smallest (``minDiscoveredSize``). A whiteout of a directory weighs what the layers below had
  in it; any other whiteout weighs 0. Then::

      efficiency        = sum(min) / sum(cumulative)          (1.0 for an empty stack)
      wasted bytes      = sum(cumulative) of the paths met in two layers or more
      user bytes        = bytes of every layer but the first
      wasted user share = wasted bytes / user bytes

  dive's sizes are tar header sizes: a regular file's length, 0 for a directory, a symlink or a
  hard link to a file already in the layer. dive ignores opaque directories entirely (its trees
  never record the marker), and its "wasted" counts the copy the image still shows as well as the
  hidden ones, so it is never below lamina's figure for files met twice. The differences are
  listed in docs/union-filesystems.md.

Nothing here reads a file: the input is a :class:`StackAnalysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina.inspector.analysis import Event, PathHistory, StackAnalysis


@dataclass(frozen=True)
class HiddenFile:
    path: str
    size: int
    added_by: int            # 0-based layer that carries the hidden copy
    hidden_by: int           # 0-based layer that shadowed or removed it
    how: str                 # "shadowed", "whiteout", "hidden by /p"


def hidden_files(analysis: StackAnalysis) -> list[HiddenFile]:
    """Every non-directory copy the merged view does not show, largest first (then by path)."""
    found = []
    for h in analysis.paths.values():
        spans = h.spans()
        for copy, end in spans:
            if copy.is_dir or (end is None and h.visible):
                continue
            hidden_by, how = _hider(h, copy.layer, end)
            found.append(HiddenFile(h.path, copy.size, copy.layer, hidden_by, how))
    found.sort(key=lambda f: (-f.size, f.path, f.added_by))
    return found


def _hider(h: PathHistory, layer: int, end: int | None) -> tuple[int, str]:
    """Which later layer ended the copy in ``layer`` (at ``end``), and how."""
    for event in h.events:
        if event.layer == end and event.event is Event.DELETED:
            return event.layer, "whiteout"
        if event.layer == end and event.event is Event.HIDDEN:
            return event.layer, f"hidden by {event.cause}"
    if end is None:  # unreachable for a consistent analysis: an invisible copy always has an end
        raise AssertionError(f"{h.path}: copy in layer {layer} is hidden but nothing hid it")
    return end, "shadowed"


@dataclass
class DivePath:
    """dive's ``EfficiencyData`` for one path."""

    path: str
    cumulative: int = 0
    minimum: int = -1
    count: int = 0


@dataclass
class DiveScore:
    efficiency: float
    wasted_bytes: int
    size_bytes: int
    user_bytes: int
    inefficiencies: list[DivePath] = field(default_factory=list)   # largest first, as dive lists them

    @property
    def wasted_user_share(self) -> float:
        """dive's ``WastedUserPercent``, a ratio 0..1 (it is unbounded: waste may exceed user bytes).

        With no user bytes (a one-layer image) dive divides by zero; any waste then counts as
        infinitely much and none as none.
        """
        if self.user_bytes == 0:
            return float("inf") if self.wasted_bytes else 0.0
        return self.wasted_bytes / self.user_bytes


def _dive_size(kind: str, size: int) -> int:
    """A tar header's size: content bytes of a regular file, 0 for the rest."""
    return size if kind == "file" else 0


def dive_score(analysis: StackAnalysis) -> DiveScore:
    """dive's efficiency and potential wasted space for the stack (see the module docstring)."""
    per_layer: list[dict[str, tuple[str, int]]] = [{} for _ in analysis.layers]
    for h in analysis.paths.values():
        for copy in h.copies:
            per_layer[copy.layer][h.path] = (copy.kind, _dive_size(copy.kind, copy.size))
    data: dict[str, DivePath] = {}
    stacked = _DiveTree()      # dive's StackTreeRange: whiteouts only, no opaque
    for index, entries in enumerate(per_layer):
        whiteouts = analysis.layers[index].whiteouts
        parents = {p.rsplit("/", 1)[0] or "/" for p in (*entries, *whiteouts)}
        leaves = [(p, size) for p, (_, size) in entries.items() if p not in parents]
        for path in whiteouts:
            if path in parents:   # a whiteout and entries below the same name: not a leaf in dive
                continue
            below = stacked.entries.get(path)
            weight = stacked.bytes_from(path) if below is not None and below[0] == "dir" else 0
            leaves.append((path, weight))
        for path, size in leaves:
            d = data.setdefault(path, DivePath(path))
            d.cumulative += size
            d.minimum = size if d.minimum < 0 else min(d.minimum, size)
            d.count += 1
        stacked.stack(entries, whiteouts)
    minimum = sum(d.minimum for d in data.values())
    cumulative = sum(d.cumulative for d in data.values())
    inefficient = sorted((d for d in data.values() if d.count >= 2), key=lambda d: (-d.cumulative, d.path))
    sizes = [sum(size for _, size in entries.values()) for entries in per_layer]
    return DiveScore(efficiency=1.0 if cumulative == 0 else minimum / cumulative,
                     wasted_bytes=sum(d.cumulative for d in inefficient),
                     size_bytes=sum(sizes), user_bytes=sum(sizes[1:]), inefficiencies=inefficient)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class _DiveTree:
    """dive's merged tree of the layers so far: path -> (kind, dive size), with an index of children.

    The index reaches every entry from each of its ancestors, present or not, so a whiteout's
    subtree costs its own size, not a scan of the whole tree (an image of 20,000 files with
    thousands of whiteouts took seconds per layer that way).
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, int]] = {}
        self._children: dict[str, set[str]] = {}

    def _add(self, path: str, entry: tuple[str, int]) -> None:
        self.entries[path] = entry
        child = path
        while child != "/":
            kids = self._children.setdefault(_parent(child), set())
            if child in kids:
                break
            kids.add(child)
            child = _parent(child)

    def _subtree(self, path: str) -> list[str]:
        """``path`` and every path below it that the index knows."""
        found, todo = [], [path]
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(self._children.get(p, ()))
        return found

    def bytes_from(self, path: str) -> int:
        """The dive size of ``path`` and of everything below it."""
        return sum(self.entries[p][1] for p in self._subtree(path) if p in self.entries)

    def stack(self, entries: dict[str, tuple[str, int]], whiteouts: list[str]) -> None:
        """Stack one layer: whiteouts remove subtrees, entries land.

        As dive's ``FileTree.Stack``: opaque directories are not honoured, and a file put over a
        directory keeps the directory's children.
        """
        for path in whiteouts:
            for p in self._subtree(path):
                self.entries.pop(p, None)
                self._children.pop(p, None)
            self._children.get(_parent(path), set()).discard(path)
        for path, entry in entries.items():
            self._add(path, entry)


@dataclass(frozen=True)
class Thresholds:
    """CI limits, as dive's ``--ci`` rules: None leaves a rule off."""

    max_waste_percent: float | None = None     # dive's highestUserWastedPercent, times 100
    min_efficiency: float | None = None        # dive's lowestEfficiency


def check(score: DiveScore, limits: Thresholds) -> list[str]:
    """The failed rules, one sentence each (empty when the stack passes)."""
    failures = []
    if limits.min_efficiency is not None and score.efficiency < limits.min_efficiency:
        failures.append(f"image efficiency is too low (efficiency={score.efficiency:.4f} < "
                        f"threshold={limits.min_efficiency:g})")
    if limits.max_waste_percent is not None and score.wasted_user_share * 100 > limits.max_waste_percent:
        failures.append(f"too many bytes wasted, relative to the user bytes added "
                        f"({score.wasted_user_share * 100:.2f}% > threshold={limits.max_waste_percent:g}%)")
    return failures
