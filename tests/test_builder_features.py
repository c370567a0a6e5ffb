"""BuildKit's features beyond the anchors of issue 17: secrets, SSH agents, RUN --network, COPY
heredocs, --link and --parents, ADD from a URL.

Each test says its reference: podman 4.3 on the same Dockerfile where it implements the feature as
the Dockerfile reference describes it (secret files, ADD from a URL), else the Dockerfile
reference's text (podman 4.3 has no heredocs, no ``RUN --network``, no secret ``env=``, no
``COPY --parents``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import test_builder_fidelity as fidelity
from harness import UnprivilegedUser

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# The podman-and-lamina pair on the same imported busybox base (one per module).
builders = fidelity.builders
Builders = fidelity.Builders
SECRET = b"s3cr3t-value-9f2c1d"
ENV_SECRET = "env-s3cr3t-77ab"


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    context = tmp_path / "ctx"
    context.mkdir()
    return context


def _layer_tars(saved: Path) -> Iterator[tuple[str, bytes]]:
    """(name, uncompressed tar) of every layer in a docker-archive made by ``lamina save``."""
    with tarfile.open(saved) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in manifest[0]["Layers"]:
            data = archive.extractfile(name).read()  # type: ignore[union-attr]
            yield name, gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _tree_contains(root: Path, needle: bytes) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


SECRET_FILES = """\
FROM {base}
RUN --mount=type=secret,id=tok stat -c '%n %a %u %g %F' /run/secrets/tok > /report; \
    cat /run/secrets/tok | wc -c >> /report
RUN --mount=type=secret,id=tok,target=/etc/t,mode=0444,uid=1,gid=2 \
    stat -c '%n %a %u %g %F' /etc/t >> /report; cat /etc/t | wc -c >> /report
RUN --mount=type=secret,id=unknown test -e /run/secrets/unknown || echo optional-absent >> /report
"""


def test_secret_files_as_podman(builders: Builders, ctx: Path, tmp_path: Path) -> None:
    """`RUN --mount=type=secret` with `build --secret id=tok,src=FILE`: the file at /run/secrets/ID
    (0400 root), at target= with mode/uid/gid, an unknown optional secret skipped.
    Reference: podman 4.3 (buildah follows the Dockerfile reference's defaults here)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    ours, theirs = _secret_reports(builders, ctx, secret)
    assert ours == theirs, f"lamina:\n{ours}\npodman:\n{theirs}"
    assert ours == (f"/run/secrets/tok 400 0 0 regular file\n{len(SECRET)}\n"
                    f"/etc/t 444 1 2 regular file\n{len(SECRET)}\noptional-absent\n")
    # As BuildKit: the secret's content is not part of the cache key, so another value of the
    # same secret does not rebuild the steps.
    secret.write_bytes(b"another value")
    again = builders.build_lamina(ctx, SECRET_FILES, "sec", "--secret", f"id=tok,src={secret}")
    assert again.stdout.count("--> CACHED") == 3, again.stdout


def _secret_reports(builders: Builders, ctx: Path, secret: Path) -> tuple[str, str]:
    builders.build_lamina(ctx, SECRET_FILES, "sec", "--secret", f"id=tok,src={secret}")
    ours = builders.lamina("run", "--rm", "--network", "none", "sec", "cat", "/report").stdout
    builders.build_podman(ctx, SECRET_FILES, "sec", "--secret", f"id=tok,src={secret}")
    theirs = builders.podman_cmd("run", "--rm", "--network=none", "localhost/sec", "cat", "/report").stdout
    return ours, theirs


def test_secret_never_reaches_layers_history_or_cache(builders: Builders, ctx: Path, tmp_path: Path) -> None:
    """The secret is readable in the RUN (a file, and an environment variable with env=) and absent
    from every layer tar of the saved image, from its config and history, and from the build cache.
    Reference: the Dockerfile reference ("secret ... not in the final image"; env= "mount the
    secret to an environment variable instead of a file, or both"): podman 4.3 has no env=."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    dockerfile = """\
FROM {base}
RUN --mount=type=secret,id=tok cp /run/secrets/tok /copy-of-secret && echo copied > /report
RUN --mount=type=secret,id=envtok,env=TOKEN \
    sh -c 'printf %s "$TOKEN" | sha256sum | cut -c1-64 >> /report; test -e /run/secrets/envtok || echo no-file >> /report'
RUN --mount=type=secret,id=envtok,env=BOTH,target=/both \
    sh -c 'test "$BOTH" = "$(cat /both)" && echo both-ok >> /report'
RUN rm /copy-of-secret && echo removed >> /report
WORKDIR /w
RUN --mount=type=secret,id=tok,target=rel sh -c 'test -s /w/rel && echo relative-ok >> /report'
"""
    (ctx / "Dockerfile").write_text(dockerfile.replace("{base}", "bb"))
    result = subprocess.run(
        [*_lamina_argv(builders), "build", "--secret", f"id=tok,src={secret}", "--secret",
         "id=envtok,env=THE_ENV_SECRET", "-t", "secret-img", str(ctx)],
        capture_output=True, text=True, timeout=300, cwd=fidelity.REPO_ROOT, stdin=subprocess.DEVNULL,
        env={**os.environ, "THE_ENV_SECRET": ENV_SECRET})
    assert result.returncode == 0, result.stderr
    assert SECRET.decode() not in result.stdout + result.stderr
    report = builders.lamina("run", "--rm", "--network", "none", "secret-img", "cat", "/report").stdout
    env_digest = hashlib.sha256(ENV_SECRET.encode()).hexdigest()
    assert report == f"copied\n{env_digest}\nno-file\nboth-ok\nremoved\nrelative-ok\n"
    saved = tmp_path / "saved.tar"
    builders.lamina("save", "-o", str(saved), "secret-img")
    layers = list(_layer_tars(saved))
    assert len(layers) >= 5
    # The first RUN copied it on purpose: that layer has it (proving the check can see it); no
    # other layer does, and no mount point (/run/secrets/tok, /both) is left in any layer.
    holding = [name for name, data in layers if SECRET in data]
    assert len(holding) == 1, holding
    for _name, data in layers:
        assert ENV_SECRET.encode() not in data
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        assert not any(n.startswith(("run/secrets", "both", "w/rel")) for n in names), names
    image_text = json.dumps(builders.lamina_config("secret-img"))
    history = builders.lamina("history", "--no-trunc", "secret-img").stdout
    for text in (image_text, history):
        assert SECRET.decode() not in text and ENV_SECRET not in text
    assert "cp /run/secrets/tok /copy-of-secret" in history  # the history was read
    assert _tree_contains(builders.root / "build-cache", SECRET) == []
    assert _tree_contains(builders.root / "build-cache", ENV_SECRET.encode()) == []
    assert _tree_contains(builders.root / "tmp", SECRET) == []


def _lamina_argv(builders: Builders) -> list[str]:
    import sys

    return [sys.executable, "-m", "lamina", "--root", str(builders.root)]


def test_secret_required_and_bad_flags(builders: Builders, ctx: Path, tmp_path: Path) -> None:
    """required=true without the secret fails the step (one line, Dockerfile:N); a missing --secret
    source fails before anything runs. Reference: the Dockerfile reference (required: "the
    instruction errors out when the secret is unavailable") and buildx's --secret syntax."""
    (ctx / "Dockerfile").write_text("FROM bb\nRUN true\nRUN --mount=type=secret,id=x,required=true true\n")
    failed = builders.lamina("build", str(ctx), check=False)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].startswith("lamina: error: Dockerfile:3: secret x: not found"), \
        failed.stderr
    assert "Traceback" not in failed.stderr
    missing = builders.lamina("build", "--secret", f"id=x,src={tmp_path / 'nope'}", str(ctx), check=False)
    assert missing.returncode == 1 and "--secret" in missing.stderr and "STEP" not in missing.stdout
    big = tmp_path / "big"
    big.write_bytes(b"x" * (500 * 1024 + 1))
    too_big = builders.lamina("build", "--secret", f"id=x,src={big}", str(ctx), check=False)
    assert too_big.returncode == 1 and "too big" in too_big.stderr


@pytest.mark.unprivileged
def test_secret_unprivileged(unpriv: UnprivilegedUser) -> None:
    """Rootless, with and without subordinate ids: the secret is mounted 0400 and owned by root in
    the RUN, and the layer keeps only what the command wrote. Reference: the Dockerfile
    reference's defaults (mode 0400, uid 0, gid 0)."""
    ctx = unpriv.workdir / "ctx"
    ctx.mkdir()
    secret = unpriv.workdir / "secret"
    secret.write_bytes(SECRET)
    (ctx / "Dockerfile").write_text(
        "FROM lamina/busybox\n"
        "RUN --mount=type=secret,id=tok stat -c '%a %u %g' /run/secrets/tok > /report && "
        "wc -c < /run/secrets/tok >> /report\n")
    unpriv.chown_tree(unpriv.workdir)
    secret.chmod(0o600)
    built = unpriv.lamina("build", "--secret", f"id=tok,src={secret}", "-t", "usec", str(ctx))
    assert built.returncode == 0, built.stderr
    run = unpriv.lamina("run", "--rm", "--network", "none", "usec", "cat", "/report")
    assert run.stdout == f"400 0 0\n{len(SECRET)}\n", run.stderr
    assert _tree_contains(unpriv.workdir / "root", SECRET) == []


def test_secret_and_ssh_mount_defaults() -> None:
    """The defaults the Dockerfile reference gives: a secret at /run/secrets/ID, its ID the target's
    base name otherwise, mode 0400, uid/gid 0, optional; only env= means no file; ssh: id default,
    /run/buildkit/ssh_agent.N per ssh mount, mode 0600."""
    from builder.dockerfile import Run, parse

    run = parse("FROM scratch\nRUN --mount=type=secret,id=a --mount=type=secret,target=/etc/b.key "
                "--mount=type=secret,id=c,env=C,required --mount=type=ssh "
                "--mount=type=ssh,id=gh,mode=0666 --mount=type=ssh,target=/s x\n").stages[0].instructions[0]
    assert isinstance(run, Run)
    assert [(m.type, m.id, m.target, m.env, m.required, m.mode, m.uid, m.gid) for m in run.mounts] == [
        ("secret", "a", "/run/secrets/a", None, False, 0o400, 0, 0),
        ("secret", "b.key", "/etc/b.key", None, False, 0o400, 0, 0),
        ("secret", "c", "", "C", True, 0o400, 0, 0),
        ("ssh", "default", "/run/buildkit/ssh_agent.0", None, False, 0o600, 0, 0),
        ("ssh", "gh", "/run/buildkit/ssh_agent.1", None, False, 0o666, 0, 0),
        ("ssh", "default", "/s", None, False, 0o600, 0, 0),
    ]


class _FakeAgent:
    """A unix socket server on the host that answers every connection with one byte."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"!")

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)


def test_ssh_agent_socket_forwarded(builders: Builders, ctx: Path, tmp_path: Path) -> None:
    """`RUN --mount=type=ssh` with `build --ssh default` (SSH_AUTH_SOCK) and `--ssh other=SOCKET`:
    the caller's socket itself (same inode) at /run/buildkit/ssh_agent.N or target=, SSH_AUTH_SOCK
    naming the first, nothing left in the layer. busybox's nc has no -U, so the RUN checks the
    socket's type and identity rather than talking to it; the agent is checked from the host.
    Reference: the Dockerfile reference (type=ssh: default target /run/buildkit/ssh_agent.${N},
    SSH_AUTH_SOCK) and buildx's --ssh syntax; podman 4.3's --ssh takes key files."""
    agent = _FakeAgent(tmp_path / "agent.sock")
    other = _FakeAgent(tmp_path / "other.sock")
    try:
        (ctx / "Dockerfile").write_text(
            "FROM bb\n"
            "RUN --mount=type=ssh --mount=type=ssh,id=other,target=/o.sock "
            "sh -c 'echo $SSH_AUTH_SOCK; for s in /run/buildkit/ssh_agent.0 /o.sock; do "
            "test -S $s && stat -c \"%n %i\" $s; done' > /report\n"
            "RUN --mount=type=ssh,id=absent sh -c 'echo ${SSH_AUTH_SOCK:-unset} >> /report'\n")
        built = subprocess.run(
            [*_lamina_argv(builders), "build", "--ssh", "default", "--ssh", f"other={other.path}",
             "-t", "ssh-img", str(ctx)], capture_output=True, text=True, timeout=300,
            cwd=fidelity.REPO_ROOT, stdin=subprocess.DEVNULL,
            env={**os.environ, "SSH_AUTH_SOCK": str(agent.path)})
        assert built.returncode == 0, built.stderr
        report = builders.lamina("run", "--rm", "--network", "none", "ssh-img", "cat", "/report").stdout
        assert report == (f"/run/buildkit/ssh_agent.0\n/run/buildkit/ssh_agent.0 {agent.path.stat().st_ino}\n"
                          f"/o.sock {other.path.stat().st_ino}\nunset\n")
        with socket.socket(socket.AF_UNIX) as client:  # the agent still answers after the build
            client.connect(str(agent.path))
            assert client.recv(1) == b"!"
        image = builders.lamina_config("ssh-img")
        layer_names = _layer_names(builders, image["diff_ids"][-2])
        assert not any(n.startswith(("run/buildkit", "o.sock")) for n in layer_names), layer_names
        required = ctx / "Dockerfile"
        required.write_text("FROM bb\nRUN --mount=type=ssh,id=nope,required=true true\n")
        failed = builders.lamina("build", str(ctx), check=False)
        assert failed.returncode != 0 and "Dockerfile:2:" in failed.stderr and "nope" in failed.stderr
        not_socket = builders.lamina("build", "--ssh", f"default={required}", str(ctx), check=False)
        assert not_socket.returncode == 1 and "not a socket" in not_socket.stderr
    finally:
        agent.close()
        other.close()


def _layer_names(builders: Builders, diff_id: str) -> list[str]:
    from lamina.store import Store

    store = Store.open(builders.root)
    image_layers = {layer.diff_id: layer for layer in store.resolve_image("ssh-img").layers}
    blob = builders.root / "blobs" / "sha256" / image_layers[diff_id].digest.removeprefix("sha256:")
    with tarfile.open(blob) as tar:
        return tar.getnames()


def _interfaces(text: str) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in text.splitlines()[2:] if ":" in line)


def test_run_network_modes(builders: Builders, ctx: Path) -> None:
    """`RUN --network=none` sees only loopback; `host` and `default` (lamina's RUN today) see the
    host's interfaces. Reference: the Dockerfile reference (none: "no network access"; host: "the
    host's network environment"); podman 4.3 refuses RUN --network."""
    (ctx / "Dockerfile").write_text(
        "FROM bb\n"
        "RUN --network=none cat /proc/net/dev > /none\n"
        "RUN --network=host cat /proc/net/dev > /host\n"
        "RUN --network=default cat /proc/net/dev > /default\n")
    builders.lamina("build", "-t", "net-img", str(ctx))
    seen = {name: builders.lamina("run", "--rm", "--network", "none", "net-img", "cat", f"/{name}").stdout
            for name in ("none", "host", "default")}
    host = _interfaces(Path("/proc/net/dev").read_text())
    assert _interfaces(seen["none"]) == ["lo"]
    assert _interfaces(seen["host"]) == host
    assert _interfaces(seen["default"]) == host
    (ctx / "Dockerfile").write_text("FROM bb\nRUN --network=bridge true\n")
    bad = builders.lamina("build", str(ctx), check=False)
    assert bad.returncode != 0 and "Dockerfile:2:" in bad.stderr and "bridge" in bad.stderr


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a directory: (base URL, directory)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_add_url_as_podman(builders: Builders, ctx: Path, web: tuple[str, Path]) -> None:
    """`ADD URL`: the name from the URL's path (into a directory) or the destination's, mode 0600
    (or --chmod), owner root, mtime from Last-Modified.
    Reference: podman 4.3 on the same Dockerfile, except the new directory /web's own time
    (lamina: SOURCE_DATE_EPOCH or 0, docs/builder.md "Reproducible layers")."""
    url, served = web
    (served / "remote.txt").write_bytes(b"from the web\n")
    os.utime(served / "remote.txt", (1614834367, 1614834367))
    dockerfile = f"""\
FROM {{base}}
ADD {url}/remote.txt /web/
ADD {url}/remote.txt /named
ADD --chmod=640 {url}/remote.txt /m/
RUN stat -c '%n %a %u %g %Y' /web/remote.txt /named /m/remote.txt > /report; cat /named >> /report
"""
    same = builders.same_report(ctx, dockerfile, "addurl")
    assert same == ("/web/remote.txt 600 0 0 1614834367\n/named 600 0 0 1614834367\n"
                    "/m/remote.txt 640 0 0 1614834367\nfrom the web\n")


def test_add_url_checksum(builders: Builders, ctx: Path, web: tuple[str, Path]) -> None:
    """--checksum: the right digest builds; a wrong one is one line naming Dockerfile:N, exit 1
    (podman's build exit code, which lamina's build errors use), nothing tagged. Reference: the
    Dockerfile reference (--checksum "verifies the checksum of a remote resource"); podman 4.3
    refuses --checksum."""
    url, served = web
    (served / "f.bin").write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    (ctx / "Dockerfile").write_text(f"FROM bb\nADD --checksum=sha256:{digest} {url}/f.bin /f\n")
    builders.lamina("build", "-t", "checked", str(ctx))
    assert builders.lamina("run", "--rm", "--network", "none", "checked", "cat", "/f").stdout == "payload"
    (ctx / "Dockerfile").write_text(f"FROM bb\nRUN true\nADD --checksum=sha256:{'0' * 64} {url}/f.bin /f\n")
    bad = builders.lamina("build", "-t", "never-tagged", str(ctx), check=False)
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("lamina: error: Dockerfile:3: ADD failed: checksum mismatch"), \
        bad.stderr
    assert builders.lamina("images", "-q", "never-tagged", check=False).stdout.strip() == ""


def _tree(builders: Builders, image: str, *paths: str) -> str:
    script = f"find {' '.join(paths)} | sort | while read p; do stat -c '%n %a %u %g' \"$p\"; " \
             "test -f \"$p\" && cat \"$p\"; done"
    return builders.lamina("run", "--rm", "--network", "none", image, "sh", "-c", script).stdout


def test_copy_parents_as_the_reference(builders: Builders, ctx: Path) -> None:
    """`COPY --parents`: the reference's two examples (`./x/a.txt ./y/a.txt /parents/` keeps x/ and
    y/; `./x/./y/*.txt` keeps only what follows the `./` pivot), a wildcard in the middle, a
    directory source (kept with its own mode), and `--from` with an absolute pivot.
    Reference: the Dockerfile reference's COPY --parents text (podman 4.3 has no --parents)."""
    for rel, text in (("x/a.txt", "xa"), ("y/a.txt", "ya"), ("x/y/a.txt", "xya"), ("x/y/b.txt", "xyb"),
                      ("src/one/deep/f.go", "go"), ("src/two/f.go", "shallow"), ("src/one/deep/f.js", "js")):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text + "\n")
    (ctx / "x").chmod(0o750)
    (ctx / "Dockerfile").write_text(
        "FROM bb AS first\n"
        "COPY ./x/a.txt ./y/a.txt /no_parents/\n"
        "COPY --parents ./x/a.txt ./y/a.txt /parents/\n"
        "COPY --parents ./x/./y/*.txt /pivot/\n"
        "COPY --parents src/*/*/*.go /wild/\n"
        "COPY --parents x/y /dir\n"
        "FROM bb\n"
        "COPY --from=first --parents /parents/x/a.txt /pivot/./y /from/\n")
    builders.lamina("build", "-t", "parents-a", "--target", "first", str(ctx))
    assert _tree(builders, "parents-a", "/no_parents", "/parents", "/pivot", "/wild", "/dir") == """\
/dir 755 0 0
/dir/x 750 0 0
/dir/x/y 755 0 0
/dir/x/y/a.txt 644 0 0
xya
/dir/x/y/b.txt 644 0 0
xyb
/no_parents 755 0 0
/no_parents/a.txt 644 0 0
ya
/parents 755 0 0
/parents/x 750 0 0
/parents/x/a.txt 644 0 0
xa
/parents/y 755 0 0
/parents/y/a.txt 644 0 0
ya
/pivot 755 0 0
/pivot/y 755 0 0
/pivot/y/a.txt 644 0 0
xya
/pivot/y/b.txt 644 0 0
xyb
/wild 755 0 0
/wild/src 755 0 0
/wild/src/one 755 0 0
/wild/src/one/deep 755 0 0
/wild/src/one/deep/f.go 644 0 0
go
"""
    builders.lamina("build", "-t", "parents-b", str(ctx))
    assert _tree(builders, "parents-b", "/from") == """\
/from 755 0 0
/from/parents 755 0 0
/from/parents/x 750 0 0
/from/parents/x/a.txt 644 0 0
xa
/from/y 755 0 0
/from/y/a.txt 644 0 0
xya
/from/y/b.txt 644 0 0
xyb
"""


def test_copy_heredocs_as_the_reference(builders: Builders, ctx: Path) -> None:
    """`COPY <<EOF /file` heredocs: variables expanded unless the delimiter is quoted, `<<-` strips
    leading tabs, several heredocs in one COPY land by name in a directory, files 0644 root (or
    --chmod). Reference: the Dockerfile reference's here-documents examples (podman 4.3 parses no
    heredocs)."""
    (ctx / "Dockerfile").write_text(
        "FROM bb\n"
        "ARG FOO=bar\n"
        "COPY <<-EOT /script.sh\n"
        '  echo "hello ${FOO}"\n'
        "EOT\n"
        'COPY <<-"EOT" /script2.sh\n'
        '\techo "hello ${FOO}"\n'
        "\tEOT\n"
        "COPY --chmod=755 <<robots.txt <<humans.txt /usr/share/nginx/html/\n"
        "(robots content)\n"
        "robots.txt\n"
        "(humans content)\n"
        "humans.txt\n")
    builders.lamina("build", "-t", "heredocs", str(ctx))
    assert _tree(builders, "heredocs", "/script.sh", "/script2.sh", "/usr/share/nginx/html") == """\
/script.sh 644 0 0
  echo "hello bar"
/script2.sh 644 0 0
echo "hello ${FOO}"
/usr/share/nginx/html 755 0 0
/usr/share/nginx/html/humans.txt 755 0 0
(humans content)
/usr/share/nginx/html/robots.txt 755 0 0
(robots content)
"""
    ran = builders.lamina("run", "--rm", "--network", "none", "heredocs", "sh", "/script.sh").stdout
    assert ran == "hello bar\n"


def test_copy_link_gives_the_same_layer(builders: Builders, ctx: Path) -> None:
    """`COPY --link` and `ADD --link` are accepted and give what the same step without --link
    gives. Reference: the Dockerfile reference's --link text (the sources are copied into an empty
    directory that becomes a layer linked on top of the previous state: how BuildKit makes and
    reuses the layer changes, not what the image holds); podman 4.3 refuses --link."""
    (ctx / "d").mkdir()
    (ctx / "d" / "f.txt").write_text("linked\n")
    diff_ids = []
    for link in ("", "--link "):
        (ctx / "Dockerfile").write_text(f"FROM bb\nCOPY {link}d /app/\nADD {link}d/f.txt /added\n")
        builders.lamina("build", "-t", f"link{len(link)}", str(ctx))
        diff_ids.append(builders.lamina_config(f"link{len(link)}")["diff_ids"])
    assert diff_ids[0] == diff_ids[1] and len(diff_ids[0]) == 3


class _Headers(http.server.BaseHTTPRequestHandler):
    """Answers GET with a body and the headers the path names (see the test below)."""

    bodies: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.bodies.get(self.path.split("?")[0], b"")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/cd"):
            self.send_header("Content-Disposition", 'attachment; filename="../from-header.bin"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_add_url_names_times_and_cache_as_buildkit(builders: Builders, ctx: Path) -> None:
    """`ADD URL` as BuildKit's http source: the name from Content-Disposition (its base name), else
    the URL's path, else `download`; mtime 0 without Last-Modified; a rebuild fetches again and is
    CACHED when the content is the same, runs again when it changed. Reference: BuildKit's
    source/http (getFileName, save, formatCacheKey); podman 4.3 names and times files otherwise."""
    _Headers.bodies = {"/cd": b"disposed\n", "/": b"root\n", "/plain.txt": b"one\n"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        (ctx / "Dockerfile").write_text(
            f"FROM bb\nADD {url}/cd {url}/ {url}/plain.txt /d/\nRUN cat /d/plain.txt > /seen\n")
        first = builders.lamina("build", "-t", "addnames", str(ctx))
        listing = builders.lamina("run", "--rm", "--network", "none", "addnames", "sh", "-c",
                                  "cd /d && stat -c '%n %a %Y' * && cat from-header.bin download").stdout
        assert listing == ("download 600 0\nfrom-header.bin 600 0\nplain.txt 600 0\n"
                           "disposed\nroot\n")
        assert first.stdout.count("--> CACHED") == 0
        again = builders.lamina("build", "-t", "addnames", str(ctx))
        assert again.stdout.count("--> CACHED") == 2, again.stdout
        _Headers.bodies["/plain.txt"] = b"two\n"
        changed = builders.lamina("build", "-t", "addnames", str(ctx))
        assert changed.stdout.count("--> CACHED") == 0, changed.stdout
        seen = builders.lamina("run", "--rm", "--network", "none", "addnames", "cat", "/seen").stdout
        assert seen == "two\n"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert list((builders.root / "tmp").glob("*build-url*")) == []
