"""Preparing an upper directory for export as a layer (no mount needed)."""

from __future__ import annotations

from pathlib import Path

from unionfs.core.stack import LayerStack


def flatten_redirects(lowers: LayerStack, upper: Path, work: Path) -> int:
    """Make ``upper`` self-contained: every directory renamed with a redirect xattr gets a full copy
    of what it shows (then it is opaque and has no redirect), so a layer tar can express it.

    Run it while the union is NOT mounted (it uses the same workdir). Returns how many directories were flattened (0: the upper was left untouched).
    """
    from unionfs.core import UnionFS

    fs = UnionFS([str(p) for p in lowers.top_down()], str(upper), str(work))
    try:
        return fs.flatten_redirects()
    finally:
        fs.close()
