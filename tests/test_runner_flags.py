"""``run``/``create`` flags, each looked at from inside the container (/etc/hosts, /etc/resolv.conf,
/proc/self/status, ulimit, df) and compared with podman where podman gives docker's answer, else
with docker's documented behaviour (docs.docker.com, ``docker run`` reference)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT
from runner_support import Lamina, free_port, http_get_eventually, lamina_on_root

pytestmark = [pytest.mark.root, pytest.mark.fuse]

IMAGE = "lamina/busybox"
STATUS = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner-flags") / "root"


@pytest.fixture
def lamina(lamina_cmd: Lamina, module_root: Path) -> Iterator[Lamina]:
    yield from lamina_on_root(lamina_cmd, module_root, remove_volumes=True)


def _inspect(lamina: Lamina, name: str) -> dict:  # type: ignore[type-arg]
    r = lamina("inspect", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]  # type: ignore[no-any-return]


# Cases run by both lamina and podman (rootless podman, as lamina is rootless; see podman_rootless).
PODMAN_CASES: list[tuple[list[str], str]] = [
    ([], STATUS),
    (["--cap-add", "SYS_ADMIN", "--cap-drop", "chown"], STATUS),
    (["--cap-drop", "ALL"], STATUS),
    (["--cap-drop", "ALL", "--cap-add", "NET_RAW"], STATUS),
    (["--cap-add", "ALL"], STATUS),
    (["--privileged"], STATUS),
    (["--security-opt", "no-new-privileges"], STATUS),
    (["--security-opt", "no-new-privileges=true"], STATUS),
    (["--security-opt", "seccomp=unconfined"], STATUS),
    (["--security-opt", "label=disable"], STATUS),
    (["-u", "nobody", "--cap-add", "SYS_ADMIN"], "grep -E '^(CapEff|CapBnd):' /proc/self/status"),
    (["--ulimit", "nofile=100:200"], "ulimit -n; ulimit -Hn"),
    (["--shm-size", "1m"], "df -k /dev/shm | tail -1 | awk '{print $2}'"),
    (["--mount", "type=tmpfs,target=/t,tmpfs-size=2m"], "df -k /t | tail -1 | awk '{print $2}'"),
    (["--dns", "9.9.9.9", "--dns-search", "example.com", "--dns-option", "ndots:2"], "cat /etc/resolv.conf"),
    (["--add-host", "foo:1.2.3.4", "--add-host", "bar:::1"], "grep -E 'foo|bar' /etc/hosts"),
]

# Where podman answers differently from docker, and lamina follows docker.
PODMAN_NOT_DOCKER = {
    # podman gives a non-root user its added capabilities as ambient ones; docker does not (moby
    # keeps the ambient set empty: CapEff of a non-root user is 0).
    10: "CapEff:\t0000000000000000\nCapBnd:\t00000000a82425fb\n",
}


@pytest.fixture(scope="module")
def podman_rootless() -> Iterator[object]:
    if os.geteuid() != 0 or subprocess.run(["which", "podman"], capture_output=True).returncode != 0:
        pytest.skip("podman comparisons run as root with podman installed")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.containers import make_busybox_tarball
    from bench.podman_env import PodmanUnavailable, ensure_bench_user, open_podman_env

    try:
        with open_podman_env(storage_driver="vfs", user=ensure_bench_user()) as env:
            tarball = make_busybox_tarball(env.base / "rootfs.tar")
            env.chown_for_user(tarball)
            probe = env.run(["import", str(tarball), "localhost/bb:latest"], check=False)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run here: {probe.stderr.decode(errors='replace')[-300:]}")
            yield env
    except PodmanUnavailable as e:
        pytest.skip(f"podman cannot run here: {e}")


@pytest.mark.slow
def test_flags_seen_from_inside_match_rootless_podman(lamina: Lamina, podman_rootless: object) -> None:
    for index, (flags, script) in enumerate(PODMAN_CASES):
        ours = lamina("run", "--rm", *flags, IMAGE, "sh", "-c", script)
        assert ours.returncode == 0, (flags, ours.stderr)
        theirs = podman_rootless.run(["run", "--rm", *flags, "localhost/bb", "sh", "-c", script],  # type: ignore[attr-defined]
                                     check=False)
        assert theirs.returncode == 0, (flags, theirs.stderr)
        expected = PODMAN_NOT_DOCKER.get(index, theirs.stdout.decode())
        if "/etc/hosts" in script or "resolv.conf" in script:
            # podman adds its own entries (host.containers.internal): compare the flags' lines.
            assert set(ours.stdout.splitlines()) <= set(theirs.stdout.decode().splitlines()) | set(expected.splitlines())
            assert ours.stdout.strip(), flags
        else:
            assert ours.stdout == expected, (flags, ours.stdout, expected)


def test_etc_files_labels_and_inspect(lamina: Lamina, tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.write_text("# comment\nfrom.file=1\n\nshared=file\n")
    cidfile = tmp_path / "cid"
    r = lamina("run", "--name", "lab", "--label", "a=b", "-l", "shared=flag", "--label-file", str(labels),
               "--cidfile", str(cidfile), "--add-host", "gw:host-gateway", "--network", "none",
               "--dns", "1.1.1.1", IMAGE, "sh", "-c", "grep gw /etc/hosts; cat /etc/resolv.conf")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "10.0.2.2\tgw"
    assert "nameserver 1.1.1.1" in r.stdout.splitlines()
    info = _inspect(lamina, "lab")
    assert info["Config"]["Labels"] == {"a": "b", "shared": "flag", "from.file": "1"}
    assert cidfile.read_text() == info["Id"]
    assert info["HostConfig"]["ExtraHosts"] == ["gw:10.0.2.2"] and info["HostConfig"]["Dns"] == ["1.1.1.1"]
    # docker refuses an existing cidfile, before making anything
    r = lamina("run", "--rm", "--cidfile", str(cidfile), IMAGE, "true")
    assert r.returncode == 125 and "container ID file found" in r.stderr and r.stderr.count("\n") == 1
    assert lamina("ps", "-aq").stdout.split() == [info["Id"][:12]]


def test_bad_flags_are_one_line_naming_the_flag(lamina: Lamina) -> None:
    bad = {
        ("--add-host", "foo"): '--add-host: bad format for add-host: "foo"',
        ("--add-host", "foo:notanip"): "invalid IP address in add-host",
        ("--dns", "nameserver"): "--dns nameserver: nameserver is not an ip address",
        ("--cap-add", "BOGUS"): '--cap-add BOGUS: unknown capability: "CAP_BOGUS"',
        ("--cap-drop", "sys_nope"): 'unknown capability: "CAP_SYS_NOPE"',
        ("--security-opt", "apparmor"): "--security-opt apparmor: invalid --security-opt",
        ("--security-opt", "no-new-privileges=maybe"): "invalid no-new-privileges value",
        ("--ulimit", "bogus=1"): "--ulimit bogus=1: invalid ulimit type: bogus",
        ("--ulimit", "nofile=200:100"): "soft limit must be less than or equal to hard limit: 200 > 100",
        ("--shm-size", "0"): "--shm-size 0: invalid size",
        ("--shm-size", "lots"): "--shm-size lots: invalid size",
        ("--stop-signal", "BOGUS"): "--stop-signal BOGUS: invalid signal",
        ("--restart", "sometimes"): "invalid restart policy: unknown policy 'sometimes'",
        ("--restart", "always:3"): "maximum retry count can only be used with 'on-failure'",
        ("--log-opt", "bogus=1"): "unknown log opt 'bogus' for json-file log driver",
        ("--log-opt", "max-file=0"): "max-file cannot be less than 1",
        ("--log-driver", "syslog"): "--log-driver syslog",
        ("--platform", "linux/s390x"): "--platform linux/s390x: only the host's platform",
        ("--memory", "1k"): "minimum memory limit allowed is 6MB",
        ("--cpus", "lots"): "--cpus lots: failed to parse",
        ("-p", "99999"): "-p 99999: port out of range",
        # a newline would write a line of the caller's choosing into /etc/hosts or resolv.conf
        ("--add-host", "a\nb:1.2.3.4"): "bad format for add-host",
        ("--dns-search", "x.org\nnameserver 6.6.6.6"): "must be one word",
        ("--dns-option", "ndots:1 x"): "must be one word",
        ("--ulimit", "nofile=-2"): "invalid ulimit argument",
        ("--ulimit", f"nofile={1 << 64}"): "invalid ulimit argument",
    }
    for flag, message in bad.items():
        r = lamina("run", "--rm", *flag, IMAGE, "true")
        assert r.returncode == 125 and message in r.stderr and r.stderr.count("\n") == 1, (flag, r.stderr)
    r = lamina("run", "--rm", "--restart", "always", IMAGE, "true")
    assert r.returncode == 125 and "--restart and --rm" in r.stderr
    assert lamina("ps", "-aq").stdout == ""


def test_platform_of_the_host_is_accepted(lamina: Lamina) -> None:
    from lamina.store.platforms import host_platform

    host = host_platform()
    for text in (str(host), f"linux/{host.architecture}", "linux"):
        r = lamina("run", "--rm", "--platform", text, IMAGE, "true")
        assert r.returncode == 0, (text, r.stderr)


def test_privileged_unmasks_proc_and_drops_seccomp(lamina: Lamina) -> None:
    script = "cat /proc/timer_list | head -c 5 | wc -c; grep Seccomp: /proc/self/status"
    masked = lamina("run", "--rm", IMAGE, "sh", "-c", script)
    privileged = lamina("run", "--rm", "--privileged", IMAGE, "sh", "-c", script)
    assert masked.stdout.split() == ["0", "Seccomp:", "2"], masked.stderr
    assert privileged.stdout.split()[1:] == ["Seccomp:", "0"], privileged.stderr
    if os.path.exists("/proc/timer_list"):
        assert privileged.stdout.split()[0] == "5"


def test_exec_gets_the_container_privileges(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "caps", "--cap-drop", "ALL", "--ulimit", "nofile=64:64", IMAGE,
                  "sleep", "60").returncode == 0
    r = lamina("exec", "caps", "sh", "-c", "grep CapEff /proc/self/status; ulimit -n")
    assert r.stdout.split() == ["CapEff:", "0000000000000000", "64"], r.stderr
    info = _inspect(lamina, "caps")
    assert info["HostConfig"]["CapDrop"] and "CAP_CHOWN" in info["HostConfig"]["CapDrop"]
    assert info["HostConfig"]["Ulimits"] == [{"Name": "nofile", "Soft": 64, "Hard": 64}]


@pytest.mark.slow
def test_stop_signal_stop_timeout_and_stop_t(lamina: Lamina) -> None:
    trap = "trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.1; done"
    assert lamina("run", "-d", "--name", "sig", "--stop-signal", "SIGUSR1", IMAGE, "sh", "-c", trap).returncode == 0
    _wait_log(lamina, "sig", "ready")
    assert lamina("stop", "sig").returncode == 0
    assert _inspect(lamina, "sig")["State"]["ExitCode"] == 7
    assert _inspect(lamina, "sig")["Config"]["StopSignal"] in (10, "SIGUSR1")
    # a command that ignores the stop signal is killed after --stop-timeout, or stop -t
    ignore = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    assert lamina("run", "-d", "--name", "slow", "--stop-timeout", "1", IMAGE, "sh", "-c", ignore).returncode == 0
    _wait_log(lamina, "slow", "ready")
    started = time.monotonic()
    assert lamina("stop", "slow").returncode == 0
    assert 0.9 < time.monotonic() - started < 8
    assert _inspect(lamina, "slow")["State"]["ExitCode"] == 137
    assert lamina("start", "slow").returncode == 0
    _wait_log(lamina, "slow", "ready", count=2)
    started = time.monotonic()
    assert lamina("stop", "--timeout", "0", "slow").returncode == 0
    assert time.monotonic() - started < 5


def _wait_log(lamina: Lamina, name: str, word: str, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while lamina("logs", name).stdout.split().count(word) < count:
        assert time.monotonic() < deadline, lamina("logs", name).stdout
        time.sleep(0.1)


@pytest.mark.slow
def test_restart_policies_kept_by_the_monitor(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "retry", "--restart", "on-failure:2", IMAGE, "sh", "-c",
                  "echo run; exit 3").returncode == 0
    deadline = time.monotonic() + 20
    while True:
        info = _inspect(lamina, "retry")
        if info["State"]["Status"] == "exited" and info["RestartCount"] == 2:
            break
        assert time.monotonic() < deadline, info["State"]
        time.sleep(0.1)
    time.sleep(0.5)
    assert lamina("logs", "retry").stdout.split() == ["run"] * 3  # the first run and two restarts
    assert info["State"]["ExitCode"] == 3 and info["HostConfig"]["RestartPolicy"] == {
        "Name": "on-failure", "MaximumRetryCount": 2}
    # on-failure does not restart a success; always does, until stop
    assert lamina("run", "-d", "--name", "ok", "--restart", "on-failure", IMAGE, "true").returncode == 0
    assert lamina("run", "-d", "--name", "loop", "--restart", "always", IMAGE, "sh", "-c",
                  "echo up; sleep 0.2").returncode == 0
    _wait_log(lamina, "loop", "up", count=3)
    assert lamina("stop", "-t", "1", "loop").returncode == 0
    time.sleep(1)
    count = lamina("logs", "loop").stdout.split().count("up")
    time.sleep(1)
    assert lamina("logs", "loop").stdout.split().count("up") == count  # stopped stays stopped
    assert _inspect(lamina, "ok")["RestartCount"] == 0


def test_random_host_port_for_container_port_only(lamina: Lamina, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("random port\n")
    assert lamina("run", "-d", "--name", "web", "-p", "8000", "-v", f"{www}:/www:ro", IMAGE,
                  "httpd", "-f", "-p", "8000", "-h", "/www").returncode == 0
    out = lamina("port", "web").stdout
    # podman and docker: "8000/tcp -> 0.0.0.0:PORT"
    assert out.startswith("8000/tcp -> 0.0.0.0:"), out
    port = int(out.strip().rsplit(":", 1)[1])
    assert port > 0
    assert http_get_eventually(f"http://127.0.0.1:{port}/") == "random port\n"
    assert f"0.0.0.0:{port}->8000/tcp" in lamina("ps").stdout
    ports = _inspect(lamina, "web")["NetworkSettings"]["Ports"]
    assert ports == {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    assert free_port() != port


def test_log_opts_accepted_and_shown(lamina: Lamina) -> None:
    r = lamina("run", "--name", "logged", "--log-opt", "max-size=1m", "--log-opt", "max-file=2", IMAGE, "true")
    assert r.returncode == 0, r.stderr
    config = _inspect(lamina, "logged")["HostConfig"]["LogConfig"]
    assert config == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    # applied: the log rotates at max-size and keeps max-file files (docker's json-file driver)
    r = lamina("run", "--name", "rotated", "--log-opt", "max-size=2k", "--log-opt", "max-file=2", IMAGE, "sh", "-c",
               "i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); done")
    assert r.returncode == 0 and r.stdout.split()[-1] == "line299", r.stderr
    directory = Path(_inspect(lamina, "rotated")["GraphDriver"]["Data"]["UpperDir"]).parent
    logs = sorted(p.name for p in directory.glob("container-json.log*"))
    assert logs == ["container-json.log", "container-json.log.1"]
    assert all((directory / name).stat().st_size <= 2048 for name in logs)
    kept = lamina("logs", "rotated").stdout.split()
    assert kept[-1] == "line299" and 10 < len(kept) < 300
    assert kept == [f"line{n}" for n in range(300 - len(kept), 300)]


def test_resource_limits_without_delegation_warn_as_rootless_podman(lamina: Lamina) -> None:
    from runner.cgroups import WARNING, find_delegation

    if find_delegation() is not None:
        pytest.skip("this machine delegates a cgroup v2 subtree: test_runner_units covers the limits")
    r = lamina("run", "--rm", "--memory", "64m", "--cpus", "1", "--pids-limit", "10", IMAGE, "true")
    assert r.returncode == 0 and WARNING in r.stderr, r.stderr


def test_sigterm_of_foreground_run_is_unaffected_by_new_flags(lamina: Lamina, module_root: Path) -> None:
    """A foreground run with the new flags still forwards its signals (the monitor path changed)."""
    argv = [sys.executable, "-m", "lamina", "--root", str(module_root), "run", "--rm", "--stop-signal", "USR1",
            IMAGE, "sh", "-c", "trap 'exit 9' TERM; echo ready; while :; do sleep 0.1; done"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 9


def _wait_health(lamina: Lamina, name: str, status: str, timeout: float = 40) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        health = _inspect(lamina, name)["State"].get("Health") or {}
        if health.get("Status") == status:
            return health  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


@pytest.mark.slow
def test_health_checks_reach_inspect_and_ps(lamina: Lamina) -> None:
    """docker's documented states: starting, then healthy on a success, unhealthy after --health-retries
    failures in a row; ps shows them in STATUS."""
    assert lamina("run", "-d", "--name", "doc", "--health-cmd", "test -e /tmp/ok && echo fine",
                  "--health-interval", "300ms", "--health-retries", "2", IMAGE, "sleep", "60").returncode == 0
    assert "(health: starting)" in lamina("ps").stdout or _inspect(lamina, "doc")["State"]["Health"]
    health = _wait_health(lamina, "doc", "unhealthy")
    assert health["FailingStreak"] >= 2 and all(entry["ExitCode"] == 1 for entry in health["Log"])
    assert "(unhealthy)" in lamina("ps").stdout
    assert lamina("exec", "doc", "touch", "/tmp/ok").returncode == 0
    health = _wait_health(lamina, "doc", "healthy")
    assert health["FailingStreak"] == 0 and health["Log"][-1]["Output"] == "fine\n"
    assert "(healthy)" in lamina("ps").stdout
    config = _inspect(lamina, "doc")["Config"]["Healthcheck"]
    assert config == {"Test": ["CMD-SHELL", "test -e /tmp/ok && echo fine"], "Interval": 300_000_000, "Retries": 2}
    r = lamina("run", "--rm", "--no-healthcheck", "--health-cmd", "true", IMAGE, "true")
    assert r.returncode == 125 and "--no-healthcheck conflicts with --health-* options" in r.stderr
    r = lamina("run", "--rm", "--health-interval", "soon", IMAGE, "true")
    assert r.returncode == 125 and "--health-interval soon" in r.stderr


def test_pid_host_net_container_and_attach(lamina: Lamina, tmp_path: Path) -> None:
    # --pid host: the host's processes are visible, this test's own among them (docker's reference:
    # "use the host's PID namespace inside the container")
    r = lamina("run", "--rm", "--pid", "host", IMAGE, "sh", "-c", f"test -d /proc/{os.getpid()} && echo seen; echo $$")
    assert r.returncode == 0 and r.stdout.split()[0] == "seen" and int(r.stdout.split()[1]) != 1, r.stderr
    assert lamina("run", "--rm", IMAGE, "sh", "-c", "echo $$").stdout == "1\n"
    r = lamina("run", "--rm", "--pid", "container:x", IMAGE, "true")
    assert r.returncode == 125 and "--pid container:x: invalid PID mode" in r.stderr
    # --network container:NAME: the other container's loopback is this one's
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("shared net\n")
    assert lamina("run", "-d", "--name", "owner", "-v", f"{www}:/www:ro", IMAGE, "httpd", "-f", "-p", "8000",
                  "-h", "/www").returncode == 0
    owner_hosts = (lamina("exec", "owner", "cat", "/etc/hosts").stdout)
    deadline = time.monotonic() + 10
    while True:
        r = lamina("run", "--rm", "--network", "container:owner", IMAGE, "sh", "-c",
                   "wget -qO- http://127.0.0.1:8000/ && cat /etc/hosts")
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0 and r.stdout == "shared net\n" + owner_hosts, r.stderr
    info = _inspect(lamina, "owner")
    assert lamina("create", "--name", "joined", "--net", "container:owner", IMAGE, "true").returncode == 0
    assert _inspect(lamina, "joined")["HostConfig"]["NetworkMode"] == f"container:{info['Id']}"
    r = lamina("run", "--rm", "--net", "container:owner", "-p", "80:80", IMAGE, "true")
    assert r.returncode == 125 and "conflicting options" in r.stderr
    assert lamina("stop", "-t", "1", "owner").returncode == 0
    r = lamina("start", "-a", "joined")
    assert r.returncode == 1 and "cannot join network of a non running container" in r.stderr
    # -a: only the streams named are shown; the log keeps both
    r = lamina("run", "--name", "att", "-a", "stderr", IMAGE, "sh", "-c", "echo out; echo err >&2")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "err\n"
    assert lamina("logs", "att").stdout == "out\n"
    r = lamina("run", "-d", "-a", "stdout", IMAGE, "true")
    assert r.returncode == 125 and "conflicting options" in r.stderr
