"""``python -m bench.inspector``: how long ``lamina layers`` spends on its figures for a big stack.

A synthetic two-layer stack: a base of ``--files`` files in 500 directories (a distribution's
``/usr/share`` has that shape), and a layer that deletes ``--whiteouts`` of them, as a cleanup
``RUN`` does. Times, in seconds (median of ``--reps``), the scan of both layers, dive's score,
lamina's list of hidden files, and the top layer's tree. It prints the figures and judges nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lamina.inspector import trees, waste
from lamina.inspector.analysis import LayerInput, StackAnalysis, analyze
from unionfs.core import ondisk

DIRECTORIES = 500


def make_stack(root: Path, files: int, whiteouts: int) -> list[LayerInput]:
    base, top = root / "base", root / "top"
    for i in range(files):
        path = base / f"usr/share/d{i % DIRECTORIES}/f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i % 4096))
    for i in range(min(whiteouts, files)):
        parent = top / f"usr/share/d{i % DIRECTORIES}"
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ondisk.make_whiteout(fd, f"f{i}", prefer=ondisk.WhiteoutStyle.CHAR_DEVICE)
        finally:
            os.close(fd)
    return [LayerInput(base, "sha256:" + "1" * 64, "base"), LayerInput(top, "sha256:" + "2" * 64, "cleanup")]


def median_seconds(step: Callable[[], object], reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inspector", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--whiteouts", type=int, default=5_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-inspector-") as tmp:
        stack = make_stack(Path(tmp), args.files, args.whiteouts)
        analysis: StackAnalysis = analyze(stack)
        steps: dict[str, Callable[[], object]] = {
            "scan both layers": lambda: analyze(stack),
            "dive's score": lambda: waste.dive_score(analysis),
            "hidden files": lambda: waste.hidden_files(analysis),
            "top layer's tree": lambda: trees.layer_tree(analysis, len(stack) - 1),
        }
        print(f"{args.files} files, {args.whiteouts} whiteouts, median of {args.reps}")
        for label, step in steps.items():
            print(f"  {label:<18} {median_seconds(step, args.reps):8.3f} s")


if __name__ == "__main__":
    main()
