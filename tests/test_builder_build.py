"""`lamina build` end to end, from the embedded busybox base: every instruction, layers, cache.

Each build runs the real CLI in a subprocess; results are checked by running the image
(`lamina run`) or by reading its config and layer tars from the store.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from harness import REPO_ROOT, UnprivilegedUser

pytestmark = pytest.mark.fuse


class Lamina:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(self.root), *args],
                                input=input, capture_output=True, text=True, timeout=300,
                                cwd=cwd or REPO_ROOT, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def build(self, context: Path, dockerfile: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        (context / "Dockerfile").write_text(dockerfile)
        return self("build", *args, str(context), check=check)

    def image(self, ref: str) -> dict:
        from lamina.store import Store

        image = Store.open(self.root).resolve_image(ref)
        return {"id": image.id, "config": image.config, "layers": [layer.digest for layer in image.layers]}

    def layer_members(self, digest: str) -> list[str]:
        blob = self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        with tarfile.open(blob) as tar:
            return [m.name for m in tar.getmembers()]

    def run(self, image: str, script: str | None = None) -> str:
        command = ["sh", "-c", script] if script is not None else []
        return self("run", "--rm", "--network", "none", image, *command).stdout


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("build-root")
    Lamina(root)("images")  # creates the store; the base is made on first use
    return root


@pytest.fixture
def lamina(shared_root: Path) -> Lamina:
    return Lamina(shared_root)


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    context = tmp_path / "ctx"
    context.mkdir()
    return context


def test_every_instruction(lamina: Lamina, ctx: Path) -> None:
    (ctx / "hello.txt").write_text("hello from the context\n")
    (ctx / "a.conf").write_text("a\n")
    (ctx / "b.conf").write_text("b\n")
    payload = ctx / "payload"
    payload.mkdir()
    (payload / "inner.txt").write_text("inside the tar\n")
    with tarfile.open(ctx / "payload.tar.gz", "w:gz") as tar:
        tar.add(payload / "inner.txt", arcname="extracted/inner.txt")
    dockerfile = """\
# syntax=docker/dockerfile:1
ARG BASE=lamina/busybox
FROM $BASE AS base
ARG VERSION=1.0
ENV APP_HOME=/srv/app \\
    GREETING="hello world"
LABEL org.example.version=$VERSION "org.example.title"="every instruction"
MAINTAINER someone <someone@example.com>
EXPOSE 8080 53/udp
VOLUME ["/data"]
WORKDIR $APP_HOME
COPY hello.txt ./
COPY *.conf conf/
COPY --chmod=0750 --chown=1234:5678 hello.txt /owned/hello.txt
ADD payload.tar.gz /opt/
COPY <<EOF /srv/app/generated.txt
version=${VERSION} home=$APP_HOME
EOF
RUN <<SCRIPT
set -e
echo "$GREETING" > /srv/app/greeting
echo "version $VERSION" >> /srv/app/greeting
SCRIPT
SHELL ["/bin/sh", "-ec"]
RUN echo shell-form-run > /srv/app/shell.txt
ONBUILD RUN echo onbuild-trigger > /tmp/onbuild.txt
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=30s --retries=2 CMD test -f /srv/app/greeting
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /srv/app/greeting"]
"""
    result = lamina.build(ctx, dockerfile, "-t", "every:1", "--build-arg", "VERSION=2.5")
    assert "STEP 1/22: FROM $BASE AS base" in result.stdout
    assert "Successfully tagged every:1" in result.stdout
    image = lamina.image("every:1")
    config = image["config"]["config"]
    assert config["Env"][-2:] == ["APP_HOME=/srv/app", "GREETING=hello world"]
    assert config["Labels"] == {"org.example.version": "2.5", "org.example.title": "every instruction"}
    assert image["config"]["author"] == "someone <someone@example.com>"
    assert config["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert config["Volumes"] == {"/data": {}}
    assert config["WorkingDir"] == "/srv/app"
    assert config["StopSignal"] == "SIGQUIT"
    assert config["Healthcheck"] == {"Test": ["CMD-SHELL", "test -f /srv/app/greeting"],
                                     "Interval": 30_000_000_000, "Retries": 2}
    assert config["OnBuild"] == ["RUN echo onbuild-trigger > /tmp/onbuild.txt"]
    assert config["Shell"] == ["/bin/sh", "-ec"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["Cmd"] == ["cat /srv/app/greeting"]
    history = image["config"]["history"]
    assert any(h.get("created_by", "").startswith("ENV APP_HOME") and h.get("empty_layer") for h in history)

    assert lamina.run("every:1") == "hello world\nversion 2.5\n"
    # The image's ENTRYPOINT is `sh -c`: the command is a script.
    listing = lamina("run", "--rm", "every:1", "cd /srv/app && cat hello.txt conf/a.conf conf/b.conf generated.txt "
                                    "shell.txt /opt/extracted/inner.txt && stat -c '%u:%g %a' /owned/hello.txt").stdout
    assert listing == ("hello from the context\na\nb\nversion=2.5 home=/srv/app\nshell-form-run\n"
                       "inside the tar\n1234:5678 750\n")

    # ONBUILD triggers run in the child build, and are not inherited further.
    child = ctx / "child"
    child.mkdir()
    lamina.build(child, "FROM every:1\nUSER 0\nRUN true\n", "-t", "every-child")
    assert lamina("run", "--rm", "every-child", "cat /tmp/onbuild.txt").stdout == "onbuild-trigger\n"
    assert "OnBuild" not in lamina.image("every-child")["config"]["config"]


def test_opaque_directory_layer(lamina: Lamina, ctx: Path) -> None:
    dockerfile = ("FROM lamina/busybox\nRUN mkdir -p /d/sub && for i in 1 2 3; do echo $i > /d/f$i; done\n"
                  "RUN rm -rf /d && mkdir /d && echo y > /d/y\n")
    lamina.build(ctx, dockerfile, "-t", "opaque")
    image = lamina.image("opaque")
    members = lamina.layer_members(image["layers"][-1])
    assert "d/.wh..wh..opq" in members
    assert sorted(m for m in members if m.startswith("d/")) == ["d/.wh..wh..opq", "d/y"]
    assert lamina.run("opaque", "ls -A /d") == "y\n"


def test_renamed_lower_directory(lamina: Lamina, ctx: Path) -> None:
    dockerfile = ("FROM lamina/busybox\nRUN mkdir -p /m/sub && echo m > /m/sub/f\n"
                  "RUN mv /m /moved && echo new > /moved/new\n")
    lamina.build(ctx, dockerfile, "-t", "renamed")
    assert lamina.run("renamed", "cat /moved/sub/f /moved/new; test -e /m || echo gone") == "m\nnew\ngone\n"


def test_scaffolding_never_lands_in_a_layer(lamina: Lamina, ctx: Path) -> None:
    dockerfile = ("FROM lamina/busybox\n"
                  "RUN --mount=type=cache,target=/var/cache/thing --mount=type=tmpfs,target=/scratch "
                  "cat /etc/hosts /etc/resolv.conf > /dev/null && ls /proc/self > /dev/null && "
                  "echo cached > /var/cache/thing/f && echo t > /scratch/t && echo made > /made\n")
    lamina.build(ctx, dockerfile, "-t", "scaffold")
    members = lamina.layer_members(lamina.image("scaffold")["layers"][-1])
    assert members == ["made"]


def test_failing_run_leaves_the_store_unchanged(lamina: Lamina, ctx: Path, shared_root: Path) -> None:
    lamina.build(ctx, "FROM lamina/busybox\n", "-t", "before-failing")  # the store has tags
    before = (shared_root / "images" / "tags.json").read_text()
    images_before = sorted(p.name for p in (shared_root / "images").iterdir())
    result = lamina.build(ctx, "FROM lamina/busybox\nRUN echo visible-output && exit 3\nRUN true\n",
                          "-t", "failing", check=False)
    assert result.returncode != 0
    assert "visible-output" in result.stdout + result.stderr
    assert "lamina: error: Dockerfile:2: The command '/bin/sh -c echo visible-output && exit 3' " \
           "returned a non-zero code: 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert (shared_root / "images" / "tags.json").read_text() == before
    assert sorted(p.name for p in (shared_root / "images").iterdir()) == images_before
    assert list((shared_root / "tmp").glob("*build-step*")) == []
    quiet = lamina.build(ctx, "FROM lamina/busybox\nRUN echo quiet-but-failing && exit 4\n", "-q", check=False)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert "quiet-but-failing" in quiet.stderr and "returned a non-zero code: 4" in quiet.stderr


def test_malformed_dockerfile(lamina: Lamina, ctx: Path) -> None:
    result = lamina.build(ctx, "FROM lamina/busybox\n\nRUN true\nFORM busybox\n", check=False)
    assert result.returncode == 1
    assert result.stderr == "lamina: error: Dockerfile:4: unknown instruction: FORM: 'FORM busybox'\n"
    result = lamina.build(ctx, "FROM lamina/busybox\nCOPY missing.txt /\n", check=False)
    assert result.returncode == 1
    assert "Dockerfile:2: COPY failed: 'missing.txt': not found in the build context" in result.stderr
    result = lamina.build(ctx, "FROM no-such-image-here\n", check=False)
    assert result.returncode == 1 and "Dockerfile:1" in result.stderr and "Traceback" not in result.stderr


def test_cache_hits_and_invalidation(lamina: Lamina, ctx: Path, tmp_path: Path) -> None:
    (ctx / "file.txt").write_text("one\n")
    dockerfile = f"FROM lamina/busybox\nRUN echo {tmp_path.name} > /marker\nCOPY file.txt /\nRUN cat /file.txt\n"
    first = lamina.build(ctx, dockerfile, "-t", "cached")
    assert "CACHED" not in first.stdout
    second = lamina.build(ctx, dockerfile, "-t", "cached")
    assert second.stdout.count("--> CACHED") == 3
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]  # same image ID
    (ctx / "file.txt").write_text("two\n")
    third = lamina.build(ctx, dockerfile, "-t", "cached")
    assert third.stdout.count("--> CACHED") == 1  # only the RUN before the COPY
    assert "two" in third.stdout
    fourth = lamina.build(ctx, dockerfile, "-t", "cached", "--no-cache")
    assert "CACHED" not in fourth.stdout
    quiet = lamina.build(ctx, dockerfile, "-q", "-t", "cached")
    assert quiet.stdout == lamina.image("cached")["id"] + "\n"


def test_multistage_target_builds_only_needed_stages(lamina: Lamina, ctx: Path) -> None:
    dockerfile = """\
FROM lamina/busybox AS builder
RUN mkdir /out && echo artifact > /out/artifact && \\
    echo owned > /out/owned && chown 4321:4321 /out/owned
FROM scratch AS unrelated
RUN this stage must not be built
FROM lamina/busybox AS final
COPY --from=builder /out/ /app/
COPY --from=builder /etc/passwd /etc/passwd
FROM final AS extra
RUN false
"""
    result = lamina.build(ctx, dockerfile, "--target", "final", "-t", "multi")
    assert "must not be built" not in result.stdout and "RUN false" not in result.stdout
    assert lamina.run("multi", "cat /app/artifact && stat -c %u /app/owned") == "artifact\n4321\n"


def test_dockerignore_and_stdin_dockerfile(lamina: Lamina, ctx: Path) -> None:
    (ctx / "keep.txt").write_text("keep\n")
    (ctx / "secret.key").write_text("secret\n")
    (ctx / "logs").mkdir()
    (ctx / "logs" / "a.log").write_text("log\n")
    (ctx / "logs" / "important.log").write_text("important\n")
    (ctx / ".dockerignore").write_text("*.key\nlogs\n!logs/important.log\n")
    result = lamina("build", "-f", "-", "-t", "ignored", str(ctx),
                    input="FROM lamina/busybox\nCOPY . /ctx/\n")
    assert "Successfully tagged" in result.stdout
    listing = lamina.run("ignored", "find /ctx -type f | sort")
    assert listing == "/ctx/.dockerignore\n/ctx/keep.txt\n/ctx/logs/important.log\n"


def test_variables_and_build_args(lamina: Lamina, ctx: Path) -> None:
    dockerfile = """\
ARG TAG=latest
FROM lamina/busybox:${TAG}
ARG WHO
ARG UNSET
ENV WHO=${WHO:-nobody} ALT=${UNSET:+set} DEFAULTED=${UNSET-dflt}
RUN echo "who=$WHO alt=[$ALT] d=$DEFAULTED" > /vars
"""
    result = lamina.build(ctx, dockerfile, "-t", "vars", "--build-arg", "WHO=me", "--build-arg", "EXTRA=1")
    assert "[Warning] one or more build-args ['EXTRA'] were not consumed" in result.stdout
    assert lamina.run("vars", "cat /vars") == "who=me alt=[] d=dflt\n"


@pytest.mark.unprivileged
@pytest.mark.slow
def test_unprivileged_build(unpriv: UnprivilegedUser) -> None:
    """A build as a user without root: RUN (with a chown inside), COPY --chown, cache, run."""
    ctx = unpriv.workdir / "ctx"
    ctx.mkdir()
    (ctx / "app.txt").write_text("app file\n")
    # Without subordinate ids only container root is mapped: chown to another id is impossible
    # inside the sandbox (the kernel refuses unmapped ids), as with rootless podman.
    chown = "chown 1:1 /owned" if unpriv.has_subids else "true"
    (ctx / "Dockerfile").write_text(
        "FROM lamina/busybox\n"
        "RUN mkdir -p /d && echo a > /d/a && echo b > /d/b && echo 1:x:1: >> /etc/group\n"
        f"RUN rm -rf /d && mkdir /d && echo y > /d/y && touch /owned && {chown}\n"
        "COPY --chown=7:8 app.txt /app/\n"
        "WORKDIR /app\n"
        'CMD ["sh", "-c", "ls -A /d; stat -c \'%u:%g\' /owned /app/app.txt; cat app.txt"]\n')
    unpriv.chown_tree(ctx)
    result = unpriv.lamina("build", "-t", "unpriv-built", str(ctx))
    assert result.returncode == 0, result.stderr
    again = unpriv.lamina("build", "-t", "unpriv-built", str(ctx))
    assert again.returncode == 0 and again.stdout.count("--> CACHED") == 5, again.stdout + again.stderr
    run = unpriv.lamina("run", "--rm", "--network", "none", "unpriv-built")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert (lines[0], lines[1], lines[3]) == ("y", "1:1" if unpriv.has_subids else "0:0", "app file")
    # Without subordinate ids, ids other than 0 cannot be mapped into the container: how the
    # runtime shows them is its business (overflow id or root); the image records the real owner.
    if unpriv.has_subids:
        assert lines[2] == "7:8"
    store_root = Lamina(unpriv.workdir / "root")
    copy_layer = store_root.image("unpriv-built")["layers"][-1]
    blob = store_root.root / "blobs" / "sha256" / copy_layer.removeprefix("sha256:")
    with tarfile.open(blob) as tar:
        owners = {m.name: (m.uid, m.gid) for m in tar.getmembers()}
    # /app did not exist: BuildKit (and buildah) create a missing parent with the --chown owner.
    assert owners == {"app": (7, 8), "app/app.txt": (7, 8)}
    assert list((unpriv.workdir / "root" / "tmp").glob("*build-*")) == []


def test_add_url_with_checksum_and_run_forms(lamina: Lamina, ctx: Path, tmp_path: Path) -> None:
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "remote.txt").write_text("from the web\n")
    digest = hashlib.sha256(b"from the web\n").hexdigest()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/remote.txt"
        (ctx / "mounted.txt").write_text("bind-mounted\n")
        dockerfile = f"""\
FROM lamina/busybox
ADD --checksum=sha256:{digest} {url} /web/
RUN --mount=type=bind,source=mounted.txt,target=/mnt/m.txt cp /mnt/m.txt /copied.txt
RUN ["/bin/sh", "-c", "echo exec-form > /exec.txt"]
RUN --network=none <<EOF
#!/bin/sh
echo "script via shebang: $0" > /script.txt
EOF
"""
        lamina.build(ctx, dockerfile, "-t", "addurl", "--label", "built.by=test")
        out = lamina.run("addurl", "cat /web/remote.txt /copied.txt /exec.txt /script.txt; test -e /mnt/m.txt || echo gone")
        assert out == "from the web\nbind-mounted\nexec-form\nscript via shebang: /dev/pipes/EOF\ngone\n"
        assert lamina.image("addurl")["config"]["config"]["Labels"] == {"built.by": "test"}
        bad = lamina.build(ctx, f"FROM lamina/busybox\nADD --checksum=sha256:{'0' * 64} {url} /web/\n",
                           check=False)
        assert bad.returncode == 1 and "checksum mismatch" in bad.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_copy_destination_rules(lamina: Lamina, ctx: Path) -> None:
    (ctx / "f.txt").write_text("f\n")
    (ctx / "dir").mkdir()
    (ctx / "dir" / "inner.txt").write_text("inner\n")
    dockerfile = """\
FROM lamina/busybox
WORKDIR /w
COPY f.txt renamed.txt
COPY f.txt /etc/
COPY dir /copied-dir
COPY dir/ /copied-dir2/
COPY --from=lamina/busybox /bin/busybox /from-image/busybox
USER 1234:99
WORKDIR /home/user/work
"""
    lamina.build(ctx, dockerfile, "-t", "destrules")
    out = lamina.run("destrules", "cat /w/renamed.txt /etc/f.txt /copied-dir/inner.txt /copied-dir2/inner.txt; "
                                  "test -x /from-image/busybox && echo exe; test -d /copied-dir/dir || echo flat; "
                                  "stat -c %u:%g /home/user/work")
    assert out == "f\nf\ninner\ninner\nexe\nflat\n1234:99\n"
    many = lamina.build(ctx, "FROM lamina/busybox\nCOPY f.txt dir /nodir\n", check=False)
    assert many.returncode == 1 and "must be a directory and end with a /" in many.stderr
    escape = lamina.build(ctx, "FROM lamina/busybox\nCOPY ../x /\n", check=False)
    assert escape.returncode == 1 and "outside the build context" in escape.stderr


def test_from_registry_image_is_pulled(lamina: Lamina, ctx: Path, tmp_path: Path) -> None:
    from registry_server import run_registry

    with run_registry(tmp_path / "registry") as registry:
        pushed = f"{registry.address}/base/busybox:1"
        lamina("tag", "lamina/busybox", pushed)
        lamina("push", "--tls-verify=false", pushed)
        fresh = Lamina(tmp_path / "fresh-root")
        (ctx / "Dockerfile").write_text(f"FROM {pushed}\nRUN echo pulled > /pulled\n")
        result = fresh("build", "-t", "from-registry", str(ctx))
        assert "Successfully tagged from-registry" in result.stdout
        assert fresh.run("from-registry", "cat /pulled") == "pulled\n"
        def manifest_gets() -> int:
            return sum(1 for method, path, _ in registry.access_log() if method == "GET" and "/manifests/" in path)

        manifests_before = manifest_gets()
        again = fresh("build", "--pull", "-t", "from-registry", str(ctx))
        assert again.stdout.count("--> CACHED") == 1
        assert manifest_gets() > manifests_before
        # docker's --pull is a boolean (buildx's too): =true as bare, =false as absent.
        manifests_before = manifest_gets()
        fresh("build", "--pull=false", "-t", "from-registry", str(ctx))
        assert manifest_gets() == manifests_before
        fresh("build", "--pull=true", "-t", "from-registry", str(ctx))
        assert manifest_gets() > manifests_before
        for value in ("always", "missing"):  # podman's words, not docker's: a flag error, 125
            bad = fresh("build", f"--pull={value}", "-t", "from-registry", str(ctx), check=False)
            assert bad.returncode == 125 and bad.stderr.count("\n") == 1 and "--pull" in bad.stderr, bad.stderr


def test_run_mounts_from_stage_and_persistent_cache(lamina: Lamina, ctx: Path, tmp_path: Path) -> None:
    dockerfile = f"""\
FROM lamina/busybox AS tools
RUN mkdir /out && echo tool-output > /out/tool.txt
FROM lamina/busybox
RUN --mount=type=bind,from=tools,source=/out,target=/in cat /in/tool.txt > /got.txt
RUN --mount=type=cache,id={tmp_path.name},target=/cache \\
    echo run >> /cache/runs && wc -l < /cache/runs > /runs.txt
"""
    lamina.build(ctx, dockerfile, "-t", "mounts")
    lamina.build(ctx, dockerfile, "-t", "mounts", "--no-cache")
    assert lamina.run("mounts", "cat /got.txt /runs.txt; test -e /in || echo no-in") == "tool-output\n2\nno-in\n"
