"""What every benchmark suite shares: result rows, medians and ratios, the machine stamp, timing.

A suite returns :class:`Row` objects: one per measured quantity, holding the raw seconds of every
system (lamina and its competitors) from the same interleaved run, or, for a system that could not
run, a note saying why ("not available: ..." or "failed: ..."). Nothing here ever invents a number:
a missing measurement stays missing and is shown as such.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAMINA = "lamina"
NOT_AVAILABLE = "not available"


@dataclass
class Row:
    """One measured quantity of one suite, for every system that took part."""

    suite: str
    key: str
    label: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, system: str, seconds: float) -> None:
        self.samples.setdefault(system, []).append(seconds)

    def note(self, system: str, text: str) -> None:
        self.notes[system] = text

    def median(self, system: str) -> float | None:
        values = self.samples.get(system)
        return statistics.median(values) if values else None

    def ratio(self, system: str, reference: str) -> float | None:
        mine, theirs = self.median(system), self.median(reference)
        if mine is None or theirs is None or theirs <= 0:
            return None
        return mine / theirs

    def to_json(self) -> dict[str, Any]:
        systems = sorted(set(self.samples) | set(self.notes))
        return {"suite": self.suite, "key": self.key, "label": self.label, "samples_s": self.samples,
                "median_s": {s: self.median(s) for s in systems}, "notes": self.notes}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Row:
        return cls(document["suite"], document["key"], document["label"],
                   {system: list(values) for system, values in document["samples_s"].items()},
                   dict(document["notes"]))


@dataclass
class SuiteResult:
    """The rows of one suite, the systems it compared (lamina first) and free-form details."""

    name: str
    systems: list[str]
    rows: list[Row]
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "systems": self.systems, "rows": [r.to_json() for r in self.rows],
                "details": self.details, "error": self.error}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> SuiteResult:
        return cls(document["name"], list(document["systems"]), [Row.from_json(r) for r in document["rows"]],
                   dict(document["details"]), document["error"])


def format_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 0.001:
        return f"{value:.3g} s"
    return f"{value * 1e6:.0f} µs"


def markdown_table(suite: SuiteResult) -> str:
    """Medians of every system and the ratio lamina / each competitor, one line per row."""
    lamina_systems = [s for s in suite.systems if s.startswith(LAMINA)]
    competitors = [s for s in suite.systems if not s.startswith(LAMINA)]
    # Compare like with like: lamina as root with competitors running as root, rootless with rootless.
    ratio_columns = [(mine, other) for mine in lamina_systems for other in competitors
                     if ("rootless" in mine) == ("rootless" in other)]
    header = ["workload", *suite.systems, *(f"{m} / {o}" for m, o in ratio_columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    footnotes: dict[str, int] = {}
    for row in suite.rows:
        cells = [row.label]
        for system in suite.systems:
            median = row.median(system)
            text = format_seconds(median)
            note = row.notes.get(system)
            if note:
                number = footnotes.setdefault(note, len(footnotes) + 1)
                text = (f"{text} [{number}]" if median is not None
                        else ("n/a" if note.startswith(NOT_AVAILABLE) else "FAIL") + f" [{number}]")
            cells.append(text)
        for mine, other in ratio_columns:
            ratio = row.ratio(mine, other)
            cells.append("—" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if footnotes:
        lines.append("")
    for note, number in footnotes.items():
        lines.append(f"- [{number}] {note}")
    return "\n".join(lines)


def run_text(argv: Sequence[str], timeout: float = 20) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (done.stdout or done.stderr).strip()


def _fuse_overlayfs_version() -> str:
    """``fuse-overlayfs: version 1.10`` (it prints fusermount3's version and more around it)."""
    lines = run_text(["fuse-overlayfs", "--version"]).splitlines()
    return next((line for line in lines if line.startswith("fuse-overlayfs")), lines[0] if lines else "unknown")


def machine_stamp() -> dict[str, Any]:
    """Commit, kernel, CPU, memory, load and tool versions: what a number needs to be read."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = run_text(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = run_text(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "commit": commit,
        "tree_dirty": bool(dirty) and not dirty.startswith("unknown"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_mib": mem_kib // 1024,
        "python": sys.version.split()[0],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "podman": run_text(["podman", "--version"]) if shutil.which("podman") else None,
        "fuse_overlayfs": _fuse_overlayfs_version() if shutil.which("fuse-overlayfs") else None,
        "user": os.geteuid(),
    }


def timed(argv: Sequence[str], *, check: bool = True, **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run argv to completion; seconds from spawn to exit, and the completed process."""
    start = time.perf_counter()
    done = subprocess.run(list(argv), capture_output=True, **kwargs)
    elapsed = time.perf_counter() - start
    if check and done.returncode != 0:
        raise CommandFailed(argv, done)
    return elapsed, done


class CommandFailed(RuntimeError):
    """A benchmarked command exited non-zero; the message carries the tail of its stderr."""

    def __init__(self, argv: Sequence[str], done: subprocess.CompletedProcess[bytes]) -> None:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        super().__init__(f"`{' '.join(map(str, argv))[:200]}` exited {done.returncode}: {' | '.join(tail)[:400]}")
        self.returncode = done.returncode


def drop_caches() -> bool:
    """sync and drop the page, dentry and inode caches (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True
