"""``version``, ``info`` and ``system df``: docker's fields, filled with what is true here.

The host facts ``info`` reports are compared with podman's ``info`` on the same machine; the counts
with what ``ps`` and ``images`` list; ``system df`` has docker's four rows, each counting what it
says.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable

import pytest

Cli = Callable[..., "subprocess.CompletedProcess[str]"]
BASE = "lamina/busybox"


def info(lamina_cmd: Cli) -> dict:  # type: ignore[type-arg]
    return json.loads(lamina_cmd("info", "--format", "{{json .}}").stdout)  # type: ignore[no-any-return]


@pytest.mark.root
def test_info_host_facts_match_podmans(lamina_cmd: Cli) -> None:
    from test_store_interop import run_podman

    from bench.podman_env import PodmanUnavailable, open_podman_env

    ours = info(lamina_cmd)
    try:
        with open_podman_env(storage_driver="vfs") as env:
            theirs = json.loads(run_podman(env, "info", "--format", "json").stdout)["host"]
    except PodmanUnavailable as e:
        pytest.skip(f"podman cannot run here: {e}")
    assert ours["NCPU"] == theirs["cpus"] and ours["MemTotal"] == theirs["memTotal"]
    assert ours["KernelVersion"] == theirs["kernel"] and ours["OSType"] == theirs["os"]
    assert f"v{ours['CgroupVersion']}" == theirs["cgroupVersion"]
    assert ours["Architecture"] == platform.machine() and ours["Name"] == theirs["hostname"]


@pytest.mark.root
@pytest.mark.fuse
def test_info_counts_and_driver(lamina_cmd: Cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lamina_cmd("create", "--name", "made", BASE, "true")
    lamina_cmd("run", "--name", "ran", "--network=none", BASE, "true")
    data = info(lamina_cmd)
    assert (data["Containers"], data["ContainersRunning"], data["ContainersStopped"]) == (2, 0, 2)
    assert data["Images"] == len(lamina_cmd("images", "-q").stdout.split())
    assert data["Driver"] == "lamina-unionfs" and data["DockerRootDir"] == str(tmp_path / "lamina-root")
    assert ("name=rootless" in data["SecurityOptions"]) == (os.geteuid() != 0)
    text = lamina_cmd("info").stdout
    assert " Containers: 2\n  Running: 0\n  Paused: 0\n  Stopped: 2\n" in text
    assert " Storage Driver: lamina-unionfs\n" in text


@pytest.mark.unprivileged
def test_info_as_an_unprivileged_user_says_rootless(unpriv_nosubids: object) -> None:
    result = unpriv_nosubids.lamina("info", "--format", "{{json .}}")  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert "name=rootless" in json.loads(result.stdout)["SecurityOptions"]


def test_version_client_and_server(lamina_cmd: Cli) -> None:
    from lamina import __version__

    data = json.loads(lamina_cmd("version", "--format", "{{json .}}").stdout)
    assert data["Client"]["Version"] == data["Server"]["Version"] == __version__
    assert data["Server"]["KernelVersion"] == platform.release()
    assert lamina_cmd("version", "--format", "{{.Server.KernelVersion}}").stdout == platform.release() + "\n"
    text = lamina_cmd("version").stdout
    assert text.startswith("Client:\n Version:") and "\nServer: " in text


@pytest.mark.root
@pytest.mark.fuse
def test_system_df_has_dockers_rows_and_counts_them(lamina_cmd: Cli) -> None:
    def rows() -> dict[str, dict[str, str]]:
        lines = lamina_cmd("system", "df", "--format", "json").stdout.splitlines()
        return {row["Type"]: row for row in map(json.loads, lines)}

    before = rows()
    assert list(before) == ["Images", "Containers", "Local Volumes", "Build Cache"]
    assert before["Containers"]["TotalCount"] == "0" and before["Local Volumes"]["TotalCount"] == "0"
    lamina_cmd("run", "-d", "--name", "up", "-v", "/data", "--network=none", BASE, "sleep", "60")
    lamina_cmd("run", "--name", "down", "--network=none", BASE, "sh", "-c", "head -c 100000 /dev/zero > /big")
    try:
        after = rows()
        assert (after["Containers"]["TotalCount"], after["Containers"]["Active"]) == ("2", "1")
        assert after["Containers"]["Reclaimable"].endswith("%)")  # the stopped one's layer
        assert (after["Local Volumes"]["TotalCount"], after["Local Volumes"]["Active"]) == ("1", "1")
        assert after["Images"]["Active"] == "1"
        table = lamina_cmd("system", "df").stdout.splitlines()
        assert table[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
        assert [line.split("  ")[0] for line in table[1:]] == ["Images", "Containers", "Local Volumes",
                                                                "Build Cache"]
    finally:
        lamina_cmd("rm", "-f", "up", "down")
