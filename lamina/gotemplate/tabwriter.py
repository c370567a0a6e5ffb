"""docker's table writer: Go's text/tabwriter (elastic tabstops) as docker/cli configures it,
``tabwriter.NewWriter(out, 10, 1, 3, ' ', 0)``: columns at least 10 wide, 3 spaces of padding,
cells terminated by a tab; the text after a line's last tab is not part of a column.

docker's copy of the package measures a cell in terminal columns (go-runewidth), so a wide
character counts two.
"""

from __future__ import annotations

import unicodedata

MIN_WIDTH = 10
PADDING = 3


def display_width(text: str) -> int:
    """Terminal columns of ``text``: two for East Asian wide characters, none for combining marks."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def tabwrite(text: str, min_width: int = MIN_WIDTH, padding: int = PADDING) -> str:
    """The output of a Go tabwriter given ``text`` and flushed."""
    lines = [line.split("\t") for line in text.split("\n")]
    out: list[str] = []
    widths: list[int] = []

    def write_lines(start: int, end: int) -> None:
        for i in range(start, end):
            cells = lines[i]
            for j, cell in enumerate(cells):
                out.append(cell)
                if j < len(widths) and j < len(cells) - 1:
                    out.append(" " * (widths[j] - display_width(cell)))
            if i + 1 < len(lines):
                out.append("\n")

    def format_block(line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(line0, this)
            line0 = this
            width = min_width
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, display_width(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            format_block(line0, this)
            widths.pop()
            line0 = this
        write_lines(line0, line1)

    format_block(0, len(lines))
    return "".join(out)
