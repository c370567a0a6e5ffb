"""Output formatting shared by every verb: docker's durations, tables and ``--format`` templates.

As docker/cli's formatter package, one place renders what every command prints, so ``lamina images``
and ``lamina ps`` read the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from lamina.errors import UsageError


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration: "Less than a second", "2 minutes", "About an hour", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def since(when: dt.datetime | None) -> str:
    if when is None:
        return "N/A"
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return human_duration((dt.datetime.now(dt.UTC) - when).total_seconds()) + " ago"


def print_table(rows: list[list[str]]) -> None:
    """Left-aligned columns separated by at least three spaces, like docker's tabwriter."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        print("   ".join(cells).rstrip())


_ACTION = re.compile(r"\{\{(.*?)\}\}")
_SUPPORTED_ACTION = re.compile(r"\s*(json\s+)?\.[A-Za-z0-9_.]*\s*")


def check_template(template: str) -> None:
    """UsageError for a ``--format`` template we cannot render: checked before any output, as Go's
    template.Parse does for docker (an unclosed ``{{`` is a parse error there too)."""
    for m in _ACTION.finditer(template):
        if not _SUPPORTED_ACTION.fullmatch(m.group(1)):
            raise UsageError(f"--format {template!r}: unsupported action {m.group(0)!r} "
                             "(lamina renders {{.Field}} and {{json .Field}})")
    if "{{" in _ACTION.sub("", template):  # a lone "}}" is text to Go, a lone "{{" an error
        raise UsageError(f"--format {template!r}: unclosed action")


def render_template(template: str, obj: Any) -> str:
    """A small subset of Go templates, enough for scripts: ``{{.A.B}}`` and ``{{json .A}}``."""
    check_template(template)
    def lookup(path: str) -> Any:
        value = obj
        for part in [p for p in path.split(".") if p]:
            if isinstance(value, dict):
                value = value.get(part)
            else:
                return None
        return value

    def substitute(m: re.Match[str]) -> str:
        expr = m.group(1).strip()
        as_json = expr.startswith("json ")
        value = lookup(expr[5:].strip() if as_json else expr)
        if as_json:
            return json.dumps(value)
        if value is None:
            return "<no value>"
        if isinstance(value, list):
            return "[" + " ".join(str(v) for v in value) + "]"
        if isinstance(value, dict):
            return "map[" + " ".join(f"{k}:{v}" for k, v in value.items()) + "]"
        return str(value)

    return _ACTION.sub(substitute, template).replace("\\n", "\n")
