"""Progress bars on stderr, shown only when stderr is a terminal (quiet in pipes, logs and tests),
heartbeat lines for long operations that have no bar, and per-layer progress (pull, push, load,
save, import) on a terminal or in a pipe."""

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


# ----- per-layer progress, as docker's pull/push/load print it -----
#
# One model (each layer's status and byte counts) and two renderers: on a terminal every layer keeps
# its own line, redrawn in place (docker's jsonmessage does the same with cursor moves); in a pipe
# every status change is one plain line, and a running transfer adds at most one "Downloading X/Y"
# line per layer every ``every`` seconds, so a long transfer is never silent and a short one prints
# only its state changes. Time comes from an injected clock, so both are tested without a terminal
# and without waiting.

Clock = Callable[[], float]


def layer_id(digest: str) -> str:
    """The 12 hex digits docker shows for a layer."""
    return digest.removeprefix("sha256:")[:12]


def progress_text(status: str, current: int | None, total: int | None, bar: bool) -> str:
    """``Downloading  12.3MB/45.6MB`` (with docker's ``[==>   ]`` bar when ``bar``)."""
    if current is None:
        return status
    amount = f"{human_size(current)}/{human_size(total)}" if total else human_size(current)
    if not bar or not total:
        return f"{status}  {amount}"
    width = 50
    filled = min(width, width * current // total)
    drawn = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
    return f"{status}  [{drawn}]  {amount}"


class PlainRenderer:
    """Line by line, for pipes and logs: a line per state change, a byte count every ``every`` s.

    With ``silent_for``, nothing at all is written in the first ``silent_for`` seconds: a verb that
    docker keeps silent (save, import) stays so when it is short, and a long one still shows that it
    is going."""

    def __init__(self, stream: TextIO, clock: Clock = time.monotonic, every: float = 5.0,
                 silent_for: float = 0.0) -> None:
        self.stream = stream
        self.clock = clock
        self.every = every
        self._shown: dict[str, tuple[str, float]] = {}
        self._silent_until = clock() + silent_for if silent_for else 0.0

    def message(self, text: str) -> None:
        if self._silent_until and self.clock() < self._silent_until:
            return
        self.stream.write(f"{text}\n")
        self.stream.flush()

    def layer(self, ident: str, status: str, current: int | None, total: int | None,
              force: bool = False) -> None:
        now = self.clock()
        if self._silent_until and now < self._silent_until:
            return
        last = self._shown.get(ident)
        if not force and last is not None and last[0] == status and (current is None or now - last[1] < self.every):
            return
        self._shown[ident] = (status, now)
        self.message(f"{ident}: {progress_text(status, current, total, bar=False)}")


class TerminalRenderer:
    """A line per layer, redrawn in place (at most ``every`` seconds apart while bytes flow)."""

    def __init__(self, stream: TextIO, clock: Clock = time.monotonic, every: float = 0.1) -> None:
        self.stream = stream
        self.clock = clock
        self.every = every
        self._rows: dict[str, int] = {}
        self._lines = 0
        self._drawn: dict[str, tuple[str, float]] = {}

    def message(self, text: str) -> None:
        self.stream.write(f"{text}\n")
        self.stream.flush()
        self._lines += 1

    def layer(self, ident: str, status: str, current: int | None, total: int | None,
              force: bool = False) -> None:
        now = self.clock()
        last = self._drawn.get(ident)
        if not force and last is not None and last[0] == status and current is not None and now - last[1] < self.every:
            return
        self._drawn[ident] = (status, now)
        text = f"{ident}: {progress_text(status, current, total, bar=True)}"
        row = self._rows.get(ident)
        if row is None:
            self._rows[ident] = self._lines
            self.message(text)
            return
        up = self._lines - row
        self.stream.write(f"\x1b[{up}A\r\x1b[2K{text}\r\x1b[{up}B")
        self.stream.flush()


class LayerProgress:
    """What the transfers report: messages and each layer's status; thread-safe; silent without a
    renderer. ``counter`` gives the byte callback a blob transfer calls."""

    def __init__(self, renderer: PlainRenderer | TerminalRenderer | None) -> None:
        self.renderer = renderer
        self._lock = threading.Lock()
        self._done: dict[str, int] = {}

    @classmethod
    def to_stream(cls, stream: TextIO | None, silent_for: float = 0.0) -> LayerProgress:
        """A terminal renderer if ``stream`` is a terminal, plain lines if not (none at all in the
        first ``silent_for`` seconds), nothing if None."""
        if stream is None:
            return cls(None)
        return cls(TerminalRenderer(stream) if stream.isatty() else PlainRenderer(stream, silent_for=silent_for))

    def line(self, text: str) -> None:
        if self.renderer is not None:
            with self._lock:
                self.renderer.message(text)

    def layer(self, digest: str, status: str, current: int | None = None, total: int | None = None) -> None:
        """``digest``'s new status; with byte counts (a transfer's last), shown even if one was
        shown a moment ago."""
        if self.renderer is not None:
            with self._lock:
                self.renderer.layer(layer_id(digest), status, current, total, force=current is not None)

    def counter(self, digest: str, status: str, total: int | None, silent_for: float = 0.0) -> Callable[[int], None]:
        """A callback adding bytes to ``digest``'s ``status`` (a negative count restarts it). With
        ``silent_for``, the count is shown only once it has run that long: a step of the whole
        archive (reading, decompressing) is heard of only when it is slow."""
        ident = layer_id(digest)
        self._done[ident] = 0
        clock = self.renderer.clock if self.renderer is not None else time.monotonic
        shown_after = clock() + silent_for

        def count(n: int) -> None:
            with self._lock:
                self._done[ident] = 0 if n < 0 else self._done[ident] + n
                if self.renderer is not None and (not silent_for or clock() >= shown_after):
                    self.renderer.layer(ident, status, self._done[ident], total)
        return count
