"""``top``, ``rename``, ``pause`` and ``unpause`` as docker has them."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest
from test_runner_cli import lamina, module_root

pytestmark = [pytest.mark.root, pytest.mark.fuse]

__all__ = ["lamina", "module_root"]  # fixtures shared with other modules

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
IMAGE = "lamina/busybox"
# The count is replaced by a rename: `echo > FILE` truncates first, and a reader in between saw ''.
TICKER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done"


def process_states(pids: list[int]) -> set[str]:
    states = set()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            states.add(f.read().rsplit(")", 1)[1].split()[0])
    return states


def test_top_lists_the_container_processes_only(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "topped", IMAGE, "sh", "-c", "sleep 61 & exec sleep 62").returncode == 0
    time.sleep(0.3)
    r = lamina("top", "topped")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["UID", "PID", "PPID"]  # ps -ef, as docker's default
    assert sorted(line.split()[-1] for line in lines[1:]) == ["61", "62"]
    r = lamina("top", "topped", "-o", "pid,args")
    assert [line.split()[1:] for line in r.stdout.splitlines()[1:]] in (
        [["sleep", "61"], ["sleep", "62"]], [["sleep", "62"], ["sleep", "61"]])
    pid = int(r.stdout.splitlines()[1].split()[0])
    assert open(f"/proc/{pid}/cmdline").read().startswith("sleep")  # host pids, as docker's
    r = lamina("top", "topped", "-o", "comm")
    assert r.returncode == 1 and "Couldn't find PID field in ps output" in r.stderr
    assert lamina("stop", "-t", "0", "topped").returncode == 0
    r = lamina("top", "topped")
    assert r.returncode == 1 and "is not running" in r.stderr


def test_rename_running_and_stopped(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "first", IMAGE, "sleep", "60").returncode == 0
    assert lamina("create", "--name", "other", IMAGE, "true").returncode == 0
    assert lamina("rename", "first", "second").returncode == 0
    assert lamina("exec", "second", "true").returncode == 0
    r = lamina("rename", "second", "other")
    assert r.returncode == 1 and 'The container name "/other" is already in use' in r.stderr
    r = lamina("rename", "second", "../bad")
    assert r.returncode == 1 and "Invalid container name (../bad)" in r.stderr
    # the monitor records the exit under the new name
    assert lamina("stop", "-t", "0", "second").returncode == 0
    names = lamina("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert "second" in names and "first" not in names
    assert lamina("rename", "other", "first").returncode == 0  # the old name is free again
    assert lamina("start", "-a", "first").returncode == 0


def test_pause_holds_every_process_until_unpause(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "ticker", IMAGE, "sh", "-c", TICKER).returncode == 0
    time.sleep(0.3)
    assert lamina("pause", "ticker").stdout == "ticker\n"
    pids = [int(line.split()[1]) for line in lamina("top", "ticker").stdout.splitlines()[1:]]
    # A child that exited just before its parent stopped stays a zombie (nobody runs to reap it),
    # under docker's freezer too; every other process is stopped.
    held = {"T", "t", "Z"}
    assert pids and process_states(pids) <= held and process_states(pids) & {"T", "t"}
    time.sleep(0.2)
    assert process_states(pids) <= held  # and they stay so
    assert "(Paused)" in lamina("ps").stdout
    state = json.loads(lamina("inspect", "ticker").stdout)[0]["State"]
    assert (state["Status"], state["Paused"], state["Running"]) == ("paused", True, True)
    r = lamina("exec", "ticker", "true")
    assert r.returncode != 0 and "unpause the container before exec" in r.stderr
    r = lamina("pause", "ticker")
    assert r.returncode == 1 and "is already paused" in r.stderr
    assert lamina("unpause", "ticker").returncode == 0
    before = int(lamina("exec", "ticker", "cat", "/tmp/count").stdout)
    time.sleep(0.5)
    assert int(lamina("exec", "ticker", "cat", "/tmp/count").stdout) > before  # it runs again
    r = lamina("unpause", "ticker")
    assert r.returncode == 1 and "is not paused" in r.stderr
    assert lamina("pause", "ticker").returncode == 0
    assert lamina("stop", "-t", "1", "ticker").returncode == 0  # a paused container can be stopped
    r = lamina("pause", "ticker")
    assert r.returncode == 1 and "is not running" in r.stderr
