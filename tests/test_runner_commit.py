"""``lamina commit`` records the container's config as run, as docker and podman do, and applies
``--change``, ``--message``, ``--author``; checked against ``podman commit`` of the same container."""

from __future__ import annotations

import json
import time
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runner_cli import lamina, module_root
from test_store_interop import podman, run_podman

pytestmark = [pytest.mark.root, pytest.mark.fuse]

__all__ = ["lamina", "module_root", "podman"]  # fixtures shared with other modules

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
IMAGE = "lamina/busybox"
RUNS = {  # name: run flags and command, the same for both tools
    "plain": ["-e", "A=1", "-w", "/tmp", "-u", "nobody", "-v", "/data", IMAGE, "sh", "-c", "echo x > /tmp/f"],
    "entry": ["--entrypoint", "/bin/echo", IMAGE, "hi", "there"],
}
CHANGES = ["--change", "LABEL k=v", "--change", "ENV B=2", "--change", "EXPOSE 8080",
           "--change", 'CMD ["cat", "/tmp/f"]']
PODMAN_ONLY_ENV = {"TERM=xterm", "container=podman"}  # podman's own additions to every container


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("Cmd", "Entrypoint", "User", "Volumes", "Labels", "ExposedPorts")
    result = {key: config.get(key) or None for key in keys}
    result["Env"] = sorted(set(config.get("Env") or []) - PODMAN_ONLY_ENV)
    result["WorkingDir"] = config.get("WorkingDir") or "/"  # podman writes "/" where docker leaves ""
    return result


def test_commit_records_the_run_config_as_podman_does(lamina: Lamina, podman: object, tmp_path: Path) -> None:
    archive = tmp_path / "busybox.tar"
    lamina("save", IMAGE, "-o", str(archive), check=True)
    run_podman(podman, "load", "-i", str(archive))
    for name, run in RUNS.items():
        run_podman(podman, "run", "--network=none", "--name", f"p-{name}", *run)
        assert lamina("run", "--name", f"l-{name}", *run).returncode == 0
        for suffix, changes in (("", []), ("-changed", CHANGES)):
            run_podman(podman, "commit", "-q", *changes, f"p-{name}", f"p-image-{name}{suffix}")
            r = lamina("commit", *changes, f"l-{name}", f"l-image-{name}{suffix}")
            assert r.returncode == 0, r.stderr
            theirs = json.loads(run_podman(podman, "image", "inspect", "--format", "{{json .Config}}",
                                           f"p-image-{name}{suffix}").stdout)
            ours = json.loads(lamina("inspect", "--format", "{{json .Config}}", f"l-image-{name}{suffix}").stdout)
            assert comparable(ours) == comparable(theirs), (name, suffix)
    # what the committed image runs is the container's command, or the changed one
    assert lamina("run", "--rm", "l-image-entry").stdout == "hi there\n"
    assert lamina("run", "--rm", "l-image-plain-changed").stdout == "x\n"
    assert lamina("run", "--rm", "-u", "0", "l-image-plain", "sh", "-c", 'echo "$A $PWD"').stdout == "1 /tmp\n"


def test_commit_message_author_and_bad_changes(lamina: Lamina) -> None:
    assert lamina("run", "--name", "src", IMAGE, "touch", "/made").returncode == 0
    r = lamina("commit", "-m", "the message", "-a", "A. Name <a@example.org>", "src", "msg:1")
    assert r.returncode == 0, r.stderr
    out = lamina("history", "msg:1").stdout.splitlines()
    assert "touch /made" in out[1] and out[1].rstrip().endswith("the message")
    assert lamina("inspect", "--format", "{{.Author}}", "msg:1").stdout.strip() == "A. Name <a@example.org>"
    for change in ("RUN true", "FROM scratch", "ADD a b"):
        r = lamina("commit", "--change", change, "src", "bad:1")
        assert r.returncode == 1 and "not a valid change command" in r.stderr and r.stderr.count("\n") == 1
    assert "bad" not in lamina("images").stdout  # nothing made
    r = lamina("commit", "--change", "ONBUILD RUN echo child", "--change", "STOPSIGNAL SIGINT",
               "--change", "WORKDIR /srv", "--change", "USER 1:1", "src", "more:1")
    assert r.returncode == 0, r.stderr
    config = json.loads(lamina("inspect", "--format", "{{json .Config}}", "more:1").stdout)
    assert (config["OnBuild"], config["StopSignal"], config["WorkingDir"], config["User"]) == \
        (["RUN echo child"], "SIGINT", "/srv", "1:1")


def test_commit_running_container_with_pause(lamina: Lamina) -> None:
    assert lamina("run", "-d", "--name", "live", IMAGE, "sh", "-c",
                  "echo state > /state; exec sleep 60").returncode == 0
    assert lamina("exec", "live", "cat", "/state").stdout == "state\n"
    for tag, flags in (("p", ["-p"]), ("nopause", ["--pause=false"]), ("default", [])):
        r = lamina("commit", *flags, "live", f"live:{tag}")
        assert r.returncode == 0, r.stderr
        assert lamina("run", "--rm", f"live:{tag}", "cat", "/state").stdout == "state\n"
    assert lamina("exec", "live", "true").returncode == 0  # running again after the pause
    # the committed command is the container's
    config = json.loads(lamina("inspect", "--format", "{{json .Config}}", "live:p").stdout)
    assert config["Cmd"] == ["sh", "-c", "echo state > /state; exec sleep 60"]


HEALTHCHECKS = ["HEALTHCHECK --interval=5s --timeout=3s --retries=2 --start-period=1s CMD cat /etc/passwd",
                'HEALTHCHECK CMD ["/bin/test", "-e", "/etc/passwd"]', "HEALTHCHECK NONE"]


def test_commit_change_healthcheck_as_a_dockerfile_gives_it(lamina: Lamina, podman: object, tmp_path: Path) -> None:
    """docker's commit dispatches ``--change HEALTHCHECK ...`` through its builder, so the image gets
    what the same line in a Dockerfile gives. podman 4.3 refuses HEALTHCHECK in commit --change, so
    its build (docker format, which keeps health checks) is the reference."""
    archive = tmp_path / "busybox.tar"
    lamina("save", IMAGE, "-o", str(archive), check=True)
    run_podman(podman, "load", "-i", str(archive))
    assert lamina("run", "--name", "hc-src", IMAGE, "true").returncode == 0
    for number, change in enumerate(HEALTHCHECKS):
        (tmp_path / "Dockerfile").write_text(f"FROM {IMAGE}\n{change}\n")
        run_podman(podman, "build", "--format", "docker", "-t", f"hc-{number}", str(tmp_path))
        theirs = json.loads(run_podman(podman, "image", "inspect", "--format", "{{json .Config.Healthcheck}}",
                                       f"hc-{number}").stdout)
        r = lamina("commit", "--change", change, "hc-src", f"hc-{number}")
        assert r.returncode == 0, r.stderr
        ours = json.loads(lamina("inspect", "--format", "{{json .Config.Healthcheck}}", f"hc-{number}").stdout)
        assert ours == theirs, change
    assert theirs == {"Test": ["NONE"]}
    # The committed check runs: a container of the image becomes healthy.
    assert lamina("run", "-d", "--name", "hc-run", "hc-0", "sleep", "30").returncode == 0
    try:
        status = ""
        for _ in range(100):
            status = lamina("inspect", "--format", "{{.State.Health.Status}}", "hc-run").stdout.strip()
            if status == "healthy":
                break
            time.sleep(0.1)
        assert status == "healthy"
    finally:
        lamina("rm", "-f", "hc-run")
    for bad, message in (("HEALTHCHECK FOO", "HEALTHCHECK requires NONE or CMD"),
                         ("HEALTHCHECK --interval=1 CMD true", "invalid --interval=1"),
                         ("HEALTHCHECK CMD", "HEALTHCHECK CMD requires a command")):
        r = lamina("commit", "--change", bad, "hc-src", "hc-bad")
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "hc-bad" not in lamina("images").stdout
