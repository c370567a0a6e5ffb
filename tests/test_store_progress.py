"""Per-layer progress: the model and its two renderers, with a fake clock (no terminal, no waiting)."""

from __future__ import annotations

import io
import re

from lamina.store.progress import LayerProgress, PlainRenderer, TerminalRenderer, human_size, progress_text

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_sizes_as_docker_prints_them() -> None:
    assert [human_size(n) for n in (0, 999, 1000, 12_345_678, 45_600_000)] == ["0B", "999B", "1kB", "12.3MB", "45.6MB"]
    assert progress_text("Downloading", 12_345_678, 45_600_000, bar=False) == "Downloading  12.3MB/45.6MB"
    assert progress_text("Pull complete", None, None, bar=False) == "Pull complete"
    assert re.fullmatch(r"Downloading  \[={25}> {24}\]  22.8MB/45.6MB",
                        progress_text("Downloading", 22_800_000, 45_600_000, bar=True))


def test_plain_lines_state_changes_and_a_count_every_five_seconds() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(PlainRenderer(out, clock=clock))
    progress.line("v1: Pulling from app")
    progress.layer(DIGEST, "Pulling fs layer")
    progress.layer(OTHER, "Already exists")
    count = progress.counter(DIGEST, "Downloading", 3_000_000)
    count(1_000_000)          # the first byte count is a state change: shown at once
    for _ in range(50):       # more bytes within 5 s: nothing
        clock.now += 0.09
        count(1000)
    clock.now += 0.6          # 5.1 s after the last line: one more line
    count(1000)
    clock.now += 1
    count(1000)
    progress.layer(DIGEST, "Download complete")
    progress.layer(DIGEST, "Download complete")  # no change, no line
    assert out.getvalue().splitlines() == [
        "v1: Pulling from app",
        "abababababab: Pulling fs layer",
        "cdcdcdcdcdcd: Already exists",
        "abababababab: Downloading  1MB/3MB",
        "abababababab: Downloading  1.05MB/3MB",
        "abababababab: Download complete",
    ]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_a_retry_restarts_the_count() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(PlainRenderer(out, clock=clock))
    count = progress.counter(DIGEST, "Pushing", 2000)
    count(1500)
    count(-1)
    clock.now += 10
    count(500)
    assert out.getvalue().splitlines()[-1] == "abababababab: Pushing  500B/2kB"


def test_terminal_redraws_each_layer_on_its_own_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(TerminalRenderer(out, clock=clock))
    progress.line("v1: Pulling from app")
    progress.layer(DIGEST, "Pulling fs layer")
    progress.layer(OTHER, "Pulling fs layer")
    count = progress.counter(DIGEST, "Downloading", 2000)
    count(1000)
    clock.now += 0.01
    count(500)                # too soon after the last redraw: skipped
    progress.layer(OTHER, "Pull complete")
    text = out.getvalue()
    assert text.startswith("v1: Pulling from app\nabababababab: Pulling fs layer\ncdcdcdcdcdcd: Pulling fs layer\n")
    rest = text[text.index("cdcdcdcdcdcd: Pulling fs layer\n") + 31:]
    # The first layer's line is two lines up, the second's one line up; the cursor comes back down.
    assert rest == ("\x1b[2A\r\x1b[2Kabababababab: Downloading  [" + "=" * 25 + ">" + " " * 24 + "]  1kB/2kB\r\x1b[2B"
                    "\x1b[1A\r\x1b[2Kcdcdcdcdcdcd: Pull complete\r\x1b[1B")
    assert "1.5kB" not in text


def test_silent_without_a_stream() -> None:
    progress = LayerProgress.to_stream(None)
    progress.line("x")
    progress.layer(DIGEST, "Pushed")
    progress.counter(DIGEST, "Pushing", 10)(5)
    assert progress.renderer is None
    assert isinstance(LayerProgress.to_stream(io.StringIO()).renderer, PlainRenderer)


def test_a_finished_count_is_shown_even_right_after_the_last_one() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(PlainRenderer(out, clock=clock))
    progress.counter(DIGEST, "Loading layer", 3000)(1000)
    progress.layer(DIGEST, "Loading layer", 3000, 3000)
    assert out.getvalue().splitlines() == ["abababababab: Loading layer  1kB/3kB", "abababababab: Loading layer  3kB/3kB"]


def test_a_verb_docker_keeps_silent_is_silent_when_short_and_heard_of_when_long() -> None:
    """save and import: nothing in a pipe for a short run (docker prints nothing), per-layer lines
    once it has run longer than ``silent_for``."""
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(PlainRenderer(out, clock=clock, silent_for=3))
    count = progress.counter(DIGEST, "Saving layer", 4_000_000)
    count(1_000_000)
    clock.now += 2.9
    count(1_000_000)
    assert out.getvalue() == ""
    clock.now += 0.2
    count(1_000_000)
    progress.layer(DIGEST, "Saving layer", 4_000_000, 4_000_000)
    assert out.getvalue().splitlines() == ["abababababab: Saving layer  3MB/4MB", "abababababab: Saving layer  4MB/4MB"]


def test_a_step_of_the_whole_archive_is_shown_only_when_slow() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = LayerProgress(PlainRenderer(out, clock=clock))
    fast = progress.counter("archive", "Decompressing", None, silent_for=3)
    fast(1000)
    assert out.getvalue() == ""
    slow = progress.counter("archive", "Reading", None, silent_for=3)
    clock.now += 3
    slow(2000)
    assert out.getvalue() == "archive: Reading  2kB\n"
