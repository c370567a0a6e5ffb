"""Filesystem suite: lamina-unionfs against the kernel's overlayfs and fuse-overlayfs.

Every system mounts the same synthetic three-layer image (:mod:`bench.fs_image`) and runs the same
workloads (:mod:`bench.fs_workloads`). Method:

- per repetition, each system gets a fresh upper and work directory;
- per workload, the systems take turns in an order that rotates from one workload to the next
  (interleaved, so a change in the machine's load hits them alike);
- each turn unmounts, mounts again (the upper is kept; the mount is timed), syncs and drops the
  kernel's caches ("cold"), then runs the workload, whose "warm" metrics repeat the work at once;
- medians over repetitions; the table's ratios are lamina / competitor from the same run.

The measuring runs in a child process in a private mount namespace (``unshare -m``): its mounts
are invisible to the rest of the machine, cannot be copied into namespaces others create
meanwhile, and vanish with it. A competitor that cannot mount here (no fuse-overlayfs, a kernel
without overlayfs) is left out of the table and named in the suite's details with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import LAMINA, Row, SuiteResult, drop_caches
from bench.fs_image import LAYERS_TOP_FIRST, ImageParams, Manifest, open_image
from bench.fs_systems import (
    FUSE_OVERLAYFS,
    KERNEL,
    MountFailed,
    UnionMount,
    UnionSystem,
    fuse_overlayfs,
    kernel_overlayfs,
    lamina_unionfs,
    mounts_under,
    unavailable_reason,
)
from bench.fs_workloads import WORKLOADS, Measured, Workload, row_labels

log = logging.getLogger(__name__)

SUITE = "filesystem"
SYSTEMS = [LAMINA, KERNEL, FUSE_OVERLAYFS]
QUICK_SCALE = 0.01
WORKLOAD_TIMEOUT_S = 600


def run_fs_suite(*, quick: bool, reps: int, scale: float, workdir: Path | None,
                 workloads: str | None = None) -> SuiteResult:
    """Measure in a private mount namespace; the rows of every system, or the reason it did not run."""
    if os.geteuid() != 0:
        return SuiteResult(SUITE, SYSTEMS, [], error="the filesystem suite needs root (mount, whiteouts, drop_caches)")
    if shutil.which("unshare") is None:
        return SuiteResult(SUITE, SYSTEMS, [], error="unshare(1) is not installed (util-linux)")
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="lamina-bench-fs-")) if workdir is None else workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)  # --fs-root may name a directory not made yet
    result_file = root / "result.json"
    result_file.unlink(missing_ok=True)
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "bench.fs",
            "--root", str(root), "--reps", str(reps), "--scale", str(QUICK_SCALE if quick else scale),
            "--out", str(result_file)]
    if workloads:
        argv += ["--workloads", workloads]
    log.info("filesystem suite: %s", " ".join(argv))
    progress = root / "progress.log"  # follow a long run with tail -f
    try:
        with open(progress, "w") as progress_out:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=progress_out)
        if not result_file.exists():
            tail = " | ".join(progress.read_text(errors="replace").strip().splitlines()[-4:])
            return SuiteResult(SUITE, SYSTEMS, [], error=f"the measuring process exited {done.returncode}: {tail}")
        return SuiteResult.from_json(json.loads(result_file.read_text()))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


class _WorkloadTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _WorkloadTimeout(f"took more than {WORKLOAD_TIMEOUT_S} s")


class _Recorder:
    """Samples and notes of every (system, metric); the rows at the end."""

    def __init__(self, manifest: Manifest, systems: list[str]) -> None:
        self.labels = row_labels(manifest)
        self.systems = systems
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.notes: dict[tuple[str, str], str] = {}
        self.rename_modes: dict[str, set[str]] = {}

    def metrics_of(self, workload: str) -> list[str]:
        return [metric for metric, owner, _ in self.labels if owner == workload]

    def record(self, system: str, workload: str, measured: Measured) -> None:
        for metric, seconds in measured.seconds.items():
            self.samples.setdefault((system, metric), []).append(seconds)
        for problem in measured.problems:
            for metric in self.metrics_of(workload):
                self.notes[(system, metric)] = f"wrong result: {problem}"
        if "mode" in measured.info:
            self.rename_modes.setdefault(system, set()).add(measured.info["mode"])

    def fail(self, system: str, metrics: list[str], error: str) -> None:
        for metric in metrics:
            self.notes.setdefault((system, metric), f"failed: {error[:300]}")

    def rows(self, measured_workloads: set[str]) -> list[Row]:
        rows = []
        for metric, workload, label in self.labels:
            if workload and workload not in measured_workloads:
                continue
            row = Row(SUITE, metric, label)
            for system in self.systems:
                for seconds in self.samples.get((system, metric), []):
                    row.add(system, seconds)
                note = self.notes.get((system, metric))
                if note:
                    row.note(system, note)
                elif not row.samples.get(system):
                    row.note(system, "failed: no measurement")
            rows.append(row)
        return rows


def _run_turn(mount: UnionMount, workload: Workload, manifest: Manifest) -> tuple[float, Measured]:
    """One system's turn at one workload: remount, drop caches, run with a deadline."""
    mount.unmount()
    mount_seconds = mount.mount()
    drop_caches()
    if workload.prepare:
        workload.prepare(manifest)
    signal.alarm(WORKLOAD_TIMEOUT_S)
    try:
        measured = workload.run(mount.mnt, manifest)
    finally:
        signal.alarm(0)
    os.sync()  # the next system does not pay for this one's writes
    return mount_seconds, measured


def _one_repetition(repetition: int, run_dir: Path, systems: dict[str, UnionSystem],
                    workloads: list[Workload], manifest: Manifest, recorder: _Recorder) -> None:
    names = list(systems)
    mounts = {name: UnionMount(system, run_dir / name, manifest.lowers()) for name, system in systems.items()}
    mount_seconds: dict[str, list[float]] = {name: [] for name in names}
    broken: dict[str, str] = {}
    try:
        for mount in mounts.values():
            mount.create()
        for index, workload in enumerate(workloads):
            start = (repetition + index) % len(names)
            for name in names[start:] + names[:start]:
                metrics = recorder.metrics_of(workload.name)
                if name in broken:
                    recorder.fail(name, metrics, f"not run: the mount failed earlier ({broken[name]})")
                    continue
                try:
                    seconds, measured = _run_turn(mounts[name], workload, manifest)
                except MountFailed as exc:
                    broken[name] = str(exc)[:200]
                    recorder.fail(name, [*metrics, "mount"], f"mount: {exc}")
                    continue
                except (OSError, subprocess.SubprocessError, _WorkloadTimeout) as exc:
                    recorder.fail(name, metrics, f"{workload.name}: {type(exc).__name__}: {exc}")
                    log.warning("%s %s: %s", workload.name, name, exc)
                    continue
                mount_seconds[name].append(seconds)
                recorder.record(name, workload.name, measured)
                log.info("rep %d %-12s %-15s %s%s", repetition + 1, workload.name, name,
                         " ".join(f"{k}={v:.4f}" for k, v in measured.seconds.items()),
                         f"  WRONG: {'; '.join(measured.problems)}" if measured.problems else "")
        for name, values in mount_seconds.items():
            if values:
                recorder.samples.setdefault((name, "mount"), []).append(statistics.median(values))
    finally:
        for mount in mounts.values():
            mount.remove()


def measure(root: Path, reps: int, scale: float, workload_names: list[str] | None) -> SuiteResult:
    """The whole suite, in this process (which must be in a private mount namespace, as root)."""
    manifest = open_image(root / "img", ImageParams.scaled(scale))
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    candidates = {s.name: s for s in (lamina_unionfs(), kernel_overlayfs(), fuse_overlayfs())}
    left_out: dict[str, str] = {}
    lamina_note = None
    for name, system in list(candidates.items()):
        reason = unavailable_reason(system, run_dir / "probe")
        if reason is None:
            continue
        if name == LAMINA:
            lamina_note = reason  # lamina stays in the table, its cells saying why they are empty
        else:
            left_out[name] = reason
        del candidates[name]
    workloads = [w for w in WORKLOADS if workload_names is None or w.name in workload_names]
    systems = [name for name in SYSTEMS if name in candidates or name == LAMINA]
    recorder = _Recorder(manifest, systems)
    if lamina_note:
        recorder.notes.update({(LAMINA, metric): lamina_note for metric, _, _ in recorder.labels})
    signal.signal(signal.SIGALRM, _on_alarm)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    try:
        if candidates:
            for repetition in range(reps):
                log.info("repetition %d of %d", repetition + 1, reps)
                _one_repetition(repetition, run_dir, candidates, workloads, manifest, recorder)
    finally:
        for leftover in sorted(mounts_under(run_dir), key=len, reverse=True):
            subprocess.run(["umount", "-l", leftover], capture_output=True, timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)
    details: dict[str, Any] = {
        "method": "per repetition a fresh upper; per workload the systems rotate; each turn remounts, "
                  "syncs and drops caches (cold); warm repeats at once; medians over repetitions",
        "reps": reps, "scale": scale, "image": manifest.summary(), "left_out": left_out,
        "rename_mode": {name: sorted(modes) for name, modes in recorder.rename_modes.items()},
        "load_start": load_start, "load_end": Path("/proc/loadavg").read_text().split()[:3],
        "commands": {name: " ".join(s.mount_argv([Path(layer) for layer in LAYERS_TOP_FIRST], Path("UPPER"),
                                                 Path("WORK"), Path("MNT")))
                     for name, s in candidates.items()},
    }
    error = None if len(systems) > 1 else "no competitor could mount here: " + "; ".join(left_out.values())
    return SuiteResult(SUITE, systems, recorder.rows({w.name for w in workloads}), details=details, error=error)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fs``: the measuring process (run_fs_suite starts it under unshare)."""
    parser = argparse.ArgumentParser(prog="python -m bench.fs", description=main.__doc__)
    parser.add_argument("--root", type=Path, required=True, help="image and mounts live here")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workloads", default=None, help=f"comma list of {','.join(w.name for w in WORKLOADS)}")
    parser.add_argument("--out", type=Path, required=True, help="the suite's result (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench.fs: %(message)s", stream=sys.stderr)
    names = [n.strip() for n in args.workloads.split(",")] if args.workloads else None
    unknown = set(names or []) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    os.umask(0o022)
    suite = measure(args.root.resolve(), args.reps, args.scale, names)
    args.out.write_text(json.dumps(suite.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
