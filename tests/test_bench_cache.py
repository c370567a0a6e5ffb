"""``python -m bench.cache`` must not rot: one tiny repetition measures every lamina row and
records the outcomes the target depends on (never judged as times here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_tiny_cache_bench_measures_every_row(tmp_path: Path) -> None:
    prefix = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "bench.cache", "--reps", "1", "--pause", "0", "--mib", "1",
                           "--no-podman", "--out", str(prefix), "--workdir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    document = json.loads(prefix.with_suffix(".json").read_text())
    medians = {row["key"]: row["median_s"].get("lamina") for row in document["rows"]}
    assert all(isinstance(value, float) and value > 0 for value in medians.values()), medians
    details = document["details"]
    assert details["lamina_warm_all_cached"] == [True] and details["lamina_same_image"] == [True]
    assert details["lamina_changed_steps_run"] == [4]
    assert document["target"]["verdict"] in ("met", "NOT met")
