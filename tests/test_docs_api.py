"""Every ```python block of docs/api.md runs, in order, in one namespace (as the page says)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text())


def test_the_page_has_examples() -> None:
    assert len(blocks()) >= 6


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="the examples mount a union: needs /dev/fuse and fusermount3")
def test_api_examples_run() -> None:
    namespace: dict[str, object] = {"__name__": "docs_api"}
    output = io.StringIO()
    try:
        for number, code in enumerate(blocks(), 1):
            with contextlib.redirect_stdout(output):
                exec(compile(code, f"{DOC}:block {number}", "exec"), namespace)
    finally:
        workdir = namespace.get("workdir")
        if isinstance(workdir, Path):
            shutil.rmtree(workdir, ignore_errors=True)
    assert "top-level directory: /srv" in output.getvalue()
