"""kill -9 in the middle of `lamina load` and of a layer commit (`lamina import`): the store must
still check clean, show no half-written blob, layer or image, and the next command must work."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import REPO_ROOT

Cli = Callable[..., subprocess.CompletedProcess[str]]
FILES = 800
STAGES = ["temp-file", "blob", "layer"]


def big_rootfs_tar(path: Path) -> Path:
    """~12 MB that does not compress, plus many small files, so every stage takes a while."""
    rng = os.urandom
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"data/blob{i}")
            info.size = 4 << 20
            tar.addfile(info, io.BytesIO(rng(info.size)))
        for i in range(FILES):
            info = tarfile.TarInfo(f"many/f{i:05d}")
            data = f"file {i}\n".encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def stage_reached(root: Path, stage: str, baseline: dict[str, int]) -> bool:
    tmp = list((root / "tmp").iterdir()) if (root / "tmp").exists() else []
    if stage == "temp-file":
        return bool(tmp)
    if stage == "blob":
        return len(list((root / "blobs/sha256").iterdir())) > baseline["blobs"]
    if stage == "layer":
        return len(list((root / "layers").iterdir())) > baseline["layers"]
    raise AssertionError(stage)


def count(root: Path) -> dict[str, int]:
    return {"blobs": len(list((root / "blobs/sha256").iterdir())) if (root / "blobs/sha256").exists() else 0,
            "layers": len(list((root / "layers").iterdir())) if (root / "layers").exists() else 0}


def kill_at(argv: list[str], root: Path, stage: str) -> bool:
    """Run ``argv``, SIGKILL it as soon as ``stage`` is visible; False if it finished first."""
    baseline = count(root)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if stage_reached(root, stage, baseline):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def lamina_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


def assert_consistent(lamina_cmd: Cli, root: Path, name: str) -> None:
    check = lamina_cmd("system", "check", root=root, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = lamina_cmd("images", "--format", "json", root=root).stdout
    # Either the whole image is there (and its layer is complete) or no trace of it is visible.
    if name in listed:
        inspect = lamina_cmd("inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", name, root=root)
        layer = Path(inspect.stdout.strip().split(":")[0])
        assert len(list((layer / "many").iterdir())) == FILES


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_rootfs_tar(tmp_path_factory.mktemp("crash") / "big.tar")


@pytest.fixture(scope="module")
def big_archive(big_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("crash-archive")
    run = [sys.executable, "-m", "lamina", "--root", str(work / "source")]
    subprocess.run([*run, "import", str(big_tar), "big:1"], check=True, capture_output=True, cwd=REPO_ROOT)
    subprocess.run([*run, "save", "-o", str(work / "big-archive.tar"), "big:1"], check=True,
                   capture_output=True, cwd=REPO_ROOT)
    return work / "big-archive.tar"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_during_load(lamina_cmd: Cli, tmp_path: Path, stage: str, big_archive: Path) -> None:
    root = tmp_path / "victim"
    lamina_cmd("images", root=root)  # create the layout so the baseline counts are taken
    killed = kill_at(lamina_argv(root, "load", "-i", str(big_archive)), root, stage)
    assert killed, f"load finished before stage {stage}"
    assert_consistent(lamina_cmd, root, "big:1")
    assert not list((root / "tmp").iterdir()), "stale temporary files are cleaned by check"
    lamina_cmd("load", "-i", str(big_archive), root=root)
    assert_consistent(lamina_cmd, root, "big:1")
    assert "big" in lamina_cmd("images", root=root).stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_during_layer_commit(lamina_cmd: Cli, tmp_path: Path, stage: str, big_tar: Path) -> None:
    root = tmp_path / "victim"
    lamina_cmd("images", root=root)  # create the layout so the baseline counts are taken
    killed = kill_at(lamina_argv(root, "import", str(big_tar), "big:1"), root, stage)
    assert killed, f"import finished before stage {stage}"
    assert_consistent(lamina_cmd, root, "big:1")
    lamina_cmd("import", str(big_tar), "big:1", root=root)
    assert_consistent(lamina_cmd, root, "big:1")
    lamina_cmd("system", "prune", root=root)
    assert count(root)["layers"] == 1, "prune removes what the killed run left unreferenced"
