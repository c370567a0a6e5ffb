"""File trees of a layer stack, as dive shows them: what one layer changed, and the image up to it.

Two views of layer ``n`` (0-based, bottom first), both built from a :class:`StackAnalysis`:

* its **changes**: the paths the layer added (``A``), modified (``M``: it carries a new copy of a
  path a lower layer had) and deleted (``D``: a whiteout, or gone with a parent that a whiteout,
  an opaque directory or a file over a directory hid), with the directories that lead to them;
* the **merged view** of layers ``0..n``: what a container started from the image cut at ``n``
  would see, with layer ``n``'s own changes marked and what it deleted listed as ``D``.

Which copy the merged view shows at each layer comes from :meth:`PathHistory.spans`, the one place
that encodes the stacking rules; the marks come from :func:`marks_by_layer`. The explorable page
(:mod:`.explorer`) ships these two to the browser instead of repeating the rules in JavaScript.

Sizes are apparent sizes, as in :mod:`.analysis`; a directory's size is the sum of what is shown
below it. A deleted entry's size is the bytes of the copy it hid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lamina.inspector.analysis import Event, PathHistory, StackAnalysis
from lamina.inspector.render import human_size, printable

ADDED, MODIFIED, DELETED = "A", "M", "D"

# One sentence per mark, shown under a text tree and beside the explorable page's tree.
EXPLANATIONS = {
    "whiteout": "whiteout: the layer deleted this path; the lower copy still sits in its own layer, "
                "only hidden (on disk a 0/0 character device or a .wh.NAME file).",
    "opaque": "opaque directory: the layer re-created this directory, so nothing the lower layers had "
              "in it shows through (a .wh..wh..opq marker or the overlay.opaque xattr).",
    "hidden": "hidden: gone with a parent that a whiteout, an opaque directory or a file put over a "
              "directory removed; its bytes still sit in the lower layer.",
    "redirect": "redirect: a directory renamed in the container; its lower contents are read from the "
                "path the overlay.redirect xattr names, nothing was copied.",
    "copy-up": "copy-up: the container changed a file from a lower layer (or something inside a "
               "directory), so the whole file (or the directory's attributes) was first copied up "
               "into the container layer.",
}


@dataclass
class Mark:
    """What one layer did to one path: a change letter and the notes that explain it."""

    change: str = ""                      # "A", "M", "D" or "" (a directory the layer only passes through)
    notes: list[str] = field(default_factory=list)   # keys of EXPLANATIONS, or "hidden by /p"


@dataclass
class TreeNode:
    name: str
    path: str
    kind: str = "dir"                     # dir, file, symlink, other
    size: int = 0                         # own bytes (files, symlinks; a deleted entry: what it hid)
    change: str = ""
    notes: list[str] = field(default_factory=list)
    layer: int | None = None              # the layer whose copy this is (0-based)
    redirect: str = ""
    children: dict[str, TreeNode] = field(default_factory=dict)

    def total(self) -> int:
        """Own bytes plus what is below; a present directory does not count its deleted entries."""
        return self.size + sum(child.total() for child in self.children.values()
                               if self.change == DELETED or child.change != DELETED)

    def walk(self) -> Iterator[TreeNode]:
        yield self
        for child in self.children.values():
            yield from child.walk()


def marks_by_layer(analysis: StackAnalysis, h: PathHistory) -> dict[int, Mark]:
    """The mark of ``h.path`` in each layer that touched it (the tree views' A/M/D)."""
    container = analysis.container_layer
    marks: dict[int, Mark] = {}
    for event in h.events:
        mark = marks.setdefault(event.layer, Mark())
        if event.event is Event.ADDED:
            mark.change = ADDED
        elif event.event is Event.CHANGED:
            mark.change = MODIFIED
        elif event.event is Event.OPAQUE:
            mark.change = mark.change or MODIFIED
            mark.notes.append("opaque")
        elif event.event is Event.DELETED:
            mark.change = mark.change or DELETED
            mark.notes.append("whiteout")
        else:
            mark.change = mark.change or DELETED
            mark.notes.append(f"hidden by {event.cause}")
    for copy in h.copies:
        mark = marks.setdefault(copy.layer, Mark())
        layer = analysis.layers[copy.layer]
        if h.path in layer.redirects:
            mark.notes.append("redirect")
        if container is not None and copy.layer == container.index and mark.change in ("", MODIFIED) \
                and "opaque" not in mark.notes:
            mark.notes.append("copy-up")
    return marks


def _node_for(root: TreeNode, path: str) -> TreeNode:
    """The node of ``path`` under ``root``, creating directories on the way."""
    node = root
    if path == "/":
        return node
    walked = ""
    for name in path.strip("/").split("/"):
        walked += "/" + name
        child = node.children.get(name)
        if child is None:
            child = node.children[name] = TreeNode(name, walked)
        node = child
    return node


def layer_tree(analysis: StackAnalysis, n: int, changes_only: bool = False) -> TreeNode:
    """Layer ``n``'s tree: the merged view of layers ``0..n`` with ``n``'s changes marked, or
    (``changes_only``) only what layer ``n`` changed and the directories leading there.

    Error handling: IndexError when ``n`` is not a layer of the analysis.
    """
    if not 0 <= n < len(analysis.layers):
        raise IndexError(n)
    root = TreeNode("/", "/")
    for path in sorted(analysis.paths):
        h = analysis.paths[path]
        mark = marks_by_layer(analysis, h).get(n)
        shown = h.copy_at(n)
        if mark is not None and mark.change == DELETED:
            gone = h.copy_at(n - 1) if n > 0 else None
            node = _node_for(root, path)
            node.kind, node.size, node.layer = (gone.kind, gone.size, gone.layer) if gone else ("file", 0, None)
        elif shown is not None and (not changes_only or shown.layer == n):
            node = _node_for(root, path)
            node.kind, node.size, node.layer = shown.kind, shown.size, shown.layer
            node.redirect = analysis.layers[shown.layer].redirects.get(path, "")
        else:
            continue
        if mark is not None:
            node.change, node.notes = mark.change, list(mark.notes)
    if changes_only:
        _prune_unchanged(root)
    return root


def _prune_unchanged(node: TreeNode) -> bool:
    """Drop subtrees with no change and no note; True when ``node`` itself stays."""
    for name in list(node.children):
        if not _prune_unchanged(node.children[name]):
            del node.children[name]
    return bool(node.children or node.change or node.notes)


def layer_spans(analysis: StackAnalysis) -> list[dict[str, Any]]:
    """Every path's copies with where they stop showing, and its marks: the explorable page's data.

    One record per path: ``{"p": path, "s": [[layer, end|-1, kind, size], ...],
    "m": {layer: [change, [notes]]}}``; a page computes the merged view at layer ``n`` as the paths
    with a span ``layer <= n < end`` and the changes of ``n`` from ``m``, without knowing the rules.
    """
    records = []
    for path in sorted(analysis.paths):
        h = analysis.paths[path]
        spans = [[copy.layer, -1 if end is None else end, copy.kind, copy.size] for copy, end in h.spans()]
        marks = {str(layer): [mark.change, mark.notes] for layer, mark in marks_by_layer(analysis, h).items()}
        records.append({"p": path, "s": spans, "m": marks})
    return records


def tree_json(node: TreeNode) -> dict[str, Any]:
    """A node as plain data for ``--json`` (layers numbered from 1, as everywhere on the CLI)."""
    data: dict[str, Any] = {"name": node.name, "path": node.path, "kind": node.kind, "size": node.total(),
                            "change": node.change, "notes": node.notes,
                            "layer": None if node.layer is None else node.layer + 1}
    if node.redirect:
        data["redirect"] = node.redirect
    if node.children:
        data["children"] = [tree_json(child) for _, child in sorted(node.children.items())]
    return data


def render_tree(node: TreeNode) -> list[str]:
    """Lines like ``A    1.2 kB  ├── etc/motd  [whiteout]``: mark, size, then the tree."""
    lines: list[str] = []
    _render_children(node, "", lines)
    return lines


def _render_children(node: TreeNode, prefix: str, lines: list[str]) -> None:
    items = sorted(node.children.items())
    for i, (name, child) in enumerate(items):
        last = i == len(items) - 1
        label = name + ("/" if child.kind == "dir" else "")
        if child.redirect:
            label += f" (redirect from {child.redirect})"
        notes = f"  [{', '.join(child.notes)}]" if child.notes else ""
        lines.append(printable(f"{child.change or ' '} {human_size(child.total()):>8}  "
                               f"{prefix}{'└── ' if last else '├── '}{label}{notes}"))
        _render_children(child, prefix + ("    " if last else "│   "), lines)


def legend(nodes: Iterable[TreeNode]) -> list[str]:
    """One sentence for each kind of note the tree shows."""
    seen = {note.split(" ", 1)[0] for node in nodes for note in node.notes}
    return [f"  {EXPLANATIONS[key]}" for key in EXPLANATIONS if key in seen]
