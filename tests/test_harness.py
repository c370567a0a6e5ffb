"""The harness itself: the mount fixture's failure path, the unprivileged user, the CLI skeleton."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness import MountFailed, fuse_mounts_under, start_union, union_argv


@pytest.mark.fuse
def test_mount_failure_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    # A lowerdir that does not exist: the server must exit, and the harness must say why.
    argv = union_argv([tmp_path / "missing"], None, None, tmp_path / "mnt")
    with pytest.raises(MountFailed):
        start_union(argv, tmp_path / "mnt", tmp_path / "err.log", deadline_s=10)
    assert fuse_mounts_under(tmp_path) == []


@pytest.mark.fuse
def test_mount_deadline_kills_a_server_that_never_mounts(tmp_path: Path) -> None:
    # A "server" that never mounts: the deadline must pass, and the process must be gone after.
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(MountFailed, match="not ready"):
        start_union(argv, tmp_path / "mnt", tmp_path / "err.log", deadline_s=0.5)
    assert fuse_mounts_under(tmp_path) == []


def test_cli_version_and_usage_errors(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    assert "lamina version" in lamina_cmd("--version").stdout
    bad = lamina_cmd("--no-such-flag", check=False)
    assert bad.returncode == 125
    assert bad.stderr.startswith("lamina: error:")
    assert "--no-such-flag" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.unprivileged
def test_unprivileged_user_is_really_unprivileged(unpriv) -> None:  # type: ignore[no-untyped-def]
    ident = unpriv.run(["id", "-u"], check=True).stdout.strip()
    assert ident == str(unpriv.uid) != "0"
    assert os.stat("/dev/fuse").st_mode & 0o666 == 0o666
    has_range = any(line.startswith(unpriv.user + ":") for line in open("/etc/subuid"))
    assert has_range == unpriv.has_subids
    assert "lamina version" in unpriv.lamina("--version", check=True).stdout
