"""The benchmark suite must not rot: `python -m bench --quick` runs every benchmark at a tiny size.

These tests check that each benchmark ran and produced numbers (or, for a lamina piece that is
not installed, says "not available"); they never judge a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import quick_problems
from bench.common import Row, SuiteResult, markdown_table

REPO_ROOT = Path(__file__).resolve().parent.parent


# Both groups need nothing beside the project: the filesystem suite builds its own image.
GROUPS = {"filesystem": ("fs", {"filesystem"}), "containers": ("build,run,store", {"build", "run", "store"})}


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_quick_run_measures_every_benchmark(tmp_path: Path, group: str) -> None:
    only, expected = GROUPS[group]
    prefix = tmp_path / "quick"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", only, "--out", str(prefix)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    document = json.loads(prefix.with_suffix(".json").read_text())
    assert document["stamp"]["commit"] and document["stamp"]["kernel"] and document["stamp"]["cpu"]
    suites = {suite["name"]: suite for suite in document["suites"]}
    assert set(suites) == expected
    for suite in suites.values():
        assert suite["error"] is None, suite["name"]
        assert suite["rows"], suite["name"]
        assert any(not s.startswith("lamina") for s in suite["systems"]), f"{suite['name']}: no competitor"
        for row in suite["rows"]:
            for system in suite["systems"]:
                median = row["median_s"].get(system)
                where = f"{suite['name']}/{row['key']}/{system}"
                if median is None:
                    assert system.startswith("lamina"), f"{where}: {row['notes'].get(system)}"
                    assert row["notes"][system].startswith("not available"), f"{where}: {row['notes'][system]}"
                else:
                    assert median > 0, where
    markdown = prefix.with_suffix(".md").read_text()
    for title in expected:
        assert f"## {title}" in markdown


def _suite(lamina_note: str | None) -> SuiteResult:
    row = Row("run", "run_none", "run --rm BASE true")
    row.add("podman root/overlay", 0.2)
    row.add("podman root/overlay", 0.4)
    if lamina_note is None:
        row.add("lamina", 0.1)
    else:
        row.note("lamina", lamina_note)
    return SuiteResult("run", ["lamina", "podman root/overlay"], [row])


def test_ratio_is_lamina_over_competitor_median() -> None:
    suite = _suite(None)
    assert suite.rows[0].ratio("lamina", "podman root/overlay") == pytest.approx(0.1 / 0.3)
    assert "0.33" in markdown_table(suite)


def test_quick_accepts_a_lamina_piece_that_is_not_available() -> None:
    suite = _suite("not available: `lamina run` exits 125")
    assert quick_problems([suite]) == []
    assert "n/a [1]" in markdown_table(suite)


def test_quick_rejects_a_failed_or_missing_measurement() -> None:
    assert quick_problems([_suite("failed: exited 1")])
    no_competitor_number = _suite(None)
    no_competitor_number.rows[0].samples.pop("podman root/overlay")
    assert quick_problems([no_competitor_number])
    assert quick_problems([SuiteResult("build", ["lamina"], [], error="podman missing")])
    wrong = _suite(None)
    wrong.rows[0].note("lamina", "wrong result: find cold: 203 files (expected 204)")
    assert quick_problems([wrong])


@pytest.mark.root
@pytest.mark.slow
def test_podman_env_runs_rootless_and_leaves_nothing(tmp_path: Path) -> None:
    from bench.containers import make_busybox_tarball
    from bench.podman_env import ensure_bench_user, open_podman_env

    user = ensure_bench_user()
    with open_podman_env(storage_driver="vfs", user=user) as podman:
        tarball = make_busybox_tarball(podman.base / "rootfs.tar")
        podman.chown_for_user(tarball)
        podman.run(["import", str(tarball), "localhost/bench-test:latest"])
        done = podman.run(["run", "--rm", "--network", "none", "localhost/bench-test:latest", "id", "-u"])
        assert done.stdout.decode().strip() == "0"  # root in the container, user outside
        info = podman.run(["info", "--format", "{{.Host.Security.Rootless}} {{.Store.GraphRoot}}"])
        rootless, graphroot = info.stdout.decode().split()
        assert rootless == "true" and graphroot == str(podman.graphroot)
        base, runroot = podman.base, podman.runroot
        pause_pids = podman._pause_pids()
    assert not base.exists() and not runroot.exists()
    for pid in pause_pids:
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
