"""Terminals as docker gives them: ``run -it``/``exec -it`` on a pty of the container's own
(/dev/pts/0), TERM=xterm, "the input device is not a TTY", and attach/detach with docker's keys.
Each test drives lamina from a pty of its own (the user's terminal) and reads what it shows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from runner_support import on_pty, read_until
from test_runner_cli import Lamina, lamina, lamina_argv, module_root
from test_store_interop import podman, run_podman

from harness import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.fuse]

__all__ = ["lamina", "module_root", "podman"]  # fixtures shared with other modules

IMAGE = "lamina/busybox"
PROBE = b"tty; echo T=$TERM; ls -l /dev/console | cut -c1; echo $((6*7))\r"


def probe(master: int) -> list[str]:
    read_until(master, b"# ")
    os.write(master, PROBE)
    out = read_until(master, b"42\r\n").decode()
    return [line for line in out.split("\r\n") if line.startswith(("/dev", "T=", "c"))]


def test_run_it_gives_a_pts_and_xterm(module_root: Path) -> None:
    env = {**os.environ, "TERM": "vt100"}  # the caller's TERM does not reach the container
    with on_pty(lamina_argv(module_root, "run", "-it", "--rm", IMAGE, "sh"), cwd=REPO_ROOT, env=env) as (proc, m):
        assert probe(m) == ["/dev/pts/0", "T=xterm", "c"]
        os.write(m, b"exit 5\r")
        assert proc.wait(timeout=20) == 5
    argv = lamina_argv(module_root, "run", "-it", "--rm", "-e", "TERM=screen", IMAGE, "sh")
    with on_pty(argv, cwd=REPO_ROOT, env=env) as (proc, m):
        assert probe(m)[1] == "T=screen"
        os.write(m, b"exit\r")
        assert proc.wait(timeout=20) == 0


def test_exec_it_gives_a_terminal(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "-d", "--name", "box", IMAGE, "sleep", "60").returncode == 0
    with on_pty(lamina_argv(module_root, "exec", "-it", "box", "sh"), cwd=REPO_ROOT,
                env={**os.environ, "TERM": "vt100"}) as (proc, m):
        lines = probe(m)
        assert lines[0].startswith("/dev/pts/") and lines[1] == "T=xterm"
        os.write(m, b"exit 4\r")
        assert proc.wait(timeout=20) == 4


def _alive(lamina: Lamina, container: str, pid_file: str) -> bool:
    return lamina("exec", container, "sh", "-c", f"kill -0 $(cat {pid_file})").returncode == 0


def test_exec_it_detaches_and_the_command_runs_on(lamina: Lamina, module_root: Path) -> None:
    """docker's exec: ctrl-p,ctrl-q (or --detach-keys) ends ``exec -it`` with "read escape
    sequence" (exit 1) and leaves the command running, its output drained; a killed ``exec``
    still takes its command with it."""
    assert lamina("run", "-d", "--name", "xdet", IMAGE, "sleep", "300").returncode == 0
    # Output that starts once the client is gone (before, this test's terminal would have to read it).
    writer = b"(sleep 2; i=0; while [ $i -lt 4000 ]; do echo line $i; i=$((i+1)); done; echo y > /tmp/drained) &\r"
    for keys, typed in ((None, b"\x10\x11"), ("ctrl-a,d", b"\x01d")):
        flags = ["--detach-keys", keys] if keys else []
        with on_pty(lamina_argv(module_root, "exec", "-it", *flags, "xdet", "sh"), cwd=REPO_ROOT) as (proc, m):
            read_until(m, b"# ")
            os.write(m, b"echo $$ > /tmp/sh.pid; echo ready-$((40+2)); " + writer)
            read_until(m, b"ready-42")  # the output, not the echo of what was typed
            os.write(m, typed)
            assert proc.wait(timeout=20) == 1
            assert b"read escape sequence" in read_until(m, b"sequence")
        assert _alive(lamina, "xdet", "/tmp/sh.pid")
        deadline = time.monotonic() + 30  # nobody reads the shell's terminal now: it must not block
        while lamina("exec", "xdet", "cat", "/tmp/drained").returncode != 0:
            assert time.monotonic() < deadline, "the detached command's output was not drained"
            time.sleep(0.2)
        lamina("exec", "xdet", "sh", "-c", "kill -9 $(cat /tmp/sh.pid); rm /tmp/drained")
    with on_pty(lamina_argv(module_root, "exec", "-it", "xdet", "sh"), cwd=REPO_ROOT) as (proc, m):
        read_until(m, b"# ")
        os.write(m, b"echo $$ > /tmp/sh.pid; echo ready-$((40+2))\r")
        read_until(m, b"ready-42")
        proc.kill()
        proc.wait(timeout=20)
    deadline = time.monotonic() + 10
    while _alive(lamina, "xdet", "/tmp/sh.pid"):
        assert time.monotonic() < deadline, "a killed exec left its command running"
        time.sleep(0.2)
    r = lamina("exec", "--detach-keys", "ctrl-9", "xdet", "true")
    assert r.returncode != 0 and "Invalid detach keys (ctrl-9) provided" in r.stderr
    lamina("rm", "-f", "xdet")


def test_it_without_a_terminal_is_refused(lamina: Lamina) -> None:
    for argv in (["run", "-it", "--rm", IMAGE, "true"], ["run", "-it", "--name", "never", IMAGE, "true"]):
        r = lamina(*argv)
        assert (r.returncode, r.stderr.strip()) == (1, "lamina: error: the input device is not a TTY")
    assert "never" not in lamina("ps", "-a").stdout  # refused before anything was made
    assert lamina("run", "-d", "--name", "up", IMAGE, "sleep", "60").returncode == 0
    r = lamina("exec", "-it", "up", "true")
    assert r.returncode == 1 and "the input device is not a TTY" in r.stderr
    assert lamina("run", "-t", "--rm", IMAGE, "tty").stdout.strip() == "/dev/pts/0"  # -t alone is fine


def test_detach_and_attach_again(lamina: Lamina, module_root: Path) -> None:
    with on_pty(lamina_argv(module_root, "run", "-it", "--name", "det", IMAGE, "sh"), cwd=REPO_ROOT) as (proc, m):
        read_until(m, b"# ")
        os.write(m, b"echo before > /tmp/mark\r")
        read_until(m, b"# ")
        os.write(m, b"\x10\x11")  # ctrl-p ctrl-q
        assert proc.wait(timeout=20) == 0
    assert lamina("exec", "det", "cat", "/tmp/mark").stdout == "before\n"
    assert "Up " in lamina("ps", "--filter", "name=det").stdout
    with on_pty(lamina_argv(module_root, "attach", "--detach-keys", "ctrl-a,d", "det"), rows=21, cols=77,
                cwd=REPO_ROOT) as (proc, m):
        time.sleep(0.5)
        os.write(m, b"stty size; echo $((5*5))\r")
        assert b"21 77" in read_until(m, b"25\r\n")
        os.write(m, b"\x01d")
        assert proc.wait(timeout=20) == 1  # docker attach: "read escape sequence", exit 1
        assert b"read escape sequence" in read_until(m, b"sequence")
    with on_pty(lamina_argv(module_root, "attach", "det"), cwd=REPO_ROOT) as (proc, m):
        time.sleep(0.5)
        os.write(m, b"exit 3\r")
        assert proc.wait(timeout=20) == 3  # the container's exit code
    r = lamina("attach", "det")
    assert r.returncode == 1 and "You cannot attach to a stopped container" in r.stderr
    with on_pty(lamina_argv(module_root, "start", "-ai", "det"), cwd=REPO_ROOT) as (proc, m):
        os.write(m, b"\r")
        read_until(m, b"# ")
        os.write(m, b"cat /tmp/mark; exit 8\r")
        read_until(m, b"before")
        assert proc.wait(timeout=20) == 8
    r = lamina("run", "-d", "--detach-keys", "ctrl-9", IMAGE, "true")
    assert r.returncode != 0 and "Invalid detach keys (ctrl-9) provided" in r.stderr


def test_detach_keys_as_docker_reads_them() -> None:
    from runner.attach import DetachKeysError, EscapeMatcher, parse_detach_keys

    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert parse_detach_keys("ctrl-@,ctrl-[,a,ctrl-_") == b"\x00\x1ba\x1f"
    for bad in ("ctrl-9", "ctrl-", "ab", ""):
        with pytest.raises(DetachKeysError):
            parse_detach_keys(bad)
    matcher = EscapeMatcher(b"\x10\x11")
    assert matcher.feed(b"ab\x10") == (b"ab", False)  # held: it may begin the keys
    assert matcher.feed(b"x") == (b"\x10x", False)  # it did not: sent after all
    assert matcher.feed(b"\x10\x10") == (b"\x10", False)
    assert matcher.feed(b"\x11rest") == (b"", True)


def test_attach_to_a_container_without_terminal_follows_its_output(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "-d", "--name", "talker", IMAGE, "sh", "-c",
                  "echo early; sleep 1; echo late; echo err >&2; exit 6").returncode == 0
    r = lamina("attach", "talker")
    assert r.returncode == 6
    assert r.stdout == "late\n" and r.stderr == "err\n"


def test_podman_gives_the_same_terminal(podman: object, lamina: Lamina, tmp_path: Path) -> None:
    """The outside reference: podman's `run -it` terminal, probed the same way."""
    archive = tmp_path / "busybox.tar"
    lamina("save", IMAGE, "-o", str(archive), check=True)
    run_podman(podman, "load", "-i", str(archive))
    argv = podman.argv(["run", "-it", "--rm", "--network=none", IMAGE, "sh"])  # type: ignore[attr-defined]
    env = {**podman.environment(), "TERM": "vt100"}  # type: ignore[attr-defined]
    with on_pty(argv, env=env) as (proc, m):
        assert probe(m) == ["/dev/pts/0", "T=xterm", "c"]
        os.write(m, b"exit\r")
        assert proc.wait(timeout=30) == 0


@pytest.mark.unprivileged
@pytest.mark.slow
def test_terminal_detach_and_attach_unprivileged(unpriv) -> None:  # type: ignore[no-untyped-def]
    as_user = {"env": unpriv.env(), "cwd": unpriv.workdir, "user": unpriv.uid, "group": unpriv.gid,
               "extra_groups": []}
    try:
        with on_pty(["lamina", "run", "-it", "--name", "ut", "--network", "none", IMAGE, "sh"], **as_user) as (proc, m):
            assert probe(m) == ["/dev/pts/0", "T=xterm", "c"]
            os.write(m, b"\x10\x11")
            assert proc.wait(timeout=30) == 0
        assert "Up " in unpriv.lamina("ps").stdout
        with on_pty(["lamina", "exec", "-it", "ut", "sh"], **as_user) as (proc, m):  # exec detaches too
            read_until(m, b"# ")
            os.write(m, b"echo $$ > /tmp/x.pid; echo ready-$((40+2))\r")
            read_until(m, b"ready-42")
            os.write(m, b"\x10\x11")
            assert proc.wait(timeout=30) == 1
        assert unpriv.lamina("exec", "ut", "sh", "-c", "kill -0 $(cat /tmp/x.pid)").returncode == 0
        with on_pty(["lamina", "attach", "ut"], **as_user) as (proc, m):
            time.sleep(0.5)
            os.write(m, b"exit 2\r")
            assert proc.wait(timeout=30) == 2
        with on_pty(["lamina", "start", "-ai", "ut"], **as_user) as (proc, m):
            os.write(m, b"\r")
            assert probe(m)[0] == "/dev/pts/0"
            os.write(m, b"exit 0\r")
            assert proc.wait(timeout=30) == 0
        assert unpriv.lamina("rm", "ut").returncode == 0
    finally:  # a failure above must not leave the detached container running
        unpriv.lamina("rm", "-f", "ut")
