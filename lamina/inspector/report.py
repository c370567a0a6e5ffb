"""What ``lamina layers`` prints beyond its table: file trees, wasted files, dive's CI verdict.

Plain arguments in, lines or JSON-ready data out; the verb parses flags and prints. Layer numbers
here are the CLI's: 1 for the base layer, up to the container layer when a container was named.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lamina.errors import LaminaError, UsageError
from lamina.inspector import trees, waste
from lamina.inspector.analysis import StackAnalysis
from lamina.inspector.render import human_size

EXIT_CHECK_FAILED = 1   # dive's CI mode exits 1 when a rule fails


class CheckFailed(LaminaError):
    """The image breaks a ``--fail-on-*`` limit (exit 1, as dive's CI mode)."""

    exit_code = EXIT_CHECK_FAILED


def parse_thresholds(fail_on_waste: str | None, fail_on_efficiency: str | None) -> waste.Thresholds:
    """``--fail-on-waste PERCENT`` (0..100, ``%`` allowed) and ``--fail-on-efficiency RATIO`` (0..1).

    Error handling: :class:`UsageError` naming the flag for a value that is not a number in range.
    """
    def number(flag: str, text: str, high: float) -> float:
        try:
            value = float(text.strip().removesuffix("%"))
        except ValueError:
            raise UsageError(f"{flag} {text}: not a number") from None
        if not (math.isfinite(value) and 0 <= value <= high):
            raise UsageError(f"{flag} {text}: must be between 0 and {high:g}")
        return value

    return waste.Thresholds(
        max_waste_percent=None if fail_on_waste is None else number("--fail-on-waste", fail_on_waste, 100),
        min_efficiency=None if fail_on_efficiency is None else number("--fail-on-efficiency",
                                                                        fail_on_efficiency, 1))


def layer_index(analysis: StackAnalysis, number: int) -> int:
    """The 0-based index of ``--layer NUMBER``; UsageError when there is no such layer."""
    if not 1 <= number <= len(analysis.layers):
        raise UsageError(f"--layer {number}: the stack has layers 1..{len(analysis.layers)}")
    return number - 1


def _heading(analysis: StackAnalysis, index: int, what: str) -> str:
    layer = analysis.layers[index]
    name = ("the container layer, " if layer is analysis.container_layer else "") + f"layer {index + 1}"
    return f"{name} of {len(analysis.layers)} ({what}): {layer.instruction or '(no history)'}"


def _tree_indexes(analysis: StackAnalysis, layer: int | None, changes_only: bool) -> list[int]:
    """``--layer N`` (1-based) as an index; without it the top layer, or every layer's changes."""
    if layer is not None:
        return [layer_index(analysis, layer)]
    return list(range(len(analysis.layers))) if changes_only else [len(analysis.layers) - 1]


def trees_and_waste(analysis: StackAnalysis, *, tree: bool, layer: int | None, changes_only: bool,
                    wasted: bool, as_json: bool) -> list[str]:
    """What ``--tree`` and ``--wasted`` print, as lines (JSON included)."""
    if as_json:
        data = {**({"trees": tree_data(analysis, layer, changes_only)} if tree else {}),
                **(waste_data(analysis) if wasted else {})}
        return json.dumps(data, indent=2).splitlines()
    return ((tree_lines(analysis, layer, changes_only) if tree else [])
            + (waste_lines(analysis) if wasted else []))


def tree_lines(analysis: StackAnalysis, layer: int | None, changes_only: bool) -> list[str]:
    """The tree of one layer (``layer`` 1-based; None: the top one, or every layer's changes)."""
    lines: list[str] = []
    nodes: list[trees.TreeNode] = []
    for index in _tree_indexes(analysis, layer, changes_only):
        root = trees.layer_tree(analysis, index, changes_only)
        nodes.extend(root.walk())
        what = "its changes" if changes_only else f"the merged view of layers 1..{index + 1}"
        lines.append(_heading(analysis, index, what))
        lines.extend(trees.render_tree(root) or ["  (no changes)"])
        lines.append("")
    lines.append("A added, M modified, D deleted; sizes are bytes of files and symlinks (directories: "
                 "what is below)")
    lines.extend(trees.legend(nodes))
    return lines


def tree_data(analysis: StackAnalysis, layer: int | None, changes_only: bool) -> list[dict[str, Any]]:
    return [{"layer": index + 1, "changes_only": changes_only,
             "tree": trees.tree_json(trees.layer_tree(analysis, index, changes_only))}
            for index in _tree_indexes(analysis, layer, changes_only)]


def dive_summary(score: waste.DiveScore) -> str:
    share = "n/a" if math.isinf(score.wasted_user_share) else f"{score.wasted_user_share * 100:.2f}%"
    return (f"dive's figures: efficiency {score.efficiency * 100:.4f}%, potential wasted space "
            f"{human_size(score.wasted_bytes)} ({share} of the {human_size(score.user_bytes)} above "
            f"the base layer)")


def waste_lines(analysis: StackAnalysis, limit: int = 50) -> list[str]:
    """Hidden files largest first, with the layers that added and hid them; then dive's list."""
    hidden = waste.hidden_files(analysis)
    lines = [f"{len(hidden)} hidden cop{'y' if len(hidden) == 1 else 'ies'} of files, "
             f"{human_size(analysis.wasted_bytes)} in all ({analysis.wasted_bytes} bytes):"]
    rows = [("SIZE", "ADDED BY", "HIDDEN BY", "HOW", "PATH")]
    rows += [(human_size(f.size), analysis.layer_name(f.added_by), analysis.layer_name(f.hidden_by), f.how, f.path)
             for f in hidden[:limit]]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  " + "  ".join([row[0].rjust(widths[0]), *(c.ljust(w) for c, w in
                                                                  zip(row[1:4], widths[1:], strict=True))])
                     + "  " + row[4])
    if len(hidden) > limit:
        lines.append(f"  ... and {len(hidden) - limit} more")
    score = waste.dive_score(analysis)
    lines += ["", dive_summary(score), "dive's inefficient paths (every copy counted, the shown one too):",
              "  COUNT  TOTAL SPACE  PATH"]
    lines += [f"  {d.count:>5}  {human_size(d.cumulative):>11}  {d.path}" for d in score.inefficiencies[:limit]]
    if len(score.inefficiencies) > limit:
        lines.append(f"  ... and {len(score.inefficiencies) - limit} more")
    return lines


def waste_data(analysis: StackAnalysis) -> dict[str, Any]:
    score = waste.dive_score(analysis)
    return {
        "hidden_files": [{"path": f.path, "size": f.size, "added_by": f.added_by + 1,
                          "hidden_by": f.hidden_by + 1, "how": f.how} for f in waste.hidden_files(analysis)],
        "wasted_bytes": analysis.wasted_bytes,
        "dive": dive_data(score),
    }


def dive_data(score: waste.DiveScore) -> dict[str, Any]:
    return {"efficiency": score.efficiency, "wasted_bytes": score.wasted_bytes, "size_bytes": score.size_bytes,
            "user_bytes": score.user_bytes,
            "wasted_user_share": None if math.isinf(score.wasted_user_share) else score.wasted_user_share,
            "inefficiencies": [{"path": d.path, "count": d.count, "total": d.cumulative}
                               for d in score.inefficiencies]}


def enforce(score: waste.DiveScore, limits: waste.Thresholds) -> None:
    """Raise :class:`CheckFailed` when the stack breaks a limit (after the report was printed)."""
    failures = waste.check(score, limits)
    if failures:
        raise CheckFailed("; ".join(failures))
