"""``lamina run`` and the container lifecycle through the command line, on the real union mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT, fuse_mounts_under
from runner_support import free_port, http_get_eventually, lamina_on_root, on_pty, read_until

pytestmark = [pytest.mark.root, pytest.mark.fuse]

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
IMAGE = "lamina/busybox"


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner-cli") / "root"


@pytest.fixture
def lamina(lamina_cmd: Lamina, module_root: Path) -> Iterator[Lamina]:
    """``lamina(*args, check=False)`` on a store shared by the module; removes containers afterwards."""
    yield from lamina_on_root(lamina_cmd, module_root)


def lamina_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


def record(root: Path, name: str) -> dict:  # type: ignore[type-arg]
    for path in (root / "containers").glob("*/container.json"):
        data = json.loads(path.read_text())
        if data["name"] == name:
            return data  # type: ignore[no-any-return]
    raise AssertionError(f"no container {name}")


def test_exit_code_env_workdir_user(lamina: Lamina, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("FROM_FILE=f\nB=file\n")
    r = lamina("run", "--rm", "-e", "A=1", "-e", "B=flag", "-e", "HOSTVAR", "--env-file", str(env_file),
               "-w", "/made/here", "-u", "nobody", "--hostname", "boxy", IMAGE,
               "sh", "-c", 'echo "$A $B $FROM_FILE $HOSTVAR"; pwd; id -u; hostname; exit 3',
               env={"HOSTVAR": "h"})
    assert r.returncode == 3, r.stderr
    assert r.stdout.splitlines() == ["1 flag f h", "/made/here", "65534", "boxy"]


def test_docker_exit_codes(lamina: Lamina) -> None:
    r = lamina("run", "--rm", "--pull", "never", "no/such-image")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "no/such-image" in r.stderr
    r = lamina("run", "--rm", "--bogus-flag", IMAGE)
    assert r.returncode == 125 and "--bogus-flag" in r.stderr
    r = lamina("run", "--rm", "--name", "../x", IMAGE, "true")
    assert r.returncode == 125 and "invalid container name" in r.stderr
    r = lamina("run", "--rm", IMAGE, "nosuchcommand")
    assert r.returncode == 127 and 'exec: "nosuchcommand": executable file not found in $PATH' in r.stderr
    r = lamina("run", "--rm", IMAGE, "/etc/passwd")
    assert r.returncode == 126 and "permission denied" in r.stderr
    r = lamina("run", "--rm", "--entrypoint", "/bin/sh", IMAGE, "-c", "exit 0")
    assert r.returncode == 0
    # flags after the image belong to the command
    r = lamina("run", "--rm", IMAGE, "echo", "-e", "--rm", "-d")
    assert r.stdout == "--rm -d\n"
    assert lamina("ps", "-aq").stdout == ""  # --rm removed every one of them


def test_volumes_ro_rw_and_anonymous(lamina: Lamina, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in").write_text("input")
    r = lamina("run", "--name", "vol", "-v", f"{rw}:/rw", "-v", f"{ro}:/ro:ro", "-v", "/anon", IMAGE, "sh", "-c",
               "cat /ro/in > /rw/out; echo x > /ro/nope || echo refused; echo a > /anon/a; ls /anon")
    assert r.returncode == 0, r.stderr
    assert (rw / "out").read_text() == "input"
    assert "refused" in r.stdout and not (ro / "nope").exists()
    diff = lamina("diff", "vol").stdout.split("\n")
    assert "A /anon" in diff or "A /anon" not in "".join(diff)  # the mount point may be new, its file is not
    assert not any(line.startswith("A /anon/") for line in diff)
    assert not any("/rw/out" in line for line in diff)


def _wait_for_log(lamina: Lamina, name: str, starts: int) -> None:
    deadline = time.monotonic() + 10
    while lamina("logs", name).stdout.split().count("started") < starts:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_detach_logs_stop_ps_rm(lamina: Lamina, module_root: Path) -> None:
    script = 'echo started; trap "echo bye; exit 0" TERM; while :; do sleep 0.1; done'
    r = lamina("run", "-d", "--name", "bg", IMAGE, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert len(cid) == 64
    assert record(module_root, "bg")["image_id"]
    deadline = time.monotonic() + 10
    while "started" not in lamina("logs", "bg").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ps = lamina("ps").stdout.splitlines()
    assert ps[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert any(line.startswith(cid[:12]) and "Up" in line and line.endswith("bg") for line in ps)
    assert lamina("ps", "-aq", "--filter", "name=bg").stdout == cid[:12] + "\n"
    assert lamina("ps", "-aq", "--no-trunc", "-f", "status=running", "-f", "name=bg").stdout == cid + "\n"
    assert lamina("ps", "-a", "-f", "name=nomatch", "-q").stdout == ""
    assert lamina("ps", "--format", "{{.Names}} {{.State}} {{.Image}}", "-f", "name=bg").stdout == \
        f"bg running {IMAGE}\n"
    r = lamina("rm", "bg")
    assert r.returncode != 0 and "stop it first" in r.stderr
    assert lamina("stop", "-t", "5", "bg").returncode == 0
    assert lamina("logs", "bg").stdout.split() == ["started", "bye"]
    assert record(module_root, "bg")["state"]["exit_code"] == 0
    assert "bg" not in lamina("ps").stdout
    assert "Exited (0)" in lamina("ps", "-a").stdout
    # start runs the command again; restart stops it (STOPSIGNAL) and starts it once more
    assert lamina("start", "bg").returncode == 0
    _wait_for_log(lamina, "bg", 2)
    assert lamina("restart", "-t", "5", "bg").returncode == 0
    _wait_for_log(lamina, "bg", 3)
    assert lamina("stop", "-t", "5", "bg").returncode == 0
    assert lamina("logs", "bg").stdout.split() == ["started", "bye"] * 3
    assert lamina("rm", "bg").returncode == 0
    assert not (module_root / "containers" / cid).exists()


def test_stop_escalates_to_sigkill_and_kill(lamina: Lamina, module_root: Path) -> None:
    # PID 1 without a handler ignores SIGTERM: stop -t 1 must fall back to SIGKILL
    assert lamina("run", "-d", "--name", "stubborn", IMAGE, "sleep", "60").returncode == 0
    started = time.monotonic()
    assert lamina("stop", "-t", "1", "stubborn").returncode == 0
    assert 1 <= time.monotonic() - started < 15
    assert record(module_root, "stubborn")["state"]["exit_code"] == 137
    assert lamina("run", "-d", "--init", "--name", "k", IMAGE, "sleep", "60").returncode == 0
    assert lamina("kill", "-s", "TERM", "k").returncode == 0
    assert lamina("wait", "k", timeout=20).stdout == "143\n"  # --init forwarded SIGTERM to sleep
    assert record(module_root, "k")["state"]["status"] == "exited"


def test_exec(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "ex", "-e", "CTR=1", IMAGE, "sh", "-c",
                  "echo hi > /tmp/state; exec sleep 60").returncode == 0
    r = lamina("exec", "-e", "EXTRA=2", "ex", "sh", "-c",
               'while [ ! -s /tmp/state ]; do sleep 0.05; done; echo "$CTR $EXTRA"; cat /tmp/state; echo $$; '
               'cat /proc/1/cmdline | tr "\\0" " "; echo; hostname')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1 2" and lines[1] == "hi"
    assert lines[2] != "1" and lines[3].strip() == "sleep 60"
    r = lamina("exec", "-u", "nobody", "-w", "/tmp", "ex", "sh", "-c", "id -u; pwd; exit 4")
    assert r.returncode == 4 and r.stdout.split() == ["65534", "/tmp"]
    r = lamina("exec", "ex", "nosuch")
    assert r.returncode == 127
    lamina("kill", "ex")
    r = lamina("exec", "no-such-container", "true")
    assert r.returncode == 1 and "no such container" in r.stderr


def test_commit_then_run_and_diff_is_clean(lamina: Lamina) -> None:
    r = lamina("run", "--name", "mk", IMAGE, "sh", "-c",
               "echo data > /made; rm /bin/vi; mkdir -p /srv/new; echo 1 >> /etc/passwd; cat /etc/hosts >/dev/null")
    assert r.returncode == 0, r.stderr
    diff = lamina("diff", "mk").stdout.splitlines()
    assert diff == ["C /bin", "D /bin/vi", "C /etc", "C /etc/passwd", "A /made", "A /srv", "A /srv/new"]
    r = lamina("commit", "mk", "committed:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sha256:")
    r = lamina("run", "--rm", "committed:1", "sh", "-c", "cat /made; ls /bin/vi 2>&1 || echo gone; tail -1 /etc/passwd")
    assert r.stdout.splitlines() == ["data", "ls: /bin/vi: No such file or directory", "gone", "1"]


def test_publish_port_reached_from_host(lamina: Lamina, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the container\n")
    port = free_port()
    r = lamina("run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:8080", "-v", f"{www}:/www:ro", IMAGE,
               "httpd", "-f", "-p", "8080", "-h", "/www")
    assert r.returncode == 0, r.stderr
    assert f"127.0.0.1:{port}->8080/tcp" in lamina("ps").stdout
    assert lamina("port", "web").stdout == f"8080/tcp -> 127.0.0.1:{port}\n"
    assert http_get_eventually(f"http://127.0.0.1:{port}/") == "hello from the container\n"
    lamina("rm", "-f", "web")


def test_network_modes(lamina: Lamina) -> None:
    r = lamina("run", "--rm", "--network", "none", IMAGE, "sh", "-c",
               "ip -o link | cut -d: -f2; ip route; nc -w 1 10.0.2.2 53 </dev/null 2>&1 || echo unreachable")
    assert r.stdout.split()[0] == "lo" and "tap0" not in r.stdout and "unreachable" in r.stdout
    r = lamina("run", "--rm", IMAGE, "sh", "-c", "ip -o -4 addr show tap0; ip route")
    assert "10.0.2.100/24" in r.stdout and "default via 10.0.2.2" in r.stdout
    # Other programs (podman's tests, CNI) add and remove host interfaces meanwhile: the container
    # sees those there before and after, and nothing that was in neither.
    before = set(os.listdir("/sys/class/net"))
    r = lamina("run", "--rm", "--network", "host", IMAGE, "sh", "-c", "ls /sys/class/net")
    after = set(os.listdir("/sys/class/net"))
    assert before & after <= set(r.stdout.split()) <= before | after, (r.returncode, r.stderr)


def test_a_network_helper_that_fails_gives_one_line(lamina: Lamina, tmp_path: Path) -> None:
    """slirp4netns dying at start: its own message in one line, exit 125, no container left."""
    fake = tmp_path / "bin" / "slirp4netns"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cannot open /dev/net/tun: no such device' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
    for ports in ([], ["-p", f"127.0.0.1:{free_port()}:80"]):
        r = lamina("run", "--rm", "--name", "no-net", *ports, IMAGE, "true", env=env)
        assert r.returncode == 125, r.stderr
        assert r.stderr.splitlines() == [
            "lamina: error: slirp4netns did not start: cannot open /dev/net/tun: no such device"], r.stderr
        assert "no-net" not in lamina("ps", "-a").stdout


def test_escape_attempts(lamina: Lamina, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # an image whose symlinks point "outside"
    assert lamina("run", "--name", "evil", IMAGE, "sh", "-c",
                  f"ln -s ../../../../../../../..{outside} /esc; ln -s /../../.. /up").returncode == 0
    assert lamina("commit", "evil", "evil:1").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    script = ("pwd; touch inwd; echo 1 > /proc/sys/kernel/hostname 2>&1 || echo procsys-refused; "
              f"cat {src}/secret 2>&1 || echo no-host-fs; ls /up/etc/shadow 2>&1 || echo no-shadow")
    (src / "secret").write_text("secret")
    r = lamina("run", "--rm", "-w", "/esc/wd", "-v", f"{src}:/up{outside}/vol", "-v", f"{src}:/../../..{outside}/dd",
               "evil:1", "sh", "-c", script + f"; ls {outside}/dd")
    assert r.returncode == 0, r.stderr
    # the working directory is the symlink's target *inside* the container's root
    assert r.stdout.splitlines()[0] == f"{outside}/wd"
    assert "procsys-refused" in r.stdout and "no-host-fs" in r.stdout and "no-shadow" in r.stdout
    assert r.stdout.splitlines()[-1] == "secret"  # the `..` mount target landed inside the container
    assert list(outside.iterdir()) == []
    assert os.listdir(src) == ["secret"]


def test_interactive_tty(module_root: Path) -> None:
    with on_pty(lamina_argv(module_root, "run", "-it", "--rm", IMAGE, "sh"), rows=33, cols=101,
                cwd=REPO_ROOT) as (proc, master):
        read_until(master, b"# ")
        os.write(master, b"stty size; tty; ls -l /dev/console | cut -c1; echo $((6*7))\r")
        out = read_until(master, b"42")
        assert b"33 101" in out and b"/dev/" in out
        assert b"\r\nc\r\n" in out  # /dev/console is the terminal (a character device)
        os.write(master, b"sleep 30\r")
        time.sleep(0.5)
        started = time.monotonic()
        os.write(master, b"\x03")  # Ctrl-C reaches the container's foreground process
        os.write(master, b"echo after-$((1+1))\r")
        read_until(master, b"after-2")
        assert time.monotonic() - started < 20
        os.write(master, b"exit 9\r")
        assert proc.wait(timeout=20) == 9


def test_signals_reach_the_container(module_root: Path) -> None:
    script = 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(lamina_argv(module_root, "run", "--rm", IMAGE, "sh", "-c", script),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 42
        assert proc.stdout.read() == b"got-term\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_crashed_monitor_is_marked_exited(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "-d", "--name", "orphan", IMAGE, "sleep", "60").returncode == 0
    state = record(module_root, "orphan")["state"]
    os.kill(state["monitor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:  # the container dies with its monitor (parent-death signal)
        try:
            os.kill(state["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Exited (255)" in lamina("ps", "-a").stdout
    assert record(module_root, "orphan")["state"]["status"] == "exited"
    assert fuse_mounts_under(module_root) == []
    assert lamina("rm", "orphan").returncode == 0


def test_read_only_root_and_create_start(lamina: Lamina, module_root: Path) -> None:
    r = lamina("run", "--rm", "--read-only", "--tmpfs", "/scratch:size=1m", IMAGE, "sh", "-c",
               "touch /x 2>&1 || echo refused; echo ok > /dev/null; touch /scratch/y && grep -c size=1024k /proc/mounts")
    assert "refused" in r.stdout and r.stdout.split()[-1] == "1" and r.returncode == 0
    cid = lamina("create", "--name", "later", IMAGE, "sh", "-c", "echo from-create").stdout.strip()
    assert "Created" in lamina("ps", "-a").stdout
    r = lamina("start", "-a", "later")
    assert r.returncode == 0 and r.stdout == "from-create\n"
    assert lamina("logs", "later").stdout == "from-create\n"  # foreground output is kept too, as docker
    assert lamina("rm", cid[:12]).returncode == 0


def test_image_volume_gets_a_seeded_anonymous_volume(lamina: Lamina, module_root: Path) -> None:
    from lamina.store import Store

    assert lamina("run", "--name", "seed", IMAGE, "sh", "-c", "mkdir /data && echo seed > /data/f").returncode == 0
    assert lamina("commit", "seed", "seeded:1").returncode == 0
    store = Store.open(module_root)
    base = store.resolve_image("seeded:1")
    config = json.loads(json.dumps(base.config))
    config["config"]["Volumes"] = {"/data": {}}
    config.pop("created", None)
    store.create_image(base.layers, config, tags=["withvolume:1"], base=base)
    r = lamina("run", "--name", "usevol", "withvolume:1", "sh", "-c", "cat /data/f; echo new > /data/g")
    assert r.returncode == 0 and r.stdout == "seed\n", r.stderr
    volume = module_root / "volumes" / record(module_root, "usevol")["anonymous_volumes"][0] / "_data"
    assert sorted(os.listdir(volume)) == ["f", "g"]
    assert not any("/data/g" in line for line in lamina("diff", "usevol").stdout.splitlines())
    assert lamina("rm", "-v", "usevol").returncode == 0  # as docker: without -v it would stay
    assert not volume.exists()


def test_exec_it_and_logs_follow(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "-d", "--name", "tgt", IMAGE, "sh", "-c",
                  "for i in 1 2 3; do echo line$i; sleep 0.3; done").returncode == 0
    follow = lamina("logs", "-f", "tgt", timeout=30)  # returns when the container exits
    assert follow.stdout.split() == ["line1", "line2", "line3"]
    assert lamina("run", "-d", "--name", "shell", IMAGE, "sleep", "60").returncode == 0
    with on_pty(lamina_argv(module_root, "exec", "-it", "shell", "sh"), cwd=REPO_ROOT) as (proc, master):
        read_until(master, b"# ")
        os.write(master, b"echo $((3*3))-$(cat /proc/1/comm)\r")
        read_until(master, b"9-sleep")
        os.write(master, b"exit 4\r")
        assert proc.wait(timeout=20) == 4


def test_run_pulls_a_missing_image(lamina: Lamina, tmp_path: Path) -> None:
    from registry_server import run_registry

    with run_registry(tmp_path / "registry") as registry:
        ref = f"{registry.address}/runner/bb:1"
        assert lamina("push", "--tls-verify=false", "-q", IMAGE, ref).returncode == 0
        assert lamina("run", "--rm", "--pull", "never", ref, "true").returncode == 125
        r = lamina("run", "--rm", ref, "echo", "pulled")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "pulled\n" and f"Unable to find image '{ref}' locally" in r.stderr
        assert "\x1b" not in r.stderr  # no terminal escapes when stderr is not a terminal
        assert lamina("run", "--rm", "--pull", "never", ref, "true").returncode == 0
