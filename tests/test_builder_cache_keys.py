"""Cache keys two machines agree on: what a step's key depends on, and what it must not.

A shared cache (``--cache-from``) is only as good as its keys: a key that depends on the machine (the
store's path, the checkout's times, owners, inode numbers or directory sizes) misses on every other
runner, and a key that leaves out what a step reads gives another runner a stale layer. docker's
documented rule is the reference: file content and metadata count, modification times do not
(https://docs.docker.com/build/cache/invalidation/), and a ``RUN --mount=type=bind`` step is
invalidated by the files it mounts, as BuildKit checksums them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cache_config import CacheRecord, config_document, parse_config
from builder.context import BuildContext
from builder.dockerignore import IgnoreRules
from harness import REPO_ROOT
from lamina.errors import FormatError


def _tree(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "src" / "main.py").write_text("main\n")
    os.symlink("pkg/mod.py", root / "src" / "link")
    return root


def _digest(root: Path, stat_cache: Path) -> str:
    context = BuildContext(root, IgnoreRules.for_build(root, None), stat_cache)
    return context.digest(context.resolve("src"))


def test_context_digest_is_the_same_on_another_machine(tmp_path: Path) -> None:
    one = _tree(tmp_path / "one")
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two, symlinks=True)
    # Another checkout: other times, owners and inode numbers, and a directory grown then emptied
    # (ext4 keeps its size), with another store (another stat cache).
    for n in range(300):
        (two / "src" / "pkg" / f"scratch-{n:04d}-{'y' * 40}").write_text("")
    for n in range(300):
        (two / "src" / "pkg" / f"scratch-{n:04d}-{'y' * 40}").unlink()
    for path in [two, *two.rglob("*")]:
        os.utime(path, (1_234_567_890, 1_234_567_890), follow_symlinks=False)
        if os.geteuid() == 0:
            os.lchown(path, 4321, 4321)
    assert (one / "src" / "pkg").stat().st_size != (two / "src" / "pkg").stat().st_size
    assert _digest(one, tmp_path / "cache-1.json") == _digest(two, tmp_path / "cache-2.json")


def test_context_digest_follows_content_mode_and_names(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ctx")
    cache = tmp_path / "stat-cache.json"
    before = _digest(root, cache)
    (root / "src" / "main.py").write_text("main!\n")
    after_content = _digest(root, cache)
    os.chmod(root / "src" / "main.py", 0o755)
    after_mode = _digest(root, cache)
    os.rename(root / "src" / "main.py", root / "src" / "other.py")
    after_name = _digest(root, cache)
    assert len({before, after_content, after_mode, after_name}) == 4


def test_cache_metadata_round_trip_and_refusals() -> None:
    layer = {"diff_id": "sha256:" + "a" * 64, "digest": "sha256:" + "b" * 64, "size": 3,
             "media_type": "application/vnd.oci.image.layer.v1.tar+gzip"}
    records = [CacheRecord.from_entry("1" * 64, {"history": {"created_by": "RUN x", "created": "t"}, "layer": layer}, 9),
               CacheRecord.from_entry("2" * 64, {"history": {"created_by": "ENV a=b", "empty_layer": True},
                                                 "layer": None}, 0)]
    document = config_document(records)
    assert parse_config(document, "test") == records
    assert [r.entry() for r in parse_config(document, "test")] == [
        {"history": records[0].history, "layer": layer}, {"history": records[1].history, "layer": None}]
    hostile = [
        {**document, "records": [{"digest": "sha256:../../etc", "history": {}}]},
        {**document, "records": [{"digest": "sha256:" + "1" * 64, "history": {"x": "y"}}]},
        {**document, "records": [{"digest": "sha256:" + "1" * 64, "history": {}, "layer": 5}]},
        {**document, "layers": [{"blob": "sha256:" + "b" * 64,
                                 "annotations": {"mediaType": "text/html", "diffID": "sha256:" + "a" * 64, "size": 1}}]},
        {**document, "layers": [{"blob": "sha256:" + "b" * 64,
                                 "annotations": {"mediaType": layer["media_type"], "diffID": "md5:00", "size": 1}}]},
        [], b"{" * 10, b"x" * (5 << 20),
    ]
    for value in hostile:
        with pytest.raises(FormatError):
            parse_config(value, "hostile")


@pytest.mark.fuse
def test_run_bind_mount_content_is_in_the_key(tmp_path: Path) -> None:
    """A RUN reading a bind-mounted context file runs again when the file changes (BuildKit's rule)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN --mount=type=bind,source=input,target=/in cp /in /out\n")
    (ctx / "input").write_text("first\n")

    def lamina(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), *args],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return result.stdout

    lamina("build", "-t", "bind", str(ctx))
    (ctx / "input").write_text("second\n")
    rebuilt = lamina("build", "-t", "bind", str(ctx))
    assert "CACHED" not in rebuilt
    assert lamina("run", "--rm", "bind", "cat", "/out") == "second\n"
