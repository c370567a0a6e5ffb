"""The harness itself: the mount fixture's failure path, the unprivileged user, the CLI skeleton."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from harness import MountFailed, SessionMounts, force_unmount, fuse_mounts_under, is_mounted, start_union, union_argv


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


@pytest.mark.fuse
def test_the_session_sweep_unmounts_only_what_the_session_recorded(tmp_path: Path) -> None:
    """Another session's mount under /tmp, named as ours would be, survives our sweep; ours does not."""
    lower = tmp_path / "lower"
    lower.mkdir()
    foreign_base = Path(tempfile.mkdtemp(prefix="lamina-unpriv-", dir="/tmp"))  # as another session's
    session = SessionMounts()
    session.record(tmp_path / "ours")
    mounted = []
    try:
        for mountpoint in (tmp_path / "ours" / "mnt", foreign_base / "lamina-mnt"):
            argv = union_argv([lower], None, None, mountpoint)
            mounted.append(start_union(argv, mountpoint, tmp_path / f"{mountpoint.parent.name}.log"))
        assert session.sweep() == [tmp_path / "ours" / "mnt"]
        assert not is_mounted(tmp_path / "ours" / "mnt")
        assert is_mounted(foreign_base / "lamina-mnt")
    finally:
        for handle in mounted:
            handle.unmount()
        force_unmount(foreign_base / "lamina-mnt")
        shutil.rmtree(foreign_base, ignore_errors=True)


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
