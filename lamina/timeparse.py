"""Times and durations in the forms docker's Go code writes and reads, for every package.

Image configs and container records carry RFC 3339 times that Go writes with nanoseconds; Dockerfile
options (``HEALTHCHECK --interval``) and ``logs --since`` take Go durations. Kept free of heavy
imports: the runner's command line imports it at start.
"""

from __future__ import annotations

import datetime as dt
import re

_FRACTION_BEYOND_MICROSECONDS = re.compile(r"(\.\d{6})\d+")
# Go's time.ParseDuration units; "µs" (micro sign) and "μs" (Greek mu) are both accepted there.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
                     "m": 60_000_000_000, "h": 3_600_000_000_000}


def parse_time(text: str | None) -> dt.datetime | None:
    """An RFC 3339 time as Go or Python wrote it; None when missing or unreadable."""
    if not text:
        return None
    try:
        # Go writes nanoseconds; Python parses at most microseconds.
        return dt.datetime.fromisoformat(_FRACTION_BEYOND_MICROSECONDS.sub(r"\1", text.replace("Z", "+00:00")))
    except ValueError:
        return None


def parse_go_duration(text: str) -> int:
    """A Go duration without a sign (``30s``, ``1m30s``, ``500ms``, ``0``) in nanoseconds;
    ValueError otherwise."""
    if text == "0":
        return 0
    if not text:
        raise ValueError(text)
    pos = 0
    total = 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(text)
        total += float(m.group(1)) * _DURATION_UNIT_NS[m.group(2)]
        pos = m.end()
    return int(total)
