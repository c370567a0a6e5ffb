"""A/B of lamina's start-up paths against another build of lamina, interleaved in one run.

    python -m bench.ab_startup --baseline /path/to/old/.venv/bin/lamina [--rounds 20]

Both builds get a private store under a temporary directory, build the same small image once, then
take turns (order alternating each round) at ``run --rm IMAGE true``, ``images`` and a cached
``build``; the table gives medians of wall time and of CPU time (the command and every process it
waited for), and the ratio new / baseline. Compile both trees' bytecode first (``make bytecode``):
on machines with PYTHONDONTWRITEBYTECODE=1 a tree without .pyc files recompiles every module it
imports at every command, which swamps what is being measured.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import CommandFailed, timed

DOCKERFILE = "FROM lamina/busybox\nCOPY f /f\nRUN echo hi > /g\nENV A=1\nWORKDIR /w\n"


def _timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one command, which must succeed (else :class:`CommandFailed`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _ = timed(argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(builds: dict[str, str], rounds: int, work: Path) -> dict[tuple[str, str], list[tuple[float, float]]]:
    context = work / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "f").write_text("x\n")
    cases = {"run --rm IMAGE true": ["run", "--rm", "lamina/busybox", "true"], "images": ["images"],
             "build, every step cached": ["build", "-q", "-t", "ab", str(context)]}

    def argv(name: str, args: list[str]) -> list[str]:
        return [builds[name], "--root", str(work / name), *args]

    for name in builds:
        _timed(argv(name, cases["build, every step cached"]))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {(c, n): [] for c in cases for n in builds}
    order = list(builds)
    for round_number in range(rounds):
        for case, args in cases.items():
            for name in order if round_number % 2 == 0 else reversed(order):
                results[case, name].append(_timed(argv(name, args)))
    return results


def table(results: dict[tuple[str, str], list[tuple[float, float]]]) -> str:
    lines = ["| command | baseline wall | new wall | new / baseline | baseline CPU | new CPU | new / baseline |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case in dict.fromkeys(c for c, _ in results):
        old_wall, old_cpu = (statistics.median(x) for x in zip(*results[case, "baseline"], strict=True))
        new_wall, new_cpu = (statistics.median(x) for x in zip(*results[case, "new"], strict=True))
        lines.append(f"| `{case}` | {old_wall * 1e3:.0f} ms | {new_wall * 1e3:.0f} ms | {new_wall / old_wall:.2f} "
                     f"| {old_cpu * 1e3:.0f} ms | {new_cpu * 1e3:.0f} ms | {new_cpu / old_cpu:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the other build's lamina command")
    parser.add_argument("--new", default=str(Path(sys.executable).parent / "lamina"),
                        help="this build's lamina command (default: the one beside this interpreter)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lamina-ab-startup."))
    try:
        results = measure({"baseline": args.baseline, "new": args.new}, args.rounds, work)
    except CommandFailed as e:
        print(f"ab_startup: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{args.rounds} rounds, load average {' '.join(load)} at the end; medians\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
