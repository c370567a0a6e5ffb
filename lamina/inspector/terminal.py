"""A terminal explorer in the manner of dive's UI: layers on the left, the file tree on the right.

Keys: Tab switches between the panes; Up/Down (or k/j) move; in the layer pane moving selects the
layer; in the tree pane Enter, Space or Right opens a directory, Left closes it (or goes to its
parent); ``c`` switches between the layer's changes and the merged view up to it; ``q`` quits.
The bottom line explains, in one sentence, the mark under the cursor (whiteout, opaque directory,
copy-up, ...).

:class:`ExplorerState` holds everything the screen shows and reacts to keys without curses, so
tests drive it directly; :func:`run` only draws it with the standard library's ``curses``.
"""

from __future__ import annotations

import curses
from dataclasses import dataclass, field

from lamina.inspector import trees
from lamina.inspector.analysis import StackAnalysis
from lamina.inspector.render import human_size, printable

HELP = "Tab pane  ↑↓ move  Enter/→ open  ← close  c changes/merged  q quit"


@dataclass
class Row:
    depth: int
    node: trees.TreeNode


@dataclass
class ExplorerState:
    analysis: StackAnalysis
    layer: int = -1                       # 0-based; -1: the top layer
    changes_only: bool = True
    focus: str = "layers"                 # or "tree"
    cursor: int = 0                       # row under the cursor in the tree pane
    expanded: set[str] = field(default_factory=set)
    root: trees.TreeNode = field(init=False)
    rows: list[Row] = field(init=False)

    def __post_init__(self) -> None:
        if self.layer < 0:
            self.layer = len(self.analysis.layers) - 1
        self._rebuild()

    def _rebuild(self) -> None:
        self.root = trees.layer_tree(self.analysis, self.layer, self.changes_only)
        if self.changes_only:   # a layer's changes are few: show them all
            self.expanded = {n.path for n in self.root.walk() if n.children}
        self._flatten()

    def _flatten(self) -> None:
        self.rows = []

        def add(node: trees.TreeNode, depth: int) -> None:
            for _, child in sorted(node.children.items()):
                self.rows.append(Row(depth, child))
                if child.children and child.path in self.expanded:
                    add(child, depth + 1)

        add(self.root, 0)
        self.cursor = max(0, min(self.cursor, len(self.rows) - 1))

    @property
    def current(self) -> trees.TreeNode | None:
        return self.rows[self.cursor].node if self.rows else None

    def key(self, key: str) -> bool:
        """React to one key (curses names: ``KEY_UP``, ``\\t``, ``q``...); False to quit."""
        if key in ("q", "Q"):
            return False
        if key == "\t":
            self.focus = "tree" if self.focus == "layers" else "layers"
        elif key == "c":
            self.changes_only = not self.changes_only
            self.expanded = set()
            self.cursor = 0
            self._rebuild()
        elif key in ("KEY_UP", "k", "KEY_DOWN", "j"):
            step = -1 if key in ("KEY_UP", "k") else 1
            if self.focus == "layers":
                # The pane lists the newest layer first, as `lamina layers` does: up goes newer.
                self.layer = max(0, min(len(self.analysis.layers) - 1, self.layer - step))
                self.cursor = 0
                self._rebuild()
            else:
                self.cursor = max(0, min(len(self.rows) - 1, self.cursor + step))
        elif self.focus == "tree" and self.current is not None:
            self._tree_key(key, self.current)
        return True

    def _tree_key(self, key: str, node: trees.TreeNode) -> None:
        if key in ("KEY_RIGHT", "l") and node.children:
            self.expanded.add(node.path)
        elif key in ("\n", " ", "KEY_ENTER") and node.children:
            self.expanded.symmetric_difference_update({node.path})   # toggle
        elif key in ("KEY_LEFT", "h"):
            if node.path in self.expanded:
                self.expanded.discard(node.path)
            else:
                parent = node.path.rsplit("/", 1)[0] or "/"
                self.cursor = next((i for i, r in enumerate(self.rows) if r.node.path == parent), self.cursor)
        self._flatten()

    def layer_lines(self) -> list[tuple[int, str]]:
        """``(index, text)`` for the layer pane, newest first."""
        out = []
        for layer in reversed(self.analysis.layers):
            label = "C" if layer is self.analysis.container_layer else str(layer.index + 1)
            out.append((layer.index, f"{label:>2} {human_size(layer.size):>8}  {layer.instruction or '(no history)'}"))
        return out

    def tree_line(self, row: Row) -> str:
        node = row.node
        opener = ("▾ " if node.path in self.expanded else "▸ ") if node.children else "  "
        notes = f"  [{', '.join(node.notes)}]" if node.notes else ""
        name = node.name + ("/" if node.kind == "dir" else "")
        return f"{node.change or ' '} {human_size(node.total()):>8}  {'  ' * row.depth}{opener}{name}{notes}"

    def status(self) -> str:
        """The sentence that explains the mark under the cursor, or the key help."""
        node = self.current if self.focus == "tree" else None
        if node is not None:
            for note in node.notes:
                explanation = trees.EXPLANATIONS.get(note.split(" ", 1)[0])
                if explanation:
                    return explanation
        return HELP

    def title(self) -> str:
        what = "changes of" if self.changes_only else "merged view up to"
        return f"{what} {self.analysis.layer_name(self.layer)}"


def run(analysis: StackAnalysis, title: str) -> None:
    """Explore ``analysis`` in the terminal until ``q``.

    Resource handling: curses owns the terminal until return, and restores it on any exit.
    """
    state = ExplorerState(analysis)
    curses.wrapper(_loop, state, title)


def _loop(screen: curses.window, state: ExplorerState, title: str) -> None:
    curses.curs_set(0)
    top = 0
    while True:
        height, width = screen.getmaxyx()
        left = min(48, width // 3)
        body = max(1, height - 3)
        if state.cursor < top:
            top = state.cursor
        elif state.cursor >= top + body:
            top = state.cursor - body + 1
        screen.erase()
        _put(screen, 0, 0, printable(f"{title} — {state.title()}"), width, curses.A_BOLD)
        for row, (index, text) in enumerate(state.layer_lines()[:body]):
            attr = curses.A_REVERSE if index == state.layer else 0
            if state.focus == "layers" and index == state.layer:
                attr |= curses.A_BOLD
            _put(screen, row + 1, 0, printable(text), left - 1, attr)
        for row, item in enumerate(state.rows[top:top + body]):
            selected = state.focus == "tree" and top + row == state.cursor
            _put(screen, row + 1, left, printable(state.tree_line(item)), width - left,
                 curses.A_REVERSE if selected else 0)
        if not state.rows:
            _put(screen, 1, left, "(no changes)", width - left, 0)
        _put(screen, height - 1, 0, state.status(), width, curses.A_DIM)
        screen.refresh()
        key = screen.getkey()
        if not state.key("\t" if key == "KEY_BTAB" else key):
            return


def _put(screen: curses.window, y: int, x: int, text: str, width: int, attr: int) -> None:
    if width <= 0:
        return
    try:
        screen.addnstr(y, x, text, width, attr)
    except curses.error:   # the bottom-right cell cannot be written; a tiny window has no room
        pass
