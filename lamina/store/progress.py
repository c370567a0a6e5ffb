"""Progress bars on stderr, shown only when stderr is a terminal (quiet in pipes, logs and tests)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_size(n: float) -> str:
    """Docker's human sizes: ``1.23MB`` (decimal units, 3 significant digits)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}B"


class ProgressBar:
    """``label [=====>    ] 12.3MB/45.6MB``, redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self, final: str | None = None) -> None:
        width = 30
        if self.total:
            filled = min(width, int(width * self.done / self.total))
            bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
            amount = f"{human_size(self.done)}/{human_size(self.total)}"
        else:
            bar = "-" * width
            amount = human_size(self.done)
        text = f"\r{self.label} [{bar}] {amount}"
        if final:
            text = f"\r{self.label} {final}\x1b[K\n"
        self.stream.write(text)
        self.stream.flush()

    def finish(self, message: str = "done") -> None:
        if self.enabled:
            self._draw(final=message)
