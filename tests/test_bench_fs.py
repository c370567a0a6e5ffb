"""The filesystem benchmark's own parts: image parameters, answer checks, result round trip.

The whole suite runs (tiny) in tests/test_bench_quick.py; these check, without mounting anything,
that a workload reports a wrong answer as wrong and that the rows survive the trip from the
measuring process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import quick_problems
from bench.common import SuiteResult
from bench.fs import _Recorder
from bench.fs_image import ImageParams, Manifest, open_image
from bench.fs_workloads import Measured, find_files, unlink_lower_files, walk_and_stat


def _manifest(root: Path, **answers: Any) -> Manifest:
    defaults: dict[str, Any] = {"expected_files": 0, "expected_entries": 0, "bigdir_entries": 0, "big_size": 0, "tree_files": 0,
                "mvdir_files": 0, "tar_files": 0}
    defaults.update(answers)
    return Manifest(root=str(root), params=dataclasses.asdict(ImageParams()), tar_last="", **defaults)


def test_scaled_parameters_keep_every_count_positive() -> None:
    tiny = ImageParams.scaled(0.0001)
    assert tiny.tree_files == 1 and tiny.big_mib == 4 and tiny.small_max == ImageParams().small_max
    assert ImageParams.scaled(1.0) == ImageParams()


def test_a_listing_that_misses_a_file_is_a_wrong_result(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    right = _manifest(tmp_path, expected_files=2, expected_entries=3)
    assert find_files(tmp_path, right).problems == []
    assert walk_and_stat(tmp_path, right).problems == []
    wrong = _manifest(tmp_path, expected_files=3, expected_entries=4)
    assert "2 files (expected 3)" in find_files(tmp_path, wrong).problems[0]
    assert len(walk_and_stat(tmp_path, wrong).problems) == 2  # cold and warm


def test_an_unlink_that_leaves_the_file_is_a_wrong_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").write_text("x")
    monkeypatch.setattr(os, "unlink", lambda path: None)  # a union that says yes and does nothing
    measured = unlink_lower_files(tmp_path, _manifest(tmp_path, delete=["x"]))
    assert measured.problems == ["delete: 1 of 1 files still there"]


def test_rows_carry_wrong_results_through_json_to_the_quick_check(tmp_path: Path) -> None:
    recorder = _Recorder(_manifest(tmp_path, expected_files=5), ["lamina", "kernel"])
    recorder.record("kernel", "find", Measured({"find_cold": 0.1, "find_warm": 0.05}))
    recorder.record("lamina", "find", Measured({"find_cold": 0.1, "find_warm": 0.05}, ["find warm: 4 files"]))
    suite = SuiteResult("filesystem", ["lamina", "kernel"], recorder.rows({"find"}))
    again = SuiteResult.from_json(suite.to_json())
    assert [r.key for r in again.rows] == ["mount", "find_cold", "find_warm"]
    assert again.row("find_warm").notes["lamina"] == "wrong result: find warm: 4 files"  # type: ignore[union-attr]
    problems = quick_problems([again])
    assert "filesystem/find_cold/lamina: wrong result: find warm: 4 files" in problems
    assert any(p.startswith("filesystem/mount/kernel") for p in problems)  # no mount time: not measured


@pytest.mark.root
def test_image_model_counts_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    manifest = open_image(tmp_path / "img", ImageParams.scaled(0.01))
    layer2 = tmp_path / "img" / "layer2"
    whiteouts = [p for p in layer2.rglob("*") if p.is_char_device()]
    assert whiteouts and os.getxattr(layer2 / "opq", "trusted.overlay.opaque") == b"y"
    added = [p for p in (layer2 / "bigdir").iterdir() if p.is_file()]
    hidden = [p for p in whiteouts if p.parent.name == "bigdir"]
    assert manifest.bigdir_entries == len(os.listdir(tmp_path / "img" / "layer1" / "bigdir")) + len(added) - len(hidden)
    assert open_image(tmp_path / "img", ImageParams.scaled(0.01)) == manifest  # reused, not rebuilt
