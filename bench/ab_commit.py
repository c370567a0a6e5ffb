"""A/B of committing a RUN step's upper directory against another lamina tree, interleaved.

    python -m bench.ab_commit --baseline /path/to/old/tree [--reps 5] [--files 10000]

As the unprivileged bench user (with subordinate ids), in a fresh store per turn: an upper of
``--files`` small files in 100 directories is written in lamina's user namespace (left dirty in
the page cache, as a RUN step leaves them) and ``builder.workspace._finish_upper`` (what a RUN step's commit runs there: pack the
upper into a blob and make the stored layer) is timed. The two trees take turns, alternating who
goes first; each runs from its own sources (PYTHONPATH) with this interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT
from bench.podman_env import ensure_bench_user

# Run as the bench user with one tree's sources first on the path; prints the commit's wall and CPU
# seconds (the CPU of the user-namespace child that commits, which the load does not inflate much).
_TURN = """
import os, resource, sys, time
from pathlib import Path
from builder.workspace import _finish_upper
from lamina.store.store import Store
from runner.sandbox import call_in_userns
from unionfs.core.stack import LayerStack

store = Store.open(Path(sys.argv[1]))
files = int(sys.argv[2])
step = store.tmp_dir / f"{os.getpid()}.build-step.ab"
upper, work = step / "diff", step / "work"
for path in (step, upper, work):
    path.mkdir()

def fill(upper):
    for i in range(100):
        directory = upper / "many" / f"d{i}"
        directory.mkdir(parents=True)
        for j in range(files // 100):
            (directory / f"f{j}").write_text(f"{j}\\n")

call_in_userns(fill, upper)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

start, cpu_start = time.perf_counter(), cpu()
call_in_userns(_finish_upper, store, LayerStack.from_bottom_up([]), upper, work, [], None)
print(time.perf_counter() - start, cpu() - cpu_start)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_commit", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other tree (a git worktree)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args(argv)
    user = ensure_bench_user()
    trees = {"new": REPO_ROOT, "baseline": args.baseline.resolve()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="lamina-ab-commit-", dir="/var/tmp") as scratch:
        Path(scratch).chmod(0o755)
        os.chown(scratch, user.uid, user.gid)
        for rep in range(args.reps):
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for name in order:
                root = Path(scratch) / f"{name}-{rep}"
                done = subprocess.run([sys.executable, "-c", _TURN, str(root), str(args.files)],
                                      env={"PYTHONPATH": str(trees[name]), "PATH": "/usr/bin:/bin",
                                           "HOME": scratch},
                                      user=user.uid, group=user.gid, extra_groups=[], capture_output=True,
                                      text=True, check=False, timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: {done.stderr.strip()[-2000:]}")
                wall, cpu_seconds = done.stdout.split()[-2:]
                times[name].append(float(wall))
                cpu[name].append(float(cpu_seconds))
                subprocess.run(["rm", "-rf", str(root)], check=False)
    for what, found in (("wall", times), ("CPU", cpu)):
        for name, values in found.items():
            print(f"{what} {name}: median {statistics.median(values):.3f} s, runs "
                  f"{' '.join(f'{v:.2f}' for v in values)}")
        print(f"{what} new / baseline: {statistics.median(found['new']) / statistics.median(found['baseline']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
