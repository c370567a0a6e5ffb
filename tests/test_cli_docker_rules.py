"""docker-compatible behaviours that podman's system tests (test/system, v4.3.1) found missing, each
checked against podman on the same store contents where podman gives docker's answer, and against
docker's own code otherwise (moby's ``filters.Args.Match``, its daemon's resource checks).

The bats suite itself runs from tests/test_outside_podman_bats.py (opt-in)."""

from __future__ import annotations

import json
import os
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


def test_tmpfs_and_bind_volumes_of_the_local_driver(lamina: Lamina, tmp_path: Path) -> None:
    """docker's documented example (``docker volume create``: "The built-in local driver on Linux
    accepts options similar to the linux mount command") and the checks of its local driver."""
    options = ["-o", "type=tmpfs", "-o", "device=tmpfs", "-o", "o=size=100m,uid=1000"]
    assert lamina("volume", "create", *options, "tv").stdout == "tv\n"
    inspected = json.loads(lamina("volume", "inspect", "tv").stdout)[0]
    assert inspected["Options"] == {"type": "tmpfs", "device": "tmpfs", "o": "size=100m,uid=1000"}
    r = lamina("run", "--rm", "-v", "tv:/vol", IMAGE, "sh", "-c",
               "stat -f -c %T /vol; stat -c %u /vol; df -k /vol | tail -1; echo kept > /vol/f")
    fs_type, owner, df_line, *_ = r.stdout.splitlines()
    assert (r.returncode, fs_type, owner, df_line.split()[1]) == (0, "tmpfs", "1000", "102400"), r.stderr
    # A tmpfs volume is filled from the image like any empty volume, and is gone once unused.
    r = lamina("run", "--rm", "-v", "tv:/etc", IMAGE, "sh", "-c", "stat -f -c %T /etc; head -1 /etc/passwd")
    assert r.stdout == "tmpfs\nroot:x:0:0:root:/root:/bin/sh\n", r.stderr
    r = lamina("run", "--rm", "-v", "tv:/vol:ro", IMAGE, "sh", "-c", "ls /vol; touch /vol/x")
    assert r.returncode != 0 and r.stdout == "" and "Read-only file system" in r.stderr
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "f").write_text("from the host\n")
    bind = ["-o", "type=none", "-o", "o=bind", "-o", f"device={host}"]
    assert lamina("volume", "create", *bind, "bv").returncode == 0
    r = lamina("run", "--rm", "-v", "bv:/b", IMAGE, "sh", "-c", "cat /b/f; echo back > /b/g")
    assert r.stdout == "from the host\n" and (host / "g").read_text() == "back\n", r.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["-o", "foo=bar"], 'create bad: invalid option: "foo"'),
    (["-o", "type=tmpfs"], 'create bad: missing required option: "device"'),
    (["-o", "o=size=1m", "-o", "device=tmpfs"], 'create bad: missing required option: "type"'),
    (["-o", "type=tmpfs", "-o", "device=tmpfs", "-o", "size=1g"], "quota size requested but no quota support"),
    (["-o", "type=nfs", "-o", "device=:/export"], "rootless engine mounts only type=tmpfs"),
    (["-o", "type=none", "-o", "o=bind", "-o", "device=relative"], "absolute host path"),
])
def test_volume_options_refused_as_docker(lamina: Lamina, options: list[str], message: str) -> None:
    r = lamina("volume", "create", *options, "bad")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert lamina("volume", "ls", "-q").stdout == ""


@pytest.mark.slow
def test_tmpfs_volume_as_podman(lamina: Lamina, podman: object, tmp_path: Path) -> None:
    """podman's bats "podman volume type=tmpfs", with the image's content as well."""
    archive = tmp_path / "base.tar"
    assert lamina("save", "-o", str(archive), IMAGE).returncode == 0
    run_podman(podman, "load", "-i", str(archive))
    create = ["volume", "create", "-o", "type=tmpfs", "-o", "device=tmpfs", "tmpvol"]
    script = "stat -f -c %T /etc; ls /etc | head -3"
    assert lamina(*create).returncode == 0
    mine = lamina("run", "--rm", "-v", "tmpvol:/etc", IMAGE, "sh", "-c", script).stdout
    run_podman(podman, *create)
    try:
        theirs = run_podman(podman, "run", "--rm", "-v", "tmpvol:/etc", f"localhost/{IMAGE}",
                            "sh", "-c", script).stdout.decode()
    finally:
        run_podman(podman, "volume", "rm", "-f", "tmpvol", check=False)
    assert mine == theirs and mine.startswith("tmpfs\n")


# docker's MaskedPaths (moby oci/defaults.go): empty read-only directories, /dev/null for files.
MASKED = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
STAT = "stat -c %n:%F:%h:%t:%T"


@pytest.mark.parametrize("network", ["slirp4netns", "host"])  # sysfs of its own, or the host's bound
def test_sensitive_paths_are_masked_as_docker(lamina: Lamina, network: str) -> None:
    present = [p for p in MASKED if os.path.lexists(p)]
    if "/sys/firmware" not in present:
        pytest.skip("this host has no /sys/firmware")
    r = lamina("run", "--rm", "--network", network, IMAGE, "sh", "-c", f"{STAT} /dev/null {' '.join(present)}")
    lines = r.stdout.splitlines()
    devnull = lines[0].split(":", 1)[1]
    for line in lines[1:]:
        path, kind = line.split(":")[:2]
        if kind == "directory":
            shown = lamina("run", "--rm", "--network", network, IMAGE, "ls", "-A", path).stdout
            assert shown == "", path
        else:
            assert line.split(":", 1)[1] == devnull, line
    assert len(lines) == len(present) + 1, r.stderr  # every one is still there, masked
    # --privileged unmasks them (docker: "systempaths=unconfined" as well).
    r = lamina("run", "--rm", "--privileged", "--network", network, IMAGE, "ls", "/sys/firmware")
    assert r.stdout.split() == sorted(os.listdir("/sys/firmware")), r.stderr


@pytest.mark.slow
def test_sensitive_paths_are_masked_as_podman(lamina: Lamina, podman: object, tmp_path: Path) -> None:
    """podman masks docker's list (and more): the same answers for docker's list."""
    present = " ".join(p for p in MASKED if os.path.lexists(p))
    archive = tmp_path / "base.tar"
    assert lamina("save", "-o", str(archive), IMAGE).returncode == 0
    run_podman(podman, "load", "-i", str(archive))
    script = f"{STAT} /dev/null {present}; ls -A /sys/firmware /proc/acpi 2>&1"
    mine = lamina("run", "--rm", IMAGE, "sh", "-c", script).stdout
    theirs = run_podman(podman, "run", "--rm", f"localhost/{IMAGE}", "sh", "-c", script).stdout.decode()
    assert mine == theirs


def _ipc_ns(lamina: Lamina, *args: str) -> str:
    r = lamina("run", "--rm", *args, IMAGE, "readlink", "/proc/self/ns/ipc")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_ipc_modes_as_docker(lamina: Lamina) -> None:
    """docker run --ipc (docs "IPC settings"): "" and private a namespace of its own, none the same
    without /dev/shm, host the host's, container:NAME a shareable container's (podman's bats
    190-run-ipcns checks the same relations)."""
    host = os.readlink("/proc/self/ns/ipc")
    # (A namespace's number is used again once it is gone: only running containers are compared.)
    assert host not in (_ipc_ns(lamina), _ipc_ns(lamina, "--ipc", "private"))
    assert _ipc_ns(lamina, "--ipc=host") == host
    assert _ipc_ns(lamina, "--ipc=none") != host
    r = lamina("run", "--rm", "--ipc=none", IMAGE, "ls", "/dev/shm")
    assert r.returncode == 1 and "/dev/shm: No such file or directory" in r.stderr
    r = lamina("run", "--rm", "--ipc=host", IMAGE, "stat", "-c", "%i", "/dev/shm")
    assert r.stdout.strip() == str(os.stat("/dev/shm").st_ino), r.stderr
    assert lamina("run", "-d", "--ipc=shareable", "--name", "donor", IMAGE, "sleep", "60").returncode == 0
    assert lamina("run", "-d", "--name", "private", IMAGE, "sleep", "60").returncode == 0
    donor = lamina("exec", "donor", "readlink", "/proc/self/ns/ipc").stdout.strip()
    private = lamina("exec", "private", "readlink", "/proc/self/ns/ipc").stdout.strip()
    assert donor not in (host, "", private) and private != host
    assert _ipc_ns(lamina, "--ipc=container:donor") == donor
    r = lamina("run", "--rm", "--ipc=container:private", IMAGE, "true")
    assert r.returncode == 125 and "non-shareable IPC (hint: use IpcMode:shareable for the donor container)" in r.stderr
    modes = lamina("inspect", "--format", "{{.HostConfig.IpcMode}}", "donor", "private").stdout.split()
    assert modes == ["shareable", "private"]
    r = lamina("run", "--rm", "--ipc=bogus", IMAGE, "true")
    assert r.returncode == 125 and "--ipc bogus: invalid IPC mode" in r.stderr
    assert lamina("run", "--rm", "--ipc=container:nosuch", IMAGE, "true").returncode == 125


def test_an_unknown_flag_with_a_spaced_value_is_named(lamina: Lamina) -> None:
    """docker (pflag) reports any unknown ``--flag=VALUE`` as an unknown flag; argparse alone takes
    one whose value holds a space for a positional, and ``run`` then looked for an image of that
    name. A known flag's spaced value, and the container command's own flags, are untouched."""
    r = lamina("run", "--rm", "--device-cgroup-rule=c 1:3 r", IMAGE, "true")
    assert r.returncode == 125 and "unrecognized arguments: --device-cgroup-rule=c 1:3 r" in r.stderr
    assert "image" not in r.stderr
    r = lamina("run", "--rm", "--network", "none", "--health-cmd=echo a b", IMAGE, "echo", "--x=a b")
    assert (r.returncode, r.stdout) == (0, "--x=a b\n")
