"""Health checks: the image's HEALTHCHECK or ``--health-*``, run by the container's monitor.

The configuration is docker's (``Test``: ``["CMD", ...]``, ``["CMD-SHELL", "cmd"]`` or ``["NONE"]``;
``Interval``, ``Timeout``, ``StartPeriod`` in nanoseconds; ``Retries``). While the container runs,
its monitor runs the test every interval as ``lamina exec`` would, each with the timeout, and
keeps docker's ``State.Health`` (``starting``, ``healthy``, ``unhealthy``; the failing streak; the
last five results) in ``health.json`` beside the container's record: a file of its own, so the
checks never race the monitor's writes of the record. A failure during the start period does not
count against the retries, as in docker.

Resource handling: :func:`health_checks` runs the checks in a thread for the duration of a
``with`` block and stops it (and a check still running) when the block ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lamina.errors import UsageError
from lamina.layout import Layout

log = logging.getLogger(__name__)

HEALTH_FILE = "health.json"
DEFAULT_INTERVAL_NS = 30_000_000_000
DEFAULT_TIMEOUT_NS = 30_000_000_000
DEFAULT_RETRIES = 3
KEPT_RESULTS = 5
MAX_OUTPUT = 4096  # docker keeps at most 4 KiB of a check's output

STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"


def merge_config(image: dict[str, Any] | None, cmd: str | None, interval: float | None, timeout: float | None,
                 retries: int | None, start_period: float | None, disabled: bool) -> dict[str, Any] | None:
    """The container's check: the image's, with each ``--health-*`` flag replacing its field;
    None when there is none (or ``--no-healthcheck``)."""
    flags = (cmd, interval, timeout, retries, start_period)
    if disabled:
        if any(f is not None for f in flags):
            raise UsageError("--no-healthcheck conflicts with --health-* options")
        return None
    config = dict(image or {})
    if cmd is not None:
        config["Test"] = ["CMD-SHELL", cmd]
    for key, seconds in (("Interval", interval), ("Timeout", timeout), ("StartPeriod", start_period)):
        if seconds is not None:
            if 0 < seconds < 0.001:
                raise UsageError(f"--health-{key.lower()}: must be at least 1ms")
            config[key] = int(seconds * 1e9)
    if retries is not None:
        if retries < 0:
            raise UsageError("--health-retries cannot be negative")
        config["Retries"] = retries
    test = config.get("Test")
    if not isinstance(test, list) or not test or test[0] == "NONE":
        return None
    return config


def check_argv(config: dict[str, Any]) -> list[str]:
    test = [str(t) for t in config["Test"]]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(test[1:])]
    return test[1:] if test[0] == "CMD" else test


def read_health(directory: Path) -> dict[str, Any] | None:
    try:
        with open(directory / HEALTH_FILE, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_health(directory: Path, health: dict[str, Any]) -> None:
    tmp = directory / f".{HEALTH_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(health))
    os.replace(tmp, directory / HEALTH_FILE)


def next_health(health: dict[str, Any], code: int, in_start_period: bool, retries: int) -> dict[str, Any]:
    """docker's transition after one result (0 passes; anything else fails)."""
    health = dict(health)
    if code == 0:
        health["Status"], health["FailingStreak"] = HEALTHY, 0
    elif not in_start_period or health.get("Status") != STARTING:
        health["FailingStreak"] = int(health.get("FailingStreak", 0)) + 1
        if health["FailingStreak"] >= max(retries, 1):
            health["Status"] = UNHEALTHY
    return health


class _Checker:
    def __init__(self, layout: Layout, container_id: str, directory: Path, config: dict[str, Any]) -> None:
        self.layout, self.container_id, self.directory, self.config = layout, container_id, directory, config
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        interval = (self.config.get("Interval") or DEFAULT_INTERVAL_NS) / 1e9
        timeout = (self.config.get("Timeout") or DEFAULT_TIMEOUT_NS) / 1e9
        start_period = (self.config.get("StartPeriod") or 0) / 1e9
        retries = int(self.config.get("Retries") or DEFAULT_RETRIES)
        health: dict[str, Any] = {"Status": STARTING, "FailingStreak": 0, "Log": []}
        _write_health(self.directory, health)
        while not self.stop.wait(interval):
            result = self._probe(timeout)
            if self.stop.is_set():
                return
            in_start = time.monotonic() - self.started < start_period
            health = next_health(health, result["ExitCode"], in_start, retries)
            health["Log"] = [*health.get("Log", []), result][-KEPT_RESULTS:]
            with contextlib.suppress(OSError):
                _write_health(self.directory, health)

    def _probe(self, timeout: float) -> dict[str, Any]:
        from runner.state import now

        start = now()
        argv = [sys.executable, "-m", "lamina", "--root", str(self.layout.root), "exec", self.container_id,
                *check_argv(self.config)]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            code, output = done.returncode, (done.stdout + done.stderr)[:MAX_OUTPUT].decode(errors="replace")
        except subprocess.TimeoutExpired:
            code, output = -1, f"Health check exceeded timeout ({timeout:g}s)"
        except OSError as e:
            code, output = -1, f"cannot run the health check: {e.strerror}"
        return {"Start": start, "End": now(), "ExitCode": code, "Output": output}


@contextlib.contextmanager
def health_checks(layout: Layout, container_id: str, directory: Path,
                  config: dict[str, Any] | None) -> Iterator[None]:
    """Run the checks (none when ``config`` is None) while the block runs."""
    if config is None:
        yield
        return
    checker = _Checker(layout, container_id, directory, config)
    thread = threading.Thread(target=checker.run, name="health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        checker.stop.set()
        thread.join(timeout=5)
