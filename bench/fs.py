"""Filesystem suite: lamina-unionfs against the kernel's overlayfs and fuse-overlayfs.

The measuring is done by the shared ``unionfs_bench.py`` (``../shared/tools`` beside the project,
or ``$LAMINA_UNIONFS_BENCH``), used as it is: it builds one synthetic three-layer image, runs every
workload on every candidate in a rotating (interleaved) order, each from a fresh mount with caches
dropped ("cold") and then again at once ("warm"), inside a private mount namespace, and writes a
JSON file. This module adds lamina as a candidate, runs it, and turns its JSON into :class:`Row`
objects; when lamina-unionfs is not installed yet its cells say so instead of holding numbers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import LAMINA, NOT_AVAILABLE, REPO_ROOT, Row, SuiteResult

log = logging.getLogger(__name__)

KERNEL = "kernel"
FUSE_OVERLAYFS = "fuse-overlayfs"
SYSTEMS = [LAMINA, KERNEL, FUSE_OVERLAYFS]
TOOL_ENV = "LAMINA_UNIONFS_BENCH"
QUICK_SCALE = 0.01


def shared_tool() -> Path | None:
    """Where the shared filesystem benchmark lives, or None."""
    configured = os.environ.get(TOOL_ENV)
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO_ROOT.parent / "shared" / "tools" / "unionfs_bench.py")
    return next((c for c in candidates if c.is_file()), None)


def unionfs_command() -> Path:
    """The lamina-unionfs entry point of the interpreter running us (the project's venv)."""
    beside = Path(sys.executable).parent / "lamina-unionfs"
    if beside.exists():
        return beside
    found = shutil.which("lamina-unionfs")
    return Path(found) if found else beside


def lamina_unionfs_status() -> str | None:
    """None when lamina-unionfs is installed, else a "not available: ..." note.

    (Whether it then mounts is the benchmark's business: a failed mount is a failure, not this.)
    """
    command = unionfs_command()
    if not command.exists():
        return f"{NOT_AVAILABLE}: {command} is not installed"
    done = subprocess.run([sys.executable, "-c", "import unionfs.cli"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"{NOT_AVAILABLE}: unionfs.cli does not import ({last[:120]})"
    return None


def lamina_mount_template(extra_options: str = "") -> str:
    options = "lowerdir={lower},upperdir={upper},workdir={work}" + extra_options
    return f"{unionfs_command()} -o {options} {{mnt}}"


def run_fs_suite(*, quick: bool, reps: int, scale: float, workdir: Path | None,
                 workloads: str | None = None) -> SuiteResult:
    """Run the shared tool with kernel, fuse-overlayfs and (if installed) lamina; rows of medians."""
    tool = shared_tool()
    if tool is None:
        return SuiteResult("filesystem", SYSTEMS, [], error=f"shared benchmark not found (set ${TOOL_ENV})")
    if os.geteuid() != 0:
        return SuiteResult("filesystem", SYSTEMS, [], error="the filesystem suite needs root (mount, drop_caches)")
    lamina_note = lamina_unionfs_status()
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="lamina-bench-fs-")) if workdir is None else workdir
    try:
        out_prefix = root / "results" / "run"
        argv = [sys.executable, str(tool), "--root", str(root), "--reps", str(reps),
                "--scale", str(QUICK_SCALE if quick else scale), "--builtins", f"{KERNEL},{FUSE_OVERLAYFS}",
                "--out", str(out_prefix)]
        if workloads:
            argv += ["--workloads", workloads]
        if lamina_note is None:
            argv += ["--candidate", f"{LAMINA}={lamina_mount_template()}", "--umount", f"{LAMINA}=fusermount3 -u {{mnt}}"]
        log.info("filesystem suite: %s", " ".join(argv))
        # The tool's progress goes to a file one can follow (tail -f) during a long run.
        progress = root / "progress.log"
        root.mkdir(parents=True, exist_ok=True)  # --fs-root may name a directory not made yet
        with open(progress, "w") as progress_file:
            done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=progress_file, text=True)
        log_lines = progress.read_text().strip().splitlines()
        result_file = out_prefix.with_suffix(".json")
        if not result_file.exists():
            tail = " | ".join(log_lines[-4:])
            return SuiteResult("filesystem", SYSTEMS, [], error=f"unionfs_bench.py exited {done.returncode}: {tail}")
        document = json.loads(result_file.read_text())
        suite = rows_from_tool(document, lamina_note)
        suite.details["tool_exit"] = done.returncode
        suite.details["tool_log"] = log_lines
        return suite
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def rows_from_tool(document: dict[str, Any], lamina_note: str | None) -> SuiteResult:
    raw: dict[str, dict[str, list[float | None]]] = document["raw_s"]
    notes: dict[tuple[str, str], str] = {}
    for error in document.get("errors", []):
        notes[(error["candidate"], error["workload"])] = f"failed: {error['error'][:200]}"
    for failure in document.get("check_failures", []):
        notes.setdefault((failure["candidate"], failure["workload"]), f"wrong result: {failure['check'][:200]}")
    rows = []
    for spec in document["rows"]:
        key = spec["key"]
        row = Row("filesystem", key, spec["label"])
        for system in SYSTEMS:
            if system == LAMINA and lamina_note is not None:
                row.note(system, lamina_note)
                continue
            for value in raw.get(system, {}).get(key, []):
                if value is not None:
                    row.add(system, value)
            workload = _workload_name(key)
            note = notes.get((system, workload))
            if note:
                row.note(system, note)
            elif not row.samples.get(system):
                row.note(system, "failed: no measurement")
        rows.append(row)
    modes: dict[str, list[str]] = {}
    for system, infos in document.get("info", {}).items():
        modes[system] = sorted({i["mode"] for i in infos if "mode" in i})
    meta = document.get("meta", {})
    details = {"rename_mode": modes, "params": meta.get("params"), "reps": meta.get("reps"),
               "status": meta.get("status"), "load_start": meta.get("load_start"), "load_end": meta.get("load_end"),
               "candidates": meta.get("candidates"), "lingering_servers": meta.get("lingering_servers"),
               "daemon_cpu_s": {s: [i.get("daemon_cpu_s") for i in infos if "daemon_cpu_s" in i]
                                for s, infos in document.get("info", {}).items()}}
    return SuiteResult("filesystem", SYSTEMS, rows, details=details)


# The tool names its metrics after the workload that produced them, with a few exceptions.
_METRIC_WORKLOAD = {"rename_dir": "rename", "copyup_small": "copyup_small", "copyup_large": "copyup_large",
                    "copyup_large_sync": "copyup_large", "seqwrite_sync": "seqwrite"}


def _workload_name(metric: str) -> str:
    if metric in _METRIC_WORKLOAD:
        return _METRIC_WORKLOAD[metric]
    return metric.split("_")[0]
