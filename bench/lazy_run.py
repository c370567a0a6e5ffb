"""The run rows of ``python -m bench.lazy``: containers run from the image, lazily or after a pull.

``run --rm REF cat FILE`` of the eStargz image from an empty store: lazily with the background fill
off (the registry bytes are then what the run itself needs), again with it on, then until the fill
has made the image an ordinary one; against ``lamina pull`` of the gzip image + the same run, and
``podman pull`` + ``podman run`` of the eStargz image. :func:`run_rounds` gives the rounds that
:func:`bench.lazy.run` interleaves with its own; :func:`run_summary` the lines comparing them with
issue 19's targets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO_ROOT, SuiteResult, timed
from bench.lamina_cli import lamina_command
from bench.lazy import LAZY, PODMAN, PULL, Measure, lamina
from bench.podman_env import PodmanEnv


def lamina_env(root: Path, *args: str, env: dict[str, str] | None = None) -> None:
    timed([*lamina_command(), "--root", str(root), *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})})


def wait_filled(root: Path, ref: str, timeout: float = 600) -> None:
    """Until the lazy image ``ref`` in ``root`` is an ordinary image (its background fill is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, done = timed([*lamina_command(), "--root", str(root), "inspect", ref], cwd=REPO_ROOT)
        if "Lazy" not in json.loads(done.stdout)[0]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{ref} was not filled within {timeout} s")


def lazy_run_round(m: Measure, work: Path, esgz_ref: str, small_file: str) -> None:
    """``run --rm REF cat FILE`` from an empty store: once with the background fill off (the bytes
    are what the run itself needs), once with it on, then until the fill has made the image whole."""
    command = ["run", "--rm", "--network=none", esgz_ref, "cat", f"/{small_file}"]
    m.step("run", "run --rm REF cat FILE (lazy: fill off; pull: pull + run)", LAZY,
           lambda: lamina_env(work / "run-root", *command, env={"LAMINA_LAZY_FILL": "0"}))
    filled_root = work / "fill-root"
    m.step("run-fill", "the same run, background fill on", LAZY, lambda: lamina_env(filled_root, *command))
    m.step("filled", "then until the image is whole (an ordinary image)", LAZY,
           lambda: wait_filled(filled_root, esgz_ref))


def pull_run_round(m: Measure, work: Path, ref: str, small_file: str) -> None:
    root = work / "pull-run-root"

    def pull_and_run() -> None:
        lamina(root, "pull", "-q", ref)
        lamina(root, "run", "--rm", "--network=none", ref, "cat", f"/{small_file}")

    m.step("run", "", PULL, pull_and_run)


def podman_run_round(m: Measure, podman: PodmanEnv, esgz_ref: str, small_file: str) -> None:
    def pull_and_run() -> None:
        podman.run(["pull", "--tls-verify=false", "-q", esgz_ref])
        podman.run(["run", "--rm", "--network=none", esgz_ref, "cat", f"/{small_file}"])

    try:
        m.step("run", "", PODMAN, pull_and_run)
    finally:
        podman.run(["rmi", "-f", esgz_ref], check=False)


def run_rounds(m: Measure, esgz_ref: str, gzip_ref: str, small_file: str,
               podman: PodmanEnv | None) -> list[Callable[[Path], None]]:
    """The rounds of the run rows (see :func:`lazy_run_round`), for :func:`run` to interleave."""
    rounds: list[Callable[[Path], None]] = [
        lambda w: lazy_run_round(m, w, esgz_ref, small_file),
        lambda w: pull_run_round(m, w, gzip_ref, small_file)]
    if podman is not None:
        rounds.append(lambda w: podman_run_round(m, podman, esgz_ref, small_file))
    return rounds


def run_summary(suite: SuiteResult) -> list[str]:
    """The run rows against the issue's targets: lazy run / (pull + run), in time and in bytes."""
    row = next((r for r in suite.rows if r.key == "run"), None)
    per_system = suite.details["bytes_from_registry"].get("run", {})
    if row is None or LAZY not in per_system or PULL not in per_system:
        return []
    ratio = row.ratio(LAZY, PULL)
    lazy_bytes = sorted(per_system[LAZY])[len(per_system[LAZY]) // 2]
    pull_bytes = sorted(per_system[PULL])[len(per_system[PULL]) // 2]
    return ["", f"Lazy run / (pull + run): time {'—' if ratio is None else f'{ratio:.2f}'} "
                f"(target ≤ 0.20), registry bytes {lazy_bytes / max(pull_bytes, 1):.3f} (target ≤ 0.15)."]
