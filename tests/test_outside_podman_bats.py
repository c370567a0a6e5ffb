"""podman's own system tests (github containers/podman v4.3.1, ``test/system``) against lamina:
opt-in, as every outside suite (docs/outside-suites.md).

``LAMINA_PODMAN_BATS`` names the suite's ``test/system`` directory, unpacked outside the
repository::

    git -C PODMAN_CLONE archive v4.3.1 test/system | tar -x -C /work/ext-suites/podman-v4.3.1
    LAMINA_PODMAN_BATS=/work/ext-suites/podman-v4.3.1/test/system pytest tests/test_outside_podman_bats.py

The run goes through bench/outside/podman_bats.sh (lamina only) on the files named in
tests/podman_bats_expected.txt, which lists the tests lamina passes today: any of them failing is a
regression. A passing test missing from the list is reported, not failed (add it to the list).

A bats test that fails can leave a container, a ``logs -f`` or a FUSE mount behind, and a run cut
short (timeout, ^C) leaves more: whatever happens, the test removes the run's containers, ends the
processes that name its directory and unmounts what is mounted under it, then checks nothing is
left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "outside" / "podman_bats.sh"
EXPECTED = Path(__file__).with_name("podman_bats_expected.txt")
SYSTEM_DIR = os.environ.get("LAMINA_PODMAN_BATS")
RUN_TIMEOUT = 3600

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

needs_suite = pytest.mark.skipif(
    not SYSTEM_DIR or shutil.which("bats") is None,
    reason="LAMINA_PODMAN_BATS is not set to podman v4.3.1's test/system (unpacked outside the "
           "repository; see docs/outside-suites.md), or bats is not installed")


def read_expected(path: Path = EXPECTED) -> dict[str, list[str]]:
    """``FILE.bats: TEST NAME`` lines (``#`` comments): the names lamina must pass, by file."""
    expected: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file_name, sep, name = line.partition(": ")
        assert sep and file_name.endswith(".bats"), f"{path.name}: malformed line {line!r}"
        expected.setdefault(file_name, []).append(name.strip())
    return expected


def parse_tap(text: str) -> dict[str, str]:
    """bats' TAP output: test name -> "pass", "fail" or "skip"."""
    results: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(ok|not ok) \d+ (.*)$", line)
        if not m:
            continue
        name, skipped = m.group(2), False
        if " # skip" in name:
            name, skipped = name.split(" # skip", 1)[0], True
        results[name.strip()] = "skip" if skipped else ("pass" if m.group(1) == "ok" else "fail")
    return results


def _processes_naming(directory: Path) -> list[int]:
    """Processes (not this one) whose command line mentions ``directory``: the run's lamina and
    unionfs processes, a monitor, a ``logs -f`` a test left in the background."""
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def clean_up_run(out: Path) -> list[str]:
    """Remove what a run in ``out`` left; return what was found (empty after a clean run)."""
    left: list[str] = []
    root = out / "lamina-root"
    if root.is_dir():
        lamina = [sys.executable, "-m", "lamina", "--root", str(root)]
        ids = subprocess.run([*lamina, "ps", "-aq"], capture_output=True, text=True, cwd=REPO,
                             timeout=120).stdout.split()
        if ids:
            left.append(f"containers {' '.join(ids)}")
            subprocess.run([*lamina, "rm", "-f", *ids], capture_output=True, cwd=REPO, timeout=300)
    killed = _processes_naming(out)
    for pid in killed:
        left.append(f"process {pid}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while killed and time.monotonic() < deadline:  # gone, or a zombie (no command line any more)
        killed = [pid for pid in killed if pid in _processes_naming(out)]
        time.sleep(0.1)
    for point in _mounts_under(out):
        left.append(f"mount {point}")
        if subprocess.run(["fusermount3", "-u", point], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    return left


def start_run(out: Path, files: list[str]) -> subprocess.Popen[str]:
    """podman_bats.sh for lamina alone, in a process group of its own (to end it as a whole)."""
    assert SYSTEM_DIR is not None
    env = dict(os.environ, OUT=str(out), CANDIDATES="lamina", LAMINA_PYTHON=sys.executable)
    return subprocess.Popen([str(SCRIPT), SYSTEM_DIR, *files], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def end_run(proc: subprocess.Popen[str], out: Path) -> list[str]:
    """End the run's process group if it still runs, then clean up after it."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    return clean_up_run(out)


def test_expected_list_and_tap_parser() -> None:
    expected = read_expected()
    assert expected and all(names for names in expected.values())
    names = [n for ns in expected.values() for n in ns]
    assert len(names) == len(set(names)), "a test is listed twice"
    tap = "1..3\nok 1 podman run --rm\nnot ok 2 podman ps - basic tests\nok 3 x # skip [rootful] no\n"
    assert parse_tap(tap) == {"podman run --rm": "pass", "podman ps - basic tests": "fail", "x": "skip"}


@needs_suite
def test_lamina_keeps_passing_podman_system_tests(tmp_path: Path) -> None:
    expected = read_expected()
    out = tmp_path / "run"
    proc = start_run(out, sorted(expected))
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        left = end_run(proc, out)
    results = parse_tap((out / "lamina.tap").read_text())
    regressed = [f"{file_name}: {name} ({results.get(name, 'not run')})"
                 for file_name, names in expected.items() for name in names if results.get(name) != "pass"]
    listed = {n for ns in expected.values() for n in ns}
    newly = sorted(n for n, r in results.items() if r == "pass" and n not in listed)
    if newly:
        print("passing but not in tests/podman_bats_expected.txt:\n  " + "\n  ".join(newly))
    assert not regressed, "podman system tests lamina passed before and fails now:\n" + "\n".join(regressed)
    assert left == [], f"the run left {left} (podman_bats.sh must clean up after itself)"
    assert re.search(r"^podman-bats lamina pass=\d+", output, re.M), output[-2000:]


@needs_suite
def test_a_run_cut_short_leaves_nothing(tmp_path: Path) -> None:
    """Cut the run while a test's container runs (055-rm starts several); nothing may stay."""
    out = tmp_path / "cut"
    proc = start_run(out, ["055-rm.bats"])
    try:
        deadline = time.monotonic() + 600
        root = out / "lamina-root" / "containers"
        while time.monotonic() < deadline and proc.poll() is None:
            if root.is_dir() and any(root.glob("*/container.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before any container was made"
    finally:
        end_run(proc, out)
    assert _processes_naming(out) == [] and _mounts_under(out) == []
    assert clean_up_run(out) == []
