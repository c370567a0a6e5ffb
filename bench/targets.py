"""The speed targets of issues 3 and 8, checked against one run's medians: met, not met, or not measured."""

from __future__ import annotations

from typing import Any

from bench.common import LAMINA, SuiteResult

FUSE_OVERLAYFS = "fuse-overlayfs"
# Workloads where lamina must take at most half of fuse-overlayfs's time; every other: at most equal.
HALF_TIME_WORKLOADS = {"readdir_cold": 0.5, "untar": 0.5, "delete": 0.5}
MOUNT_READY_S = 0.15
CACHED_REBUILD_S = 0.5
RUN_S = 0.2
PODMAN_ROOT_PREFERENCE = ("podman root/overlay", "podman root/vfs")


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _missing(suite: SuiteResult, key: str, system: str) -> str:
    row = suite.row(key)
    note = row.notes.get(system) if row else None
    return f"not measured ({(note or 'no row').split(':')[0]})"


def filesystem_targets(suite: SuiteResult) -> list[dict[str, Any]]:
    out = []
    for row in suite.rows:
        if row.key == "mount":
            median = row.median(LAMINA)
            out.append({"target": f"fs: mount ready <= {MOUNT_READY_S} s",
                        "measured": f"{median:.3f} s" if median is not None else "—",
                        "verdict": _verdict(median <= MOUNT_READY_S) if median is not None
                        else _missing(suite, row.key, LAMINA)})
        limit = HALF_TIME_WORKLOADS.get(row.key, 1.0)
        ratio = row.ratio(LAMINA, FUSE_OVERLAYFS)
        out.append({"target": f"fs: {row.key} lamina / fuse-overlayfs <= {limit}",
                    "measured": f"{ratio:.2f}" if ratio is not None else "—",
                    "verdict": _verdict(ratio <= limit) if ratio is not None else _missing(suite, row.key, LAMINA)})
    modes = suite.details.get("rename_mode", {}).get(LAMINA)
    if modes:
        out.append({"target": "fs: lower-directory rename without copying its files",
                    "measured": ", ".join(modes), "verdict": _verdict(modes == ["rename(2)"])})
    return out


def build_targets(suite: SuiteResult) -> list[dict[str, Any]]:
    out = []
    reference = next((s for s in PODMAN_ROOT_PREFERENCE if s in suite.systems), None)
    for mine in (s for s in suite.systems if s.startswith(LAMINA)):
        for row in suite.rows:
            if row.key.endswith("_cold") and reference:
                ratio = row.ratio(mine, reference)
                out.append({"target": f"build: {row.key} {mine} / {reference} <= 1.0",
                            "measured": f"{ratio:.2f}" if ratio is not None else "—",
                            "verdict": _verdict(ratio <= 1.0) if ratio is not None
                            else _missing(suite, row.key, mine if row.median(mine) is None else reference)})
            if row.key.endswith("_cached"):
                median = row.median(mine)
                out.append({"target": f"build: {row.key} {mine} <= {CACHED_REBUILD_S} s",
                            "measured": f"{median:.3f} s" if median is not None else "—",
                            "verdict": _verdict(median <= CACHED_REBUILD_S) if median is not None
                            else _missing(suite, row.key, mine)})
    return out


def run_targets(suite: SuiteResult) -> list[dict[str, Any]]:
    out = []
    for mine in (s for s in suite.systems if s.startswith(LAMINA)):
        for row in suite.rows:
            if not row.key.startswith("run_"):
                continue
            median = row.median(mine)
            out.append({"target": f"run: {row.key} {mine} median <= {RUN_S} s",
                        "measured": f"{median:.3f} s" if median is not None else "—",
                        "verdict": _verdict(median <= RUN_S) if median is not None else _missing(suite, row.key, mine)})
    return out


def evaluate_targets(suites: list[SuiteResult]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for suite in suites:
        if suite.error:
            continue
        if suite.name == "filesystem":
            out += filesystem_targets(suite)
        elif suite.name == "build":
            out += build_targets(suite)
        elif suite.name == "run":
            out += run_targets(suite)
    return out
