"""End to end, as root: the docker user's day with lamina on the busybox base.

One image is built per module (WORKDIR, COPY, ENV, RUN, USER, ENTRYPOINT, CMD) and every test uses
it the way a docker user would: run with flags, exit codes, volumes, detached containers and logs,
commit and diff, save / rmi / load, tag, history and the inspect fields scripts read.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT, docker_error_code, fuse_mounts_under

pytestmark = [pytest.mark.root, pytest.mark.fuse]

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]

DOCKERFILE = """\
FROM lamina/busybox
WORKDIR /app
COPY hello.sh ./
ENV GREETING=hello NAME=world
RUN chmod 755 hello.sh && mkdir /d && for i in 1 2 3 4 5 6 7 8; do echo $i > /d/f$i; done \\
    && echo 'app:x:1234:1234::/app:/bin/sh' >> /etc/passwd
RUN rm -rf /d && mkdir /d && echo y > /d/y
USER app
ENTRYPOINT ["/app/hello.sh"]
CMD ["default-arg"]
"""

HELLO = '#!/bin/sh\necho "$GREETING $NAME|$*|$(pwd)|$(id -u)"\n'
IMAGE = "e2e/app"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-flow") / "root"


@pytest.fixture(scope="module")
def lamina(root: Path) -> Iterator[Lamina]:
    """``lamina(*args, check=False)`` on the module's store; removes every container at the end."""

    def run(*args: str, check: bool = False, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "lamina", "--root", str(root), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
        assert "Traceback" not in result.stderr, result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    run.root = root  # type: ignore[attr-defined]
    yield run
    ids = run("ps", "-aq").stdout.split()
    if ids:
        run("rm", "-f", *ids)
    assert fuse_mounts_under(root) == []


@pytest.fixture(scope="module")
def image(lamina: Lamina, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("e2e-context")
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "hello.sh").write_text(HELLO)
    built = lamina("build", "-t", IMAGE, str(context), check=True)
    assert "STEP 9/9: CMD" in built.stdout
    return IMAGE


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == docker_error_code(result.args), (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina: error: "), result.stderr
    return lines[0]


def test_run_combines_entrypoint_cmd_env_workdir_user(lamina: Lamina, image: str) -> None:
    assert lamina("run", "--rm", image, check=True).stdout == "hello world|default-arg|/app|1234\n"
    # Arguments replace CMD; -e overrides ENV; -w and -u override WORKDIR and USER.
    r = lamina("run", "--rm", "-e", "NAME=docker", "-w", "/tmp", "-u", "0", image, "a", "b c", check=True)
    assert r.stdout == "hello docker|a b c|/tmp|0\n"


def test_rm_rf_then_mkdir_hides_every_lower_file(lamina: Lamina, image: str) -> None:
    r = lamina("run", "--rm", "--entrypoint", "sh", image, "-c", "ls -A /d; cat /d/y; ls /d/f1", check=False)
    assert r.returncode == 1
    assert r.stdout == "y\ny\n"
    assert "/d/f1" in r.stderr


def test_exit_codes_like_docker(lamina: Lamina, image: str) -> None:
    assert lamina("run", "--rm", "--entrypoint", "true", image).returncode == 0
    assert lamina("run", "--rm", "--entrypoint", "sh", image, "-c", "exit 3").returncode == 3
    r = lamina("run", "--rm", "--entrypoint", "/etc/passwd", image)
    assert r.returncode == 126 and r.stderr.startswith("lamina: error: "), r.stderr
    r = lamina("run", "--rm", "--entrypoint", "no-such-command", image)
    assert r.returncode == 127 and "no-such-command" in r.stderr
    assert "--no-such-flag" in one_error_line(lamina("run", "--rm", "--no-such-flag", image))
    assert lamina("ps", "-aq").stdout == ""


def test_volumes_read_write_and_read_only(lamina: Lamina, image: str, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from host\n")
    r = lamina("run", "--rm", "-u", "0", "-v", f"{tmp_path}:/data", "--entrypoint", "sh", image, "-c",
               "cat /data/in.txt; echo from container > /data/out.txt", check=True)
    assert r.stdout == "from host\n"
    assert (tmp_path / "out.txt").read_text() == "from container\n"
    r = lamina("run", "--rm", "-u", "0", "-v", f"{tmp_path}:/data:ro", "--entrypoint", "sh", image, "-c",
               "echo x > /data/in.txt")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert (tmp_path / "in.txt").read_text() == "from host\n"


def test_detached_logs_stop_rm(lamina: Lamina, image: str) -> None:
    script = 'echo started; trap "echo stopping; exit 7" TERM; while :; do sleep 0.1; done'
    cid = lamina("run", "-d", "--name", "e2e-bg", "--entrypoint", "sh", image, "-c", script,
                 check=True).stdout.strip()
    assert len(cid) == 64
    deadline = time.monotonic() + 30
    while "started" not in lamina("logs", "e2e-bg").stdout:
        assert time.monotonic() < deadline, "the detached container never logged"
        time.sleep(0.2)
    assert lamina("ps", "-q").stdout.split() == [cid[:12]]
    assert lamina("stop", "-t", "10", "e2e-bg", check=True).stdout.strip() == "e2e-bg"
    assert lamina("logs", "e2e-bg", check=True).stdout == "started\nstopping\n"
    state = json.loads(lamina("inspect", "e2e-bg", check=True).stdout)[0]["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 7
    assert "Exited (7)" in lamina("ps", "-a").stdout
    # What scripts do to find a container and read its result.
    assert lamina("ps", "-aq", "--filter", "name=e2e-bg", check=True).stdout == cid[:12] + "\n"
    assert lamina("ps", "-a", "--filter", "name=e2e-bg", "--format", "{{.Names}}", check=True).stdout == "e2e-bg\n"
    assert lamina("inspect", "--format", "{{.State.ExitCode}}", "e2e-bg", check=True).stdout == "7\n"
    lamina("rm", "e2e-bg", check=True)
    assert cid[:12] not in lamina("ps", "-aq").stdout
    assert "e2e-bg" in one_error_line(lamina("logs", "e2e-bg"))


def test_logs_replay_stderr_on_stderr(lamina: Lamina, image: str) -> None:
    """docker logs replays a container's stdout on stdout and its stderr on stderr."""
    lamina("run", "-d", "--name", "e2e-streams", "--entrypoint", "sh", image, "-c", "echo out; echo err >&2",
           check=True)
    assert lamina("wait", "e2e-streams", check=True).stdout == "0\n"
    logs = lamina("logs", "e2e-streams", check=True)
    lamina("rm", "e2e-streams", check=True)
    assert (logs.stdout, logs.stderr) == ("out\n", "err\n")


def test_diff_commit_and_run_the_committed_image(lamina: Lamina, image: str) -> None:
    lamina("run", "--name", "e2e-changes", "-u", "0", "--entrypoint", "sh", image, "-c",
           "echo new > /app/new; echo more >> /app/hello.sh; rm /d/y; mkdir -p /x/y;"
           "rm -rf /usr && mkdir /usr && echo only > /usr/only", check=True)
    diff = lamina("diff", "e2e-changes", check=True).stdout.splitlines()
    for line in ("C /app", "A /app/new", "C /app/hello.sh", "C /d", "D /d/y", "A /x", "A /x/y"):
        assert line in diff
    assert not any(line.endswith(("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")) for line in diff)
    # commit records the container's config as run (entrypoint sh, its -c script, user 0), as
    # docker does; --change puts the image's back
    lamina("commit", "e2e-changes", "e2e/as-run", check=True)
    config = json.loads(lamina("inspect", "--format", "{{json .Config}}", "e2e/as-run", check=True).stdout)
    assert (config["Entrypoint"], config["Cmd"][0], config["User"]) == (["sh"], "-c", "0")
    lamina("rmi", "e2e/as-run", check=True)
    committed = lamina("commit", "--change", 'ENTRYPOINT ["/app/hello.sh"]', "--change", 'CMD ["default-arg"]',
                       "--change", "USER app", "e2e-changes", "e2e/committed", check=True).stdout.strip()
    lamina("rm", "e2e-changes", check=True)
    r = lamina("run", "--rm", "e2e/committed", check=True)
    assert r.stdout == "hello world|default-arg|/app|1234\n"
    r = lamina("run", "--rm", "--entrypoint", "sh", "e2e/committed", "-c", "cat /app/new; ls -A /d /x /usr",
               check=True)
    assert r.stdout == "new\n/d:\n\n/usr:\nonly\n\n/x:\ny\n"  # /usr became opaque: bin, sbin gone
    info = json.loads(lamina("inspect", "e2e/committed", check=True).stdout)[0]
    base = json.loads(lamina("inspect", image, check=True).stdout)[0]
    assert info["Id"] == committed
    assert info["RootFS"]["Layers"][:-1] == base["RootFS"]["Layers"]
    lamina("rmi", "e2e/committed", check=True)


def test_inspect_fields_scripts_read(lamina: Lamina, image: str) -> None:
    info = json.loads(lamina("inspect", image, check=True).stdout)[0]
    assert info["Id"].startswith("sha256:") and len(info["Id"]) == 71
    assert lamina("images", "-q", image, check=True).stdout.strip() == info["Id"][7:19]
    config = info["Config"]
    assert config["Cmd"] == ["default-arg"] and config["Entrypoint"] == ["/app/hello.sh"]
    assert "GREETING=hello" in config["Env"] and "NAME=world" in config["Env"]
    assert config["WorkingDir"] == "/app" and config["User"] == "app"
    # base, COPY, two RUNs: WORKDIR makes a layer too in docker's builder when /app is created.
    assert len(info["RootFS"]["Layers"]) == len(set(info["RootFS"]["Layers"])) >= 4
    assert all(layer.startswith("sha256:") for layer in info["RootFS"]["Layers"])
    assert lamina("inspect", "--format", "{{.Config.Cmd}}", image, check=True).stdout == "[default-arg]\n"


def test_tag_history_save_rmi_load_run(lamina: Lamina, image: str, tmp_path: Path) -> None:
    lamina("tag", image, "e2e/app:v1", check=True)
    short_id = lamina("images", "-q", image, check=True).stdout.strip()
    rows = [line.split() for line in lamina("images", check=True).stdout.splitlines()[1:]]
    assert sorted(row[:3] for row in rows if row[0] == "e2e/app") == [
        ["e2e/app", "latest", short_id], ["e2e/app", "v1", short_id]]
    history = lamina("history", "e2e/app:v1", check=True).stdout.splitlines()
    assert history[0].split()[:3] == ["IMAGE", "CREATED", "CREATED"]
    assert 'CMD ["default-arg"]' in history[1]
    assert any("rm -rf /d" in line for line in history)
    before = json.loads(lamina("inspect", "e2e/app:v1", check=True).stdout)[0]

    archive = tmp_path / "app.tar"
    lamina("save", "-o", str(archive), "e2e/app:v1", check=True)
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert manifest[0]["RepoTags"] == ["e2e/app:v1"]
        # The rm -rf layer carries d/ as an opaque directory, as docker's would.
        opaque = [name for name in manifest[0]["Layers"]
                  if "d/.wh..wh..opq" in tarfile.open(fileobj=outer.extractfile(name)).getnames()]
        assert len(opaque) == 1

    lamina("rmi", "e2e/app:v1", check=True)
    assert "e2e/app:v1" in one_error_line(lamina("run", "--rm", "--pull", "never", "e2e/app:v1"))
    assert "e2e/app:v1" in lamina("load", "-i", str(archive), check=True).stdout
    after = json.loads(lamina("inspect", "e2e/app:v1", check=True).stdout)[0]
    assert after["Id"] == before["Id"] and after["RootFS"] == before["RootFS"]
    assert lamina("run", "--rm", "e2e/app:v1", "again", check=True).stdout == "hello world|again|/app|1234\n"
    assert lamina("system", "check", check=True).returncode == 0


def test_volume_directory_exists_for_later_steps(lamina: Lamina, tmp_path: Path) -> None:
    """``VOLUME /data`` then ``RUN`` writing there builds with docker (the mount point exists)."""
    (tmp_path / "Dockerfile").write_text("FROM lamina/busybox\nVOLUME /data\nRUN ls -d /data\n"
                                         'CMD ["sh", "-c", "echo hi > /data/x && cat /data/x"]\n')
    built = lamina("build", "-q", "-t", "e2e/volume", str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert lamina("run", "--rm", "e2e/volume", check=True).stdout == "hi\n"


def test_multi_stage_dockerignore_add_and_cache(lamina: Lamina, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "keep.txt").write_text("keep\n")
    (tmp_path / "src" / "secret.key").write_text("secret\n")
    (tmp_path / ".dockerignore").write_text("# keys stay out\n**/*.key\n")
    payload = tmp_path / "payload"
    (payload / "t").mkdir(parents=True)
    (payload / "t" / "f").write_text("from tar\n")
    with tarfile.open(tmp_path / "stuff.tar.gz", "w:gz") as tar:
        tar.add(payload / "t", arcname="t")
    (tmp_path / "Dockerfile").write_text(
        "ARG VERSION=1\n"
        "FROM lamina/busybox AS builder\n"
        "ARG VERSION\n"
        'RUN mkdir /out && echo "built v$VERSION" > /out/artifact\n'
        "FROM lamina/busybox\n"
        "LABEL org.example.stage=final\n"
        "COPY --from=builder /out/artifact /srv/\n"
        "COPY src/ /srv/src/\n"
        "ADD stuff.tar.gz /srv/\n"
        'CMD ["sh", "-c", "cat /srv/artifact /srv/t/f; ls -A /srv/src"]\n')
    first = lamina("build", "--build-arg", "VERSION=7", "-t", "e2e/multi", str(tmp_path), check=True)
    assert "CACHED" not in first.stdout
    assert lamina("run", "--rm", "e2e/multi", check=True).stdout == "built v7\nfrom tar\nkeep.txt\n"
    again = lamina("build", "--build-arg", "VERSION=7", "-t", "e2e/multi", str(tmp_path), check=True)
    assert again.stdout.count("CACHED") >= 5
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # the same image ID
    # A changed source invalidates its COPY and what follows, not what came before.
    (tmp_path / "src" / "keep.txt").write_text("changed\n")
    third = lamina("build", "--build-arg", "VERSION=7", "-t", "e2e/multi", str(tmp_path), check=True)
    assert third.stdout.splitlines()[-1] != first.stdout.splitlines()[-1]
    labels = json.loads(lamina("inspect", "e2e/multi", check=True).stdout)[0]["Config"]["Labels"]
    assert labels == {"org.example.stage": "final"}


def test_parallel_builds_and_runs_share_one_store(lamina: Lamina, tmp_path: Path) -> None:
    procs = []
    for i in range(3):
        context = tmp_path / f"c{i}"
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM lamina/busybox\nRUN echo {i} > /n && mkdir /d && touch /d/x\nRUN rm -rf /d && mkdir /d\n"
            'CMD ["cat", "/n"]\n')
        procs.append(subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(lamina.root),  # type: ignore[attr-defined]
                                       "build", "-q", "-t", f"e2e/par{i}", str(context)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in err, err
    runs = [subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(lamina.root),  # type: ignore[attr-defined]
                              "run", "--rm", f"e2e/par{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(3)]
    assert [proc.communicate(timeout=120)[0] for proc in runs] == ["0\n", "1\n", "2\n"]
    assert lamina("system", "check").returncode == 0
    assert lamina("ps", "-aq").stdout == ""


def test_pull_messages_have_no_terminal_escapes_in_a_pipe(lamina: Lamina) -> None:
    """A missing image on an unreachable registry: plain text on a non-terminal stderr, exit 125."""
    r = lamina("run", "--rm", "127.0.0.1:9/e2e/missing:1")
    assert r.returncode == 125 and r.stderr.splitlines()[-1].startswith("lamina: error: ")
    assert "\x1b" not in r.stderr and "\r" not in r.stderr, repr(r.stderr)


def test_killed_lamina_leaves_no_container_process_or_mount(lamina: Lamina, root: Path) -> None:
    """kill -9 of a foreground ``lamina run``: the container dies too, and the next commands cope."""
    marker = "73.5"  # an unusual sleep argument to find the container's process by
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "run", "--name", "e2e-crash",
                             "lamina/busybox", "sh", "-c", f"echo up; sleep {marker}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    finally:
        proc.kill()
        proc.wait()

    def container_processes() -> list[str]:
        found = []
        for status in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if status.read_bytes() == f"sleep\0{marker}\0".encode():
                    found.append(status.parent.name)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 15
    while container_processes():
        assert time.monotonic() < deadline, "the container outlived lamina"
        time.sleep(0.2)
    assert "Exited" in next(line for line in lamina("ps", "-a").stdout.splitlines() if "e2e-crash" in line)
    lamina("rm", "e2e-crash", check=True)
    assert fuse_mounts_under(root) == []
    assert lamina("system", "check").returncode == 0


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_commit_push_rmi_then_run_pulls_only_the_missing_layer(lamina: Lamina, tmp_path: Path) -> None:
    from registry_server import run_registry

    with run_registry(tmp_path / "registry") as registry:
        ref = f"{registry.address}/e2e/pushed:1"
        lamina("run", "--name", "e2e-pushme", "lamina/busybox", "sh", "-c", "echo pushed > /p", check=True)
        lamina("commit", "e2e-pushme", ref, check=True)
        lamina("rm", "e2e-pushme", check=True)
        pushed = json.loads(lamina("inspect", ref, check=True).stdout)[0]
        lamina("push", "--tls-verify=false", ref, check=True)
        lamina("rmi", ref, check=True)
        assert ref not in lamina("images", check=True).stdout
        # docker run pulls a missing image; the base layer is in the store already.
        r = lamina("run", "--rm", ref, "cat", "/p", check=True)
        assert r.stdout == "pushed\n"
        pulled = json.loads(lamina("inspect", ref, check=True).stdout)[0]
        assert pulled["Id"] == pushed["Id"] and pulled["RootFS"] == pushed["RootFS"]
        layer_gets = [d for d in registry.blob_gets() if d != pushed["Id"]]
        assert len(layer_gets) == 1, registry.access_log()
        lamina("rmi", ref, check=True)
        # docker treats registries on 127.0.0.0/8 as insecure by default (the local-registry tutorial):
        # pull and push need no flag there, as `run` already does.
        lamina("pull", ref, check=True)
        lamina("push", ref, check=True)


def test_which_and_layers_explain_the_rm_rf_layer(lamina: Lamina, image: str) -> None:
    """The learner's questions on the same image: where did /d/f1 go, and which layer made /d opaque?"""
    report = json.loads(lamina("layers", "--json", image, check=True).stdout)
    rm_layer = next(layer for layer in report["layers"] if "rm -rf /d" in layer["instruction"])
    assert rm_layer["opaque_dirs"] == ["/d"]
    gone = json.loads(lamina("which", "--json", image, "/d/f1", check=True).stdout)
    assert gone["present"] is False
    assert [event["layer"] for event in gone["history"] if event["event"] != "added"] == [rm_layer["layer"]]
    kept = json.loads(lamina("which", "--json", image, "/d/y", check=True).stdout)
    assert kept["provided_by"]["layer"] == rm_layer["layer"]


def test_create_start_wait_and_detached_rm(lamina: Lamina, image: str) -> None:
    lamina("create", "--name", "e2e-created", "--entrypoint", "sh", image, "-c", "exit 4", check=True)
    assert "Created" in next(line for line in lamina("ps", "-a").stdout.splitlines() if "e2e-created" in line)
    lamina("start", "e2e-created", check=True)
    assert lamina("wait", "e2e-created", check=True).stdout == "4\n"
    lamina("rm", "e2e-created", check=True)
    # -d --rm: gone once it has exited.
    lamina("run", "-d", "--rm", "--name", "e2e-gone", "--entrypoint", "true", image, check=True)
    deadline = time.monotonic() + 20
    while "e2e-gone" in lamina("ps", "-a").stdout:
        assert time.monotonic() < deadline, "a -d --rm container was not removed after it exited"
        time.sleep(0.2)


@pytest.mark.parametrize(("signum", "when", "delay"), [
    (signal.SIGINT, "started", 0.0), (signal.SIGTERM, "started", 0.0),
    (signal.SIGTERM, "STEP 2/2", 0.1), (signal.SIGINT, "STEP 2/2", 0.4)],
    ids=["SIGINT-in-RUN", "SIGTERM-in-RUN", "SIGTERM-in-RUN-setup", "SIGINT-in-RUN-setup"])
def test_interrupted_build_stops_and_tags_nothing(lamina: Lamina, image: str, root: Path, tmp_path: Path,
                                                  signum: signal.Signals, when: str, delay: float) -> None:
    """Ctrl-C (or a CI cancel's SIGTERM) during a RUN cancels the build, as with docker: the RUN is
    stopped, the command fails, and no image or tag appears; also when the signal comes while the
    RUN's sandbox is still being set up."""
    (tmp_path / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo started; sleep 7.25; echo finished\n")
    images = lamina("images", "-q").stdout
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "build", "-t", "e2e/cancelled",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A shell's background job would inherit SIGINT ignored; a terminal's would not.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        while when not in (line := proc.stdout.readline()):
            assert line, "the build ended before its RUN started"
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=6)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and "finished" not in out and "Traceback" not in err, (out, err)
    assert lamina("images", "-q").stdout == images
    assert "e2e/cancelled" not in lamina("images").stdout
    assert fuse_mounts_under(root) == []


def test_a_store_path_with_space_comma_and_colon(tmp_path: Path) -> None:
    """LAMINA_ROOT under a home like '/home/Jo Doe/data,v1:old' still builds, runs and commits (the
    union filesystem's option string must escape and unescape those characters)."""
    root = tmp_path / "my store,v1:old"
    env = {**os.environ, "LAMINA_ROOT": str(root)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True,
                                timeout=120, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 0, (args, result.stderr)
        return result

    try:
        (tmp_path / "Dockerfile").write_text('FROM lamina/busybox\nRUN echo built > /b\nCMD ["cat", "/b"]\n')
        run("build", "-q", "-t", "e2e/odd", str(tmp_path))
        run("run", "--name", "odd", "e2e/odd", "sh", "-c", "echo more >> /b")
        run("commit", "--change", 'CMD ["cat", "/b"]', "odd", "e2e/odd2")  # not the container's sh -c
        assert run("run", "--rm", "e2e/odd2").stdout == "built\nmore\n"
    finally:
        subprocess.run([sys.executable, "-m", "lamina", "rm", "-f", "odd"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL)
    assert fuse_mounts_under(root) == []
