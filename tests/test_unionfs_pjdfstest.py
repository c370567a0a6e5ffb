"""pjdfstest inside a lamina mount (allow_other, default_permissions, as root).

pjdfstest is not part of lamina and CI has no network to fetch it, so this runs only when
``PJDFSTEST_DIR`` points at a built pjdfstest (see bench/pjdfstest/run.sh for how to build one).
The kernel's overlayfs passes all of it on this machine; lamina must too. ``PJDFSTEST_TESTS``
("chmod rename/02.t") limits the run to some test directories or files.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_SH = REPO / "bench" / "pjdfstest" / "run.sh"
PJDFSTEST_DIR = os.environ.get("PJDFSTEST_DIR")

needs_pjdfstest = pytest.mark.skipif(
    not PJDFSTEST_DIR,
    reason="PJDFSTEST_DIR is not set (pjdfstest must be fetched and built outside the repository; "
           "see bench/pjdfstest/run.sh)")


def parse_summary(output: str, candidate: str) -> dict[str, int]:
    """The counts run.sh prints: ``CANDIDATE files=N tests=M failed_tests=F failed_files=K``."""
    m = re.search(rf"^{re.escape(candidate)} files=(\d+) tests=(\d+) failed_tests=(\d+) failed_files=(\d+)$",
                  output, re.M)
    assert m, f"no summary line for {candidate} in:\n{output[-3000:]}"
    files, tests, failed_tests, failed_files = map(int, m.groups())
    return {"files": files, "tests": tests, "failed_tests": failed_tests, "failed_files": failed_files}


def test_parse_summary() -> None:
    out = "results in /x\nlamina files=238 tests=8798 failed_tests=58 failed_files=13\n    tests/a/03.t\n"
    assert parse_summary(out, "lamina") == {"files": 238, "tests": 8798, "failed_tests": 58, "failed_files": 13}


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.slow
@needs_pjdfstest
def test_pjdfstest_in_lamina_mount(tmp_path: Path) -> None:
    assert PJDFSTEST_DIR is not None
    env = dict(os.environ, OUT=str(tmp_path / "results"), LAMINA_PYTHON=str(REPO / ".venv" / "bin" / "python"))
    if os.environ.get("PJDFSTEST_TESTS"):
        env["PJD_TESTS"] = os.environ["PJDFSTEST_TESTS"]
    proc = subprocess.run([str(RUN_SH), PJDFSTEST_DIR, "lamina"], capture_output=True, text=True,
                          env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = parse_summary(proc.stdout, "lamina")
    assert counts["tests"] > 0
    # "TODO passed" means lamina differs from what Linux filesystems do (the kernel shows none).
    assert counts["failed_tests"] == 0 and counts["failed_files"] == 0 and "TODO passed" not in proc.stdout, \
        proc.stdout
