"""Progress bars on stderr, shown only when stderr is a terminal (quiet in pipes, logs and tests),
and heartbeat lines for long operations that have no bar."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
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


class Heartbeat:
    """Lines that say a long, otherwise silent, operation is still going (a layer being committed).

    Nothing is said for ``first_after`` seconds (short operations stay silent); then ``label`` and
    the bytes counted so far, again every ``every`` seconds, until the ``with`` block ends. Calling
    the heartbeat with a byte count adds to the count (it is a progress callback).

    Resource handling: owns one daemon thread, stopped and joined when the block ends.
    """

    def __init__(self, say: Callable[[str], None], label: str, first_after: float = 2.0,
                 every: float = 5.0) -> None:
        self.say = say
        self.label = label
        self.first_after = first_after
        self.every = every
        self.done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, n: int) -> None:
        self.done += n

    def _run(self) -> None:
        wait = self.first_after
        while not self._stop.wait(wait):
            self.say(f"{self.label}: {human_size(self.done)}" if self.done else f"{self.label} ...")
            wait = self.every

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="lamina-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
