"""Suites written by others, run against a lamina mount (opt-in; see docs/outside-suites.md).

None of these suites is part of lamina and CI has no network to fetch them, so each test runs only
when an environment variable names a checkout made outside the repository, and is skipped with the
reason otherwise:

- ``UNIONMOUNT_TESTSUITE_DIR``: github amir73il/unionmount-testsuite (no build needed);
- ``FUSE_OVERLAYFS_TESTS_DIR``: the ``tests/`` directory of github containers/fuse-overlayfs;
- ``XFSTESTS_DIR``: github kdave/xfstests with fsx and fsstress built by
  bench/outside/build_fsx_fsstress.sh (into ``XFSTESTS_DIR/ltp-lamina``).

Each test runs the matching script under bench/outside/ for lamina (and, where lamina is judged
against it, the kernel's overlayfs) and fails when lamina fails anything the suite checks.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = REPO / "bench" / "outside"
UNIONMOUNT_DIR = os.environ.get("UNIONMOUNT_TESTSUITE_DIR")
FUSE_OVERLAYFS_TESTS_DIR = os.environ.get("FUSE_OVERLAYFS_TESTS_DIR")
XFSTESTS_DIR = os.environ.get("XFSTESTS_DIR")
XFSTESTS_BIN = Path(XFSTESTS_DIR) / "ltp-lamina" if XFSTESTS_DIR else None

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

needs_unionmount = pytest.mark.skipif(
    not UNIONMOUNT_DIR,
    reason="UNIONMOUNT_TESTSUITE_DIR is not set (clone github amir73il/unionmount-testsuite outside "
           "the repository; see bench/outside/unionmount.sh)")
needs_fuse_overlayfs_tests = pytest.mark.skipif(
    not FUSE_OVERLAYFS_TESTS_DIR,
    reason="FUSE_OVERLAYFS_TESTS_DIR is not set (the tests/ directory of a clone of github "
           "containers/fuse-overlayfs, outside the repository; see bench/outside/fuse_overlayfs_tests.sh)")
needs_xfstests = pytest.mark.skipif(
    XFSTESTS_BIN is None or not (XFSTESTS_BIN / "fsx").exists() or not (XFSTESTS_BIN / "fsstress").exists(),
    reason="XFSTESTS_DIR is not set or has no ltp-lamina/fsx and fsstress (clone github kdave/xfstests "
           "outside the repository and run bench/outside/build_fsx_fsstress.sh on it)")


def run_script(script: str, *args: str, out: Path, timeout: float) -> str:
    env = dict(os.environ, OUT=str(out), LAMINA_PYTHON=str(REPO / ".venv" / "bin" / "python"))
    proc = subprocess.run([str(OUTSIDE / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed to run:\n{proc.stderr[-3000:]}"
    return proc.stdout


def parse_counts(output: str, prefix: str) -> dict[str, str]:
    """The ``PREFIX key=value ...`` summary line a bench/outside script prints for one candidate."""
    m = re.search(rf"^{re.escape(prefix)} (.*)$", output, re.M)
    assert m, f"no summary line {prefix!r} in:\n{output[-3000:]}"
    return dict(re.findall(r"(\w+)=(\S+)", m.group(1)))


def failed_names(output: str, prefix: str) -> set[str]:
    """The names listed (indented, ``NAME: reason``) under the summary line starting with prefix."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(prefix + " "))
    names = set()
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        names.add(line.strip().split(":", 1)[0])
    return names


def test_parse_counts_and_failures() -> None:
    out = ("results in /x\nunionmount lamina tests=58 passed=56 failed=2\n    open-trunc: size wrong\n"
           "    sym1-trunc: size\nunionmount lamina+xdev tests=55 passed=55 failed=0\n")
    assert parse_counts(out, "unionmount lamina") == {"tests": "58", "passed": "56", "failed": "2"}
    assert failed_names(out, "unionmount lamina") == {"open-trunc", "sym1-trunc"}
    assert failed_names(out, "unionmount lamina+xdev") == set()
    with pytest.raises(AssertionError):
        parse_counts(out, "unionmount kernel")


@needs_unionmount
def test_unionmount_testsuite_all_58(tmp_path: Path) -> None:
    assert UNIONMOUNT_DIR is not None
    out = run_script("unionmount.sh", UNIONMOUNT_DIR, "lamina", out=tmp_path, timeout=3600)
    counts = parse_counts(out, "unionmount lamina")
    # UNIONMOUNT_TESTS (passed on to the script) may ask for fewer.
    assert counts["tests"] == ("58" if not os.environ.get("UNIONMOUNT_TESTS") else counts["tests"]), out
    assert counts["passed"] == counts["tests"], out


@needs_unionmount
def test_unionmount_testsuite_xdev_all_but_rename_exdev(tmp_path: Path) -> None:
    """With --xdev the suite expects EXDEV from renaming a lower directory (overlayfs without
    redirect_dir); lamina renames it, a documented difference (docs/outside-suites.md)."""
    assert UNIONMOUNT_DIR is not None
    out = run_script("unionmount.sh", "--xdev", UNIONMOUNT_DIR, "lamina", out=tmp_path, timeout=3600)
    counts = parse_counts(out, "unionmount lamina+xdev")
    assert counts["tests"] == ("55" if not os.environ.get("UNIONMOUNT_TESTS") else counts["tests"]), out
    assert failed_names(out, "unionmount lamina+xdev") <= {"rename-exdev"}, out


@needs_fuse_overlayfs_tests
def test_fuse_overlayfs_scripts(tmp_path: Path) -> None:
    assert FUSE_OVERLAYFS_TESTS_DIR is not None
    out = run_script("fuse_overlayfs_tests.sh", FUSE_OVERLAYFS_TESTS_DIR, "lamina", out=tmp_path,
                     timeout=7200)
    counts = parse_counts(out, "fuse-overlayfs-tests lamina")
    assert int(counts["scripts"]) > 0 and counts["failed"] == "0", out


@needs_xfstests
def test_fsx(tmp_path: Path) -> None:
    """fsx on a lower file and a new file, several seeds, plus O_DIRECT; the kernel's overlayfs runs
    first so that an operation it supports and lamina refuses counts as a failure."""
    out = run_script("fsx.sh", str(XFSTESTS_BIN), "kernel", "lamina", out=tmp_path, timeout=7200)
    counts = parse_counts(out, "fsx lamina")
    assert int(counts["runs"]) > 0 and counts["failed"] == "0" and "missing" not in counts, out


@needs_xfstests
def test_fsstress_then_the_kernel_sees_the_same_tree(tmp_path: Path) -> None:
    out = run_script("fsstress.sh", str(XFSTESTS_BIN), "lamina", out=tmp_path, timeout=3600)
    counts = parse_counts(out, "fsstress lamina")
    assert int(counts["entries"]) > 1, out
    assert counts["differences"] == "0" and counts.get("exit", "0") == "0", out
