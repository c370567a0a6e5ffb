"""``python -m bench``: run the benchmark suites, write bench/results/<stamp>.json and .md.

``--quick`` runs every benchmark at a tiny size (CI) and exits non-zero unless each one ran and
produced numbers for every competitor, and for lamina either numbers or an explicit
"not available" (a lamina piece that has not landed). It never judges a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from bench.common import LAMINA, NOT_AVAILABLE, SuiteResult, machine_stamp, markdown_table
from bench.containers import DEFAULT_PODMAN_MODES, PODMAN_MODES, QUICK_PODMAN_MODES, run_container_suites
from bench.fs import run_fs_suite
from bench.layers import run_layer_suite, spread_markdown
from bench.targets import evaluate_targets

log = logging.getLogger("bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUITES = ("fs", "build", "run", "store", "layers")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at a tiny size; check that each ran")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma list of suites ({','.join(SUITES)})")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, 1 with --quick)")
    parser.add_argument("--fs-reps", type=int, default=None, help="repetitions of the filesystem suite (default 3)")
    parser.add_argument("--fs-scale", type=float, default=1.0,
                        help="filesystem image scale (1.0 = 20k files, 2 x 512 MiB; --quick uses 0.01; see bench/fs_image.py)")
    parser.add_argument("--fs-workloads", default=None, help="comma list of filesystem workloads (default all; see bench/fs_workloads.py)")
    parser.add_argument("--fs-root", type=Path, default=None,
                        help="keep the filesystem image here between runs (default: a temporary directory)")
    parser.add_argument("--podman-modes", default=None,
                        help=f"comma list of {','.join(PODMAN_MODES)} (default {','.join(DEFAULT_PODMAN_MODES)})")
    parser.add_argument("--layers-big", action="store_true",
                        help="layers suite at 1 GiB and 100,000 files instead of 200 MiB and 10,000")
    parser.add_argument("--lamina-modes", default=None, help="comma list of root,rootless (default both)")
    parser.add_argument("--out", type=Path, default=None, help="result prefix (default bench/results/<stamp>)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    if args.podman_modes is None:
        args.podman_modes = QUICK_PODMAN_MODES if args.quick else DEFAULT_PODMAN_MODES
    else:
        args.podman_modes = [m.strip() for m in args.podman_modes.split(",") if m.strip()]
        unknown = set(args.podman_modes) - set(PODMAN_MODES)
        if unknown:
            parser.error(f"unknown podman mode(s): {', '.join(sorted(unknown))}")
    if args.lamina_modes is None:
        args.lamina_modes = ["root"] if args.quick else ["root", "rootless"]
    else:
        args.lamina_modes = [m.strip() for m in args.lamina_modes.split(",") if m.strip()]
        if set(args.lamina_modes) - {"root", "rootless"}:
            parser.error("--lamina-modes takes root and/or rootless")
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.fs_reps is None:
        args.fs_reps = 1 if args.quick else 3
    return args


def quick_problems(suites: list[SuiteResult]) -> list[str]:
    """What makes a --quick run a failure: a suite that did not run, a wrong result, a cell with
    neither a number nor a reason."""
    problems = []
    for suite in suites:
        if suite.error:
            problems.append(f"{suite.name}: {suite.error}")
            continue
        if not suite.rows:
            problems.append(f"{suite.name}: no rows")
        for row in suite.rows:
            for system in suite.systems:
                note = row.notes.get(system, "")
                if note.startswith("wrong result"):  # measured, but the workload's check failed
                    problems.append(f"{suite.name}/{row.key}/{system}: {note}")
                if row.median(system) is not None:
                    continue
                note = row.notes.get(system, "no measurement and no reason")
                if system.startswith(LAMINA) and note.startswith(NOT_AVAILABLE):
                    continue  # a lamina piece that has not landed yet: said plainly, not a failure
                problems.append(f"{suite.name}/{row.key}/{system}: {note}")
    return problems


def render_markdown(stamp: dict, suites: list[SuiteResult], targets: list[dict], quick: bool) -> str:
    lines = [f"# lamina benchmarks, {stamp['started']}{' (--quick: tiny sizes, not for reading)' if quick else ''}",
             "",
             f"commit `{stamp['commit'][:12]}`{' (uncommitted changes)' if stamp['tree_dirty'] else ''}, "
             f"kernel {stamp['kernel']}, {stamp['cpus']} x {stamp['cpu']}, {stamp['mem_mib']} MiB, "
             f"load {' '.join(stamp['loadavg'])} at start, {' '.join(stamp['loadavg_end'])} at end; "
             f"{stamp['podman']}; {stamp['fuse_overlayfs']}.",
             "",
             "Medians in seconds; ratio columns are lamina / competitor from the same interleaved run "
             "(lower is better, < 1 means lamina is faster).",
             ""]
    for suite in suites:
        lines.append(f"## {suite.name}")
        lines.append("")
        if suite.error:
            lines.append(f"did not run: {suite.error}")
        else:
            lines.append(markdown_table(suite))
            if suite.name == "layers":
                lines += ["", spread_markdown(suite)]
        lines.append("")
    if targets:
        lines += ["## targets (issue 8)", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in targets]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bench: %(levelname)s: %(message)s", stream=sys.stderr)
    started = dt.datetime.now(dt.UTC)
    stamp = machine_stamp()
    stamp["started"] = started.strftime("%Y-%m-%d %H:%M UTC")
    stamp["argv"] = sys.argv
    t0 = time.perf_counter()
    suites: list[SuiteResult] = []
    if "fs" in args.only:
        print("bench: filesystem suite ...", file=sys.stderr, flush=True)
        suites.append(run_fs_suite(quick=args.quick, reps=args.fs_reps, scale=args.fs_scale,
                                   workdir=args.fs_root, workloads=args.fs_workloads))
    container_suites = {s for s in ("build", "run", "store") if s in args.only}
    if container_suites:
        print(f"bench: {', '.join(sorted(container_suites))} suites ...", file=sys.stderr, flush=True)
        suites += run_container_suites(quick=args.quick, reps=args.reps, podman_modes=args.podman_modes,
                                       lamina_modes=args.lamina_modes, suites=container_suites)
    if "layers" in args.only:
        print("bench: layers suite ...", file=sys.stderr, flush=True)
        suites.append(run_layer_suite(quick=args.quick, big=args.layers_big, reps=args.reps,
                                      podman_modes=args.podman_modes, lamina_modes=args.lamina_modes))
    stamp["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    stamp["total_s"] = round(time.perf_counter() - t0, 1)
    targets = evaluate_targets(suites)
    prefix = args.out or RESULTS_DIR / started.strftime("%Y%m%d-%H%M%S")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    document = {"stamp": stamp, "quick": args.quick, "reps": args.reps, "fs_reps": args.fs_reps,
                "suites": [s.to_json() for s in suites], "targets": targets}
    prefix.with_suffix(".json").write_text(json.dumps(document, indent=1))
    markdown = render_markdown(stamp, suites, targets, args.quick)
    prefix.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"bench: wrote {prefix}.json and .md in {stamp['total_s']} s", file=sys.stderr)
    if args.quick:
        problems = quick_problems(suites)
        for problem in problems:
            print(f"bench: --quick: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0 if not any(s.error for s in suites) else 1


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
