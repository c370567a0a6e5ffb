"""``python -m bench.profile``: where lamina-unionfs spends its time, sampled by py-spy.

Mounts lamina-unionfs in the foreground under ``py-spy record`` on the filesystem suite's image
(:mod:`bench.fs_image`; built if missing), runs the chosen workloads of :mod:`bench.fs_workloads`
on it (cold: caches dropped before each), unmounts, and sums py-spy's
collapsed stacks into two tables: time spent *in* each function (self) and time spent *under*
it (inclusive). Idle time (the server waiting for the kernel) is not sampled, so the tables show
where the CPU goes. Needs root (mount namespace, drop_caches) and ``py-spy``
(``pip install py-spy`` into the venv).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import drop_caches
from bench.fs_image import ImageParams, open_image
from bench.fs_systems import mount_points, overlay_options, unionfs_command
from bench.fs_workloads import WORKLOADS

DEFAULT_WORKLOADS = "find,walk,stat,readdir,seqread,randread,create,copyup_small,untar,delete"
NAMESPACE_ENV = "LAMINA_BENCH_PROFILE_NS"


def frame_name(frame: str) -> str:
    """``handler (unionfs/adapter.py:120)`` -> ``unionfs/adapter.py:handler``; line numbers vary per sample."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{function}"


def summarize(collapsed: Path, top: int = 25) -> dict[str, Any]:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {"samples": total,
            "self": [(name, count / total) for name, count in self_time.most_common(top)] if total else [],
            "inclusive": [(name, count / total) for name, count in inclusive.most_common(top)] if total else []}


def markdown(summary: dict[str, Any], workloads: list[str], timings: dict[str, dict[str, float]]) -> str:
    lines = [f"py-spy samples: {summary['samples']} (workloads: {', '.join(workloads)})", "",
             "| workload | seconds (under py-spy) |", "|---|---:|"]
    for workload, metrics in timings.items():
        lines.append(f"| {workload} | {', '.join(f'{k} {v:.3f}' for k, v in metrics.items())} |")
    for title in ("self", "inclusive"):
        lines += ["", f"| {title} % | function |", "|---:|---|"]
        lines += [f"| {share * 100:.1f} | `{name}` |" for name, share in summary[title]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--fs-root", type=Path, default=Path("/tmp/lamina-bench-fs"),
                        help="the filesystem suite's --fs-root (image reused when the scale matches)")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true",
                        help="also sample C/Cython frames (pyfuse3's request loop, system calls)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.profile: needs root")
    if os.environ.get(NAMESPACE_ENV) != "1":
        # A private mount namespace: our mount cannot leak into namespaces others create meanwhile.
        os.execvpe("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                               "bench.profile", *sys.argv[1:]], dict(os.environ, **{NAMESPACE_ENV: "1"}))
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if py_spy is None:
        raise SystemExit("bench.profile: py-spy is not installed (pip install py-spy into the venv)")
    root = args.fs_root.resolve()
    manifest = open_image(root / "img", ImageParams.scaled(args.scale))
    base = root / "profile"
    shutil.rmtree(base, ignore_errors=True)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for directory in (upper, work, mnt):
        directory.mkdir(parents=True)
    collapsed = args.out.with_suffix(".collapsed.txt")
    collapsed.parent.mkdir(parents=True, exist_ok=True)
    server = [str(unionfs_command()), "-f", "-o", overlay_options(manifest.lowers(), upper, work), str(mnt)]
    # --nonblocking samples without pausing the server (less distortion) but cannot unwind C frames.
    sampling = ["--native"] if args.native else ["--nonblocking"]
    recorder = subprocess.Popen([py_spy, "record", "--rate", str(args.rate), "--format", "raw", *sampling,
                                 "-o", str(collapsed), "--", *server],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timings: dict[str, dict[str, float]] = {}
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    try:
        deadline = time.monotonic() + 30
        while str(mnt) not in mount_points():
            if recorder.poll() is not None or time.monotonic() > deadline:
                error = recorder.stderr.read().decode()[-500:] if recorder.stderr else ""
                raise SystemExit(f"bench.profile: mount failed: {error}")
            time.sleep(0.01)
        for workload in workloads:
            drop_caches()
            if workload.prepare:
                workload.prepare(manifest)
            measured = workload.run(mnt, manifest)
            timings[workload.name] = measured.seconds
            if measured.problems:
                print(f"bench.profile: {workload.name}: {measured.problems}", file=sys.stderr)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            recorder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(collapsed)
    text = markdown(summary, [w.name for w in workloads], timings)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"timings": timings, **summary}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
