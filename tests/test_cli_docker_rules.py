"""docker-compatible behaviours that podman's system tests (test/system, v4.3.1) found missing, each
checked against podman on the same store contents where podman gives docker's answer, and against
docker's own code otherwise (moby's ``filters.Args.Match``, its daemon's resource checks).

The bats suite itself runs from tests/test_outside_podman_bats.py (opt-in)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_interop import podman, run_podman

from runner_support import Lamina, lamina_on_root

pytestmark = [pytest.mark.root, pytest.mark.fuse]

__all__ = ["podman"]

IMAGE = "lamina/busybox"
VOLUMES = ("volume_1_x9", "volume_2_x9", "other")
# Each filter list with the volumes docker lists for it: values of one key are alternatives, a
# name is a regular expression found anywhere in the name (moby volume/service/convert.go).
NAME_FILTERS: list[tuple[list[str], list[str]]] = [
    (["name=volume_1.+"], ["volume_1_x9"]),
    (["name=volume_1*"], ["volume_1_x9", "volume_2_x9"]),  # a regex, not a glob: "volume_" matches
    (["name=^oth"], ["other"]),
    (["name=x9$"], ["volume_1_x9", "volume_2_x9"]),
    (["name=other", "name=_2_"], ["other", "volume_2_x9"]),
    (["name=_1_", "label=nosuch"], []),
]


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docker-rules") / "root"


@pytest.fixture
def lamina(lamina_cmd: Lamina, module_root: Path) -> Iterator[Lamina]:
    yield from lamina_on_root(lamina_cmd, module_root, remove_volumes=True)


def _names(lamina: Lamina, *filters: str) -> list[str]:
    args = [a for f in filters for a in ("--filter", f)]
    r = lamina("volume", "ls", "-q", *args)
    assert r.returncode == 0, r.stderr
    return sorted(r.stdout.split())


def test_volume_name_filter_is_a_regular_expression(lamina: Lamina) -> None:
    for name in VOLUMES:
        assert lamina("volume", "create", name).returncode == 0
    for filters, expected in NAME_FILTERS:
        assert _names(lamina, *filters) == expected, filters
    # docker skips a pattern that does not compile: only an equal name matches it.
    assert _names(lamina, "name=[") == []
    assert lamina("volume", "create", "[").returncode == 1  # not a valid volume name, as docker


@pytest.mark.slow
def test_volume_name_filter_as_podman(lamina: Lamina, podman: object) -> None:
    for name in VOLUMES:
        assert lamina("volume", "create", name).returncode == 0
        run_podman(podman, "volume", "create", name)
    try:
        for filters, _ in NAME_FILTERS[:5]:
            args = [a for f in filters for a in ("--filter", f)]
            theirs = sorted(run_podman(podman, "volume", "ls", "-q", *args).stdout.decode().split())
            assert _names(lamina, *filters) == theirs, filters
    finally:
        run_podman(podman, "volume", "rm", *VOLUMES, check=False)


def test_ps_name_filter_that_does_not_compile_lists_nothing(lamina: Lamina) -> None:
    assert lamina("create", "--name", "c-one", IMAGE, "true").returncode == 0
    r = lamina("ps", "-a", "--format", "{{.Names}}", "--filter", "name=[")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = lamina("ps", "-a", "--format", "{{.Names}}", "--filter", "name=[", "--filter", "name=^c-o")
    assert (r.returncode, r.stdout) == (0, "c-one\n"), r.stderr


def test_zero_memory_and_cpus_mean_no_limit(lamina: Lamina) -> None:
    """docker's daemon checks the 6MB minimum and the CPU range only for a non-zero value: 0 is
    the default, no limit (podman's bats: "podman run --memory=0 runtime option")."""
    r = lamina("run", "--name", "unlimited", "--memory=0", "--cpus", "0", IMAGE, "echo", "hello")
    assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    assert "WARNING" not in r.stderr  # nothing asked of a cgroup
    host = json.loads(lamina("inspect", "unlimited").stdout)[0]["HostConfig"]
    assert (host["Memory"], host["NanoCpus"]) == (0, 0)
    r = lamina("run", "--rm", "--memory", "1k", IMAGE, "true")
    assert r.returncode == 125 and "minimum memory limit allowed is 6MB" in r.stderr
    r = lamina("run", "--rm", "--cpus", "-1", IMAGE, "true")
    assert r.returncode == 125 and "range of CPUs is from 0.01" in r.stderr
