"""`lamina build` builds what docker's builders build: checked against podman (buildah) on the same
Dockerfile and the same busybox-static base, imported into both (so the base has no PATH in its
config), and against the Dockerfile reference / BuildKit's source where podman differs from them
(each test says which).

Each Dockerfile writes what it observes into ``/report`` in the image; the test reads it back with
``lamina run`` and ``podman run`` and compares the two.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import REPO_ROOT, make_busybox_rootfs

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.slow]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# busybox's stat: name, octal mode, owner, type; no times or sizes (those differ by filesystem).
STAT = "stat -c '%n %a %u %g %F'"


class Builders:
    """The same base (``bb``) in a lamina store and a private podman store."""

    def __init__(self, root: Path, podman: Any) -> None:
        self.root = root
        self.podman = podman

    def lamina(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(self.root), *args],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def podman_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.podman.run(list(args), check=False)
        result = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                             done.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def build_lamina(self, context: Path, dockerfile: str, tag: str, *flags: str) -> subprocess.CompletedProcess[str]:
        (context / "Dockerfile").write_text(dockerfile.replace("{base}", "bb"))
        return self.lamina("build", *flags, "-t", tag, str(context))

    def build_podman(self, context: Path, dockerfile: str, tag: str, *flags: str) -> subprocess.CompletedProcess[str]:
        (context / "Dockerfile").write_text(dockerfile.replace("{base}", "localhost/bb"))
        return self.podman_cmd("build", "--layers", *flags, "-t", tag, str(context))

    def reports(self, context: Path, dockerfile: str, tag: str) -> tuple[str, str]:
        """Build ``dockerfile`` with both; return the /report each image holds (lamina, podman)."""
        self.build_lamina(context, dockerfile, tag)
        ours = self.lamina("run", "--rm", "--network", "none", tag, "cat", "/report").stdout
        self.build_podman(context, dockerfile, tag)
        theirs = self.podman_cmd("run", "--rm", "--network=none", tag, "cat", "/report").stdout
        return ours, theirs

    def same_report(self, context: Path, dockerfile: str, tag: str) -> str:
        """Build with both; assert the reports are the same; return it."""
        ours, theirs = self.reports(context, dockerfile, tag)
        assert ours == theirs, f"lamina:\n{ours}\npodman:\n{theirs}"
        return ours

    def lamina_config(self, tag: str) -> dict[str, Any]:
        from lamina.store import Store

        image = Store.open(self.root).resolve_image(tag)
        return {"config": image.config, "id": image.id, "diff_ids": [layer.diff_id for layer in image.layers]}


@pytest.fixture(scope="module")
def builders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builders]:
    if os.geteuid() != 0:
        pytest.skip("the podman reference runs as root")
    if shutil.which("podman") is None or not Path("/bin/busybox").exists():
        pytest.skip("podman or busybox-static is not installed")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.podman_env import PodmanUnavailable, open_podman_env

    base = tmp_path_factory.mktemp("fidelity")
    rootfs = make_busybox_rootfs(base / "rootfs")
    tar = base / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    try:
        with open_podman_env(storage_driver="vfs") as env:
            probe = env.run(["import", str(tar), "localhost/bb"], check=False)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run here: {probe.stderr.decode(errors='replace')[-300:]}")
            found = Builders(base / "lamina-root", env)
            found.lamina("import", str(tar), "bb")
            yield found
    except PodmanUnavailable as e:
        pytest.skip(f"podman cannot run here: {e}")


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    context = tmp_path / "ctx"
    context.mkdir()
    return context


def test_default_path_when_the_base_sets_none(builders: Builders, ctx: Path) -> None:
    """A base made by `import` has no PATH: RUN and variable expansion see docker's default PATH.

    Reference: podman, for what RUN sees. For the image config: BuildKit's dockerfile2llb ("make
    sure that PATH is always set") appends the default PATH to every stage's config; buildah does
    not, so that part is checked against BuildKit's rule, and `run` of the imported base against
    podman (the runtime's default)."""
    dockerfile = ("FROM {base}\n"
                  "ENV PATH=/x:$PATH\n"
                  'RUN { echo "$PATH"; chmod --help >/dev/null 2>&1; echo "chmod=$?"; } > /report\n')
    ours, theirs = builders.reports(ctx, dockerfile, "fid-path")
    assert ours == theirs == f"/x:{DEFAULT_PATH}\nchmod=0\n"
    assert builders.lamina_config("fid-path")["config"]["config"]["Env"] == [f"PATH=/x:{DEFAULT_PATH}"]

    builders.build_lamina(ctx, "FROM {base}\nLABEL a=b\n", "fid-path-config")
    assert builders.lamina_config("fid-path-config")["config"]["config"]["Env"] == [f"PATH={DEFAULT_PATH}"]
    ran = builders.lamina("run", "--rm", "--network", "none", "bb", "sh", "-c", "echo $PATH").stdout
    assert ran == builders.podman_cmd("run", "--rm", "--network=none", "localhost/bb", "sh", "-c",
                                      "echo $PATH").stdout


def test_copy_chown_parents_and_chmod_destination(builders: Builders, ctx: Path) -> None:
    """COPY --chown makes missing parents with the --chown owner; --chmod applies to what is
    copied, never to the destination directory (created 0755, or left as the image has it).

    Reference: podman, which here follows BuildKit's copier (tonistiigi/fsutil: MkdirAll(0755,
    chown) for the destination and its parents; the top directory's metadata is not copied)."""
    (ctx / "foo").write_text("foo\n")
    (ctx / "dir" / "sub").mkdir(parents=True)
    (ctx / "dir" / "f").write_text("f\n")
    (ctx / "dir" / "sub" / "g").write_text("g\n")
    (ctx / "dir").chmod(0o750)
    dockerfile = (
        "FROM {base}\n"
        "RUN echo 'www:x:1000:1000::/home/www:/bin/sh' >> /etc/passwd && echo 'www:x:1000:' >> /etc/group\n"
        "COPY --chown=www:www foo /path/to/foo\n"
        "COPY --chmod=600 dir /o/tree/\n"
        "RUN mkdir -p /e/tree && chmod 700 /e/tree\n"
        "COPY --chmod=600 --chown=www dir /e/tree/\n"
        "COPY --chmod=640 --chown=www dir /n/newdir\n"
        "USER www\n"
        "RUN mkdir /path/to/new\n"
        "USER root\n"
        f"RUN {STAT} /path /path/to /path/to/foo /path/to/new /o /o/tree /o/tree/f /o/tree/sub "
        "/o/tree/sub/g /e/tree /e/tree/f /e/tree/sub /n /n/newdir /n/newdir/sub /n/newdir/f > /report\n")
    ours = builders.same_report(ctx, dockerfile, "fid-copy")
    assert "/o/tree 755 0 0 directory" in ours and "/path/to 755 1000 1000 directory" in ours


def test_add_extracts_only_tar_archives(builders: Builders, ctx: Path) -> None:
    """ADD copies a compressed file that is not a tar as it is, and extracts tar archives (plain,
    gzip, bzip2, xz). Reference: podman (as docker: only what decompresses to a tar is extracted)."""
    (ctx / "notes.txt.gz").write_bytes(gzip.compress(b"hello notes\n"))
    (ctx / "notes.txt.xz").write_bytes(lzma.compress(b"hello xz\n"))
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        info = tarfile.TarInfo("inside/file.txt")
        data = b"from a tar\n"
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    raw = payload.getvalue()
    (ctx / "plain.tar").write_bytes(raw)
    (ctx / "t.tar.gz").write_bytes(gzip.compress(raw))
    (ctx / "t.tar.xz").write_bytes(lzma.compress(raw))
    import bz2
    (ctx / "t.tar.bz2").write_bytes(bz2.compress(raw))
    dockerfile = ("FROM {base}\n"
                  "ADD notes.txt.gz notes.txt.xz /d/\n"
                  "ADD plain.tar /p/\n"
                  "ADD t.tar.gz /g/\n"
                  "ADD t.tar.xz /x/\n"
                  "ADD t.tar.bz2 /b/\n"
                  "RUN { find /d /p /g /x /b | sort; md5sum /d/notes.txt.gz /g/inside/file.txt; } > /report\n")
    ours = builders.same_report(ctx, dockerfile, "fid-add")
    assert "/d/notes.txt.gz\n" in ours and "/g/inside/file.txt\n" in ours


def test_no_cache_build_keeps_other_builds_cache(builders: Builders, tmp_path: Path) -> None:
    """Build A, then B with --no-cache sharing A's first steps, then A again: every step of A is
    still cached, and the image is the same. Steps that run no command give the same layer for
    the same input (the WORKDIR and COPY layers of A built twice with --no-cache).

    Reference: podman keeps all three cached (checked below on the same sequence)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "a.txt").write_text("a\n")
    (b / "b.txt").write_text("b\n")
    dockerfile_a = "FROM {base}\nWORKDIR /app\nCOPY a.txt .\nRUN echo expensive > /app/ran\n"
    dockerfile_b = "FROM {base}\nWORKDIR /app\nCOPY b.txt .\n"

    first = builders.build_lamina(a, dockerfile_a, "fid-a")
    assert "CACHED" not in first.stdout
    first_id = builders.lamina_config("fid-a")["id"]
    builders.build_lamina(b, dockerfile_b, "fid-b", "--no-cache")
    again = builders.build_lamina(a, dockerfile_a, "fid-a")
    assert again.stdout.count("--> CACHED") == 3, again.stdout
    assert builders.lamina_config("fid-a")["id"] == first_id

    builders.build_lamina(a, dockerfile_a, "fid-a1", "--no-cache")
    time.sleep(1.1)  # layer tars record whole seconds: a clock time would now differ
    builders.build_lamina(a, dockerfile_a, "fid-a2", "--no-cache")
    one, two = builders.lamina_config("fid-a1")["diff_ids"], builders.lamina_config("fid-a2")["diff_ids"]
    assert one[:-1] == two[:-1] and len(one) == len(two)  # all but the RUN layer

    builders.build_podman(a, dockerfile_a, "fid-a")
    builders.build_podman(b, dockerfile_b, "fid-b", "--no-cache")
    podman_again = builders.build_podman(a, dockerfile_a, "fid-a")
    assert podman_again.stdout.count("Using cache") == 3, podman_again.stdout



# --- device nodes in content an unprivileged user imports, builds from or ADDs -----------------

DEVICES = (("./dev/full", tarfile.CHRTYPE, 1, 7), ("./srv/full", tarfile.CHRTYPE, 1, 7),
           ("./srv/loop", tarfile.BLKTYPE, 7, 0))


def _rootfs_with_devices(rootfs: Path, out: Path) -> Path:
    """A root filesystem tar as `tar -C ROOTFS -c .` of a real system gives: device nodes included."""
    with tarfile.open(out, "w") as tar:
        tar.add(rootfs, arcname=".")
        srv = tarfile.TarInfo("./srv")
        srv.type, srv.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(srv)
        for name, kind, major, minor in DEVICES:
            node = tarfile.TarInfo(name)
            node.type, node.devmajor, node.devminor, node.mode = kind, major, minor, 0o666
            tar.addfile(node)
    return out


def _devices_in(layer_tar: bytes) -> set[tuple[str, bytes, int, int, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        return {(m.name.removeprefix("./"), m.type, m.devmajor, m.devminor, m.mode, m.uid)
                for m in tar.getmembers() if m.ischr() or m.isblk()}


def _saved_layers(archive: Path) -> list[bytes]:
    """The layer tars of a docker-archive, decompressed."""
    layers = []
    with tarfile.open(archive) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for name in manifest[0]["Layers"]:
            data = outer.extractfile(name).read()  # type: ignore[union-attr]
            layers.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return layers


EXPECTED_DEVICES = {("dev/full", tarfile.CHRTYPE, 1, 7, 0o666, 0), ("srv/full", tarfile.CHRTYPE, 1, 7, 0o666, 0),
                    ("srv/loop", tarfile.BLKTYPE, 7, 0, 0o666, 0)}


@pytest.mark.unprivileged
def test_rootless_import_keeps_device_nodes(unpriv: Any, builders: Builders, tmp_path: Path) -> None:
    """`tar -C ROOTFS -c . | lamina import - NAME` as a normal user, the tar holding device nodes.

    References: rootless podman imports it; its containers do not show the nodes (its storage
    cannot create them: /srv is empty, /dev is the runtime's own), but the image it saves holds
    them; lamina's containers show the same. Here: the image lamina saves holds the real nodes, and root podman loading that archive
    sees char 1:7; an unprivileged ADD of such a tar keeps them too."""
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    archive = _rootfs_with_devices(rootfs, unpriv.workdir / "rootfs.tar")
    unpriv.chown_tree(unpriv.workdir)
    imported = unpriv.run(["sh", "-c", f"lamina import - devs < {archive}"])
    assert imported.returncode == 0, imported.stderr
    saved = unpriv.workdir / "saved.tar"
    unpriv.lamina("save", "-o", str(saved), "devs", check=True)
    assert _devices_in(_saved_layers(saved)[0]) == EXPECTED_DEVICES

    # As in rootless podman (measured: podman 4.3, vfs): /srv is empty, /dev/full is the runtime's.
    inside = unpriv.lamina("run", "--rm", "--network", "none", "devs", "sh", "-c",
                           "ls -A /srv; stat -c '%F %t:%T' /dev/full; cat /srv/full", check=False)
    assert inside.stdout == "character special file 1:7\n"
    assert inside.stderr == "cat: can't open '/srv/full': No such file or directory\n"

    ctx = unpriv.workdir / "ctx"
    ctx.mkdir()
    shutil.copy(archive, ctx / "rootfs.tar")
    (ctx / "Dockerfile").write_text("FROM devs\nADD rootfs.tar /copy/\nCOPY --from=devs /srv /copied/\n")
    unpriv.chown_tree(ctx)
    unpriv.lamina("build", "-t", "devs-added", str(ctx), check=True)
    unpriv.lamina("save", "-o", str(unpriv.workdir / "added.tar"), "devs-added", check=True)
    added = _saved_layers(unpriv.workdir / "added.tar")
    assert _devices_in(added[-2]) == {(f"copy/{n}", *rest) for n, *rest in EXPECTED_DEVICES}
    assert _devices_in(added[-1]) == {(f"copied/{n.removeprefix('srv/')}", *rest)
                                      for n, *rest in EXPECTED_DEVICES if n.startswith("srv/")}

    loaded = builders.podman_cmd("load", "-i", str(saved))
    assert loaded.returncode == 0
    seen = builders.podman_cmd("run", "--rm", "--network=none", "localhost/devs:latest", "stat", "-c",
                               "%n %F %t:%T %a", "/srv/full", "/srv/loop").stdout
    assert seen == "/srv/full character special file 1:7 666\n/srv/loop block special file 7:0 666\n"


# --- reproducible images ---------------------------------------------------------------------

EPOCH = 1700000000


def test_source_date_epoch_gives_the_same_image_on_two_stores(lamina_cmd: Any, tmp_path: Path) -> None:
    """With SOURCE_DATE_EPOCH (environment or build-arg), two stores build the same image: same ID,
    same layer blobs, RUN included (a deterministic command); created and history times are the
    epoch and no file in a new layer is newer.

    Reference: the Dockerfile/BuildKit documentation of SOURCE_DATE_EPOCH ("build reproducibility",
    rewrite-timestamp); podman 4.3 here predates its --source-date-epoch."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a\n")
    (ctx / "notes.txt.gz").write_bytes(gzip.compress(b"notes\n", mtime=0))
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nWORKDIR /app\nCOPY a.txt .\nADD notes.txt.gz /d/\n"
                                    "RUN echo built > /app/out && mkdir -p /app/sub/deeper\nLABEL x=y\n")
    images = []
    for number, how in enumerate(("env", "arg")):
        root = tmp_path / f"store-{number}"
        if how == "env":
            lamina_cmd("build", "-t", "repro", str(ctx), root=root, env={"SOURCE_DATE_EPOCH": str(EPOCH)})
        else:
            time.sleep(1.1)  # a clock time would now differ by a second
            lamina_cmd("build", "--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}", "-t", "repro", str(ctx), root=root)
        from lamina.store import Store

        image = Store.open(root).resolve_image("repro")
        images.append((image.id, [layer.digest for layer in image.layers], image.config, root))
    assert images[0][:2] == images[1][:2]
    image_id, digests, config, root = images[0]
    stamp = "2023-11-14T22:13:20Z"
    assert config["created"] == stamp
    built = [h for h in config["history"] if h.get("comment") == "lamina build"]
    assert len(built) == 5 and {h["created"] for h in built} == {stamp}
    for digest in digests[-3:]:
        blob = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        with tarfile.open(blob) as tar:
            assert max(m.mtime for m in tar.getmembers()) <= EPOCH

    bad = lamina_cmd("build", "--build-arg", "SOURCE_DATE_EPOCH=yesterday", str(ctx), root=root, check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "SOURCE_DATE_EPOCH" in bad.stderr


@pytest.mark.unprivileged
def test_source_date_epoch_image_is_the_same_unprivileged(unpriv: Any, lamina_cmd: Any, tmp_path: Path) -> None:
    """The same Dockerfile with the same SOURCE_DATE_EPOCH gives the same image ID built by root and
    by a normal user (with and without subordinate ids): what a machine or user is does not leak
    into the image. Reference: as the test above."""
    dockerfile = ("FROM lamina/busybox\nWORKDIR /srv\nCOPY a.txt sub/\n"
                  "RUN echo built > /srv/out && mkdir -p /srv/new/deeper && rm /etc/group\n")
    ids = []
    for who, ctx in (("root", tmp_path / "ctx"), ("user", unpriv.workdir / "ctx")):
        ctx.mkdir()
        (ctx / "a.txt").write_text("a\n")
        (ctx / "Dockerfile").write_text(dockerfile)
        if who == "root":
            lamina_cmd("build", "-q", "-t", "repro", str(ctx), env={"SOURCE_DATE_EPOCH": str(EPOCH)})
            ids.append(json.loads(lamina_cmd("inspect", "repro").stdout)[0]["Id"])
        else:
            unpriv.chown_tree(ctx)
            unpriv.run(["lamina", "build", "-q", "-t", "repro", str(ctx)], env={"SOURCE_DATE_EPOCH": str(EPOCH)},
                       check=True)
            ids.append(json.loads(unpriv.lamina("inspect", "repro", check=True).stdout)[0]["Id"])
    assert ids[0] == ids[1]


def test_automatic_platform_args(builders: Builders, ctx: Path) -> None:
    """BuildKit's automatic platform ARGs: visible in FROM (``--platform=$BUILDPLATFORM``) and in a
    stage once declared, empty before. Reference: podman (buildah defines them as BuildKit does).
    A foreign platform is an error naming the line (lamina runs builds natively): checked against
    the brief's rule, since podman would pull and emulate."""
    dockerfile = (
        "FROM --platform=$BUILDPLATFORM {base}\n"
        'RUN echo "undeclared:[$TARGETARCH][$BUILDPLATFORM]" > /report\n'
        "ARG TARGETPLATFORM\nARG TARGETOS\nARG TARGETARCH\nARG TARGETVARIANT\n"
        "ARG BUILDPLATFORM\nARG BUILDOS\nARG BUILDARCH\n"
        'RUN echo "$TARGETPLATFORM|$TARGETOS|$TARGETARCH|$TARGETVARIANT|$BUILDPLATFORM|$BUILDOS|$BUILDARCH|"'
        " >> /report\n")
    ours = builders.same_report(ctx, dockerfile, "fid-platform")
    assert ours.startswith("undeclared:[][]\nlinux/")

    (ctx / "Dockerfile").write_text("FROM bb AS unused\nFROM --platform=linux/s390x bb\nRUN true\n")
    refused = builders.lamina("build", str(ctx), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "Dockerfile:2" in refused.stderr and "linux/s390x" in refused.stderr
    refused = builders.lamina("build", "--platform", "linux/s390x", str(ctx), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    (ctx / "Dockerfile").write_text("FROM --platform=linux/" + platform_arch() + " bb\nRUN true\n")
    builders.lamina("build", "--platform", "linux/" + platform_arch(), "-q", str(ctx))


def platform_arch() -> str:
    import platform

    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def test_build_leaves_piped_input_to_the_caller(builders: Builders, ctx: Path) -> None:
    """A RUN step reads nothing (as podman's, since its #8092, and docker's builders), and what was
    piped to ``build`` is still there for the next command of the caller's pipeline."""
    dockerfile = "FROM {base}\nRUN cat > /seen; wc -c < /seen > /report\n"
    (ctx / "Dockerfile").write_text(dockerfile.replace("{base}", "bb"))
    script = (f"{sys.executable} -m lamina --root {builders.root} build -q -t stdin-probe {ctx} >/dev/null"
              " && sed 's/^/after:/'")
    shell = subprocess.run(["sh", "-c", script], input="piped\n", capture_output=True, text=True,
                           timeout=300, cwd=REPO_ROOT)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == "after:piped\n"
    ours = builders.lamina("run", "--rm", "--network", "none", "stdin-probe", "cat", "/report").stdout
    (ctx / "Dockerfile").write_text(dockerfile.replace("{base}", "localhost/bb"))
    builders.podman.run(["build", "--layers", "-t", "stdin-probe", str(ctx)], input=b"piped\n")
    theirs = builders.podman_cmd("run", "--rm", "--network=none", "stdin-probe", "cat", "/report").stdout
    assert ours == theirs == "0\n"
