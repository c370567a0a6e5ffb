"""python-on-whales, a real docker client, driving lamina (``DockerClient(client_call=[lamina, ...])``).

The client parses what docker prints (``inspect`` JSON into pydantic models, ``version``/``info``
through ``--format '{{json .}}'``, ``image ls -q``, ``system df`` rows) and calls docker's command
groups (``image ls``, ``container inspect``, ``image prune``...), so every test here fails when lamina
prints or names something differently from docker. Each answer is checked against what lamina
itself or the host says is true, not only for "no exception".

Not covered here: volumes and ``cp`` (other verbs' tests); ``docker.build``, which is ``buildx
build`` (lamina has no buildx: ``legacy_build`` is the docker build it has).
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT, fuse_mounts_under

whales = pytest.importorskip("python_on_whales", reason="python-on-whales is a test dependency (.[test])")

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

BASE = "lamina/busybox"


@pytest.fixture(scope="module")
def lamina_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable ``lamina`` for the client to call (the console script, or a wrapper)."""
    installed = Path(sys.executable).with_name("lamina")
    if installed.exists():
        return installed
    wrapper = tmp_path_factory.mktemp("bin") / "lamina"
    wrapper.write_text(f"#!/bin/sh\ncd {REPO_ROOT} && exec {sys.executable} -m lamina \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("whales") / "root"
    yield path
    assert fuse_mounts_under(path) == []


@pytest.fixture(scope="module")
def docker(lamina_program: Path, root: Path) -> Iterator[object]:
    client = whales.DockerClient(client_call=[str(lamina_program), "--root", str(root)])
    yield client
    for container in client.container.list(all=True):  # type: ignore[attr-defined]
        container.remove(force=True)


def lamina(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args], check=True,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300).stdout


def test_version_and_info(docker: object, root: Path) -> None:
    from lamina import __version__

    version = docker.version()  # type: ignore[attr-defined]
    assert version.client.version == __version__ and version.server.kernel_version == platform.release()
    info = docker.system.info()  # type: ignore[attr-defined]
    assert info.driver == "lamina-unionfs" and info.docker_root_dir == root
    assert info.n_cpu == os.cpu_count() and info.kernel_version == platform.release()
    assert info.images == len(lamina(root, "images", "-q", "--no-trunc").split())
    assert info.containers == len(lamina(root, "ps", "-aq").split())


def test_images_list_inspect_tag_remove(docker: object, root: Path) -> None:
    d = docker
    base = d.image.inspect(BASE)  # type: ignore[attr-defined]
    assert base.repo_tags == [f"{BASE}:latest"]
    assert base.id == lamina(root, "images", "-q", "--no-trunc", BASE).strip()
    assert base.size > 0 and base.os == "linux" and base.config.cmd
    listed = {image.id for image in d.image.list()}  # type: ignore[attr-defined]
    assert base.id in listed
    d.image.tag(BASE, "whales/tagged:1")  # type: ignore[attr-defined]
    assert d.image.exists("whales/tagged:1")  # type: ignore[attr-defined]
    assert d.image.inspect("whales/tagged:1").id == base.id  # type: ignore[attr-defined]
    d.image.remove("whales/tagged:1")  # type: ignore[attr-defined]
    assert not d.image.exists("whales/tagged:1")  # type: ignore[attr-defined]
    with pytest.raises(whales.exceptions.NoSuchImage):
        d.image.inspect("whales/never-was:1")  # type: ignore[attr-defined]


def test_build_then_run_attached_and_detached(docker: object, tmp_path: Path) -> None:
    d = docker
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo built > /built\nCMD [\"cat\", \"/built\"]\n")
    image = d.legacy_build(tmp_path, tags=["whales/app:1"], quiet=True)  # type: ignore[attr-defined]
    assert image.repo_tags == ["whales/app:1"] and image.config.cmd == ["cat", "/built"]
    # Without quiet the client reads docker's "Successfully built ID" line.
    again = d.legacy_build(tmp_path, tags=["whales/app:2"], quiet=False)  # type: ignore[attr-defined]
    assert again.id == image.id and sorted(again.repo_tags) == ["whales/app:1", "whales/app:2"]
    assert d.run("whales/app:1", remove=True) == "built"  # type: ignore[attr-defined]
    assert d.run(BASE, ["sh", "-c", "echo out; echo err >&2"], remove=True) == "out"  # type: ignore[attr-defined]
    with pytest.raises(whales.exceptions.DockerException) as failed:
        d.run(BASE, ["sh", "-c", "exit 3"], remove=True)  # type: ignore[attr-defined]
    assert failed.value.return_code == 3

    ctr = d.run(BASE, ["sh", "-c", "echo started; exec sleep 60"], detach=True,  # type: ignore[attr-defined]
                name="whales-bg")
    assert ctr.name == "whales-bg" and ctr.state.running and ctr.config.image == BASE
    assert [c.id for c in d.ps()] == [ctr.id]  # type: ignore[attr-defined]
    assert d.execute("whales-bg", ["cat", "/proc/1/cmdline"]).split("\0")[:2] == ["sleep", "60"]  # type: ignore[attr-defined]
    deadline = 50
    while "started" not in d.logs("whales-bg") and deadline:  # type: ignore[attr-defined]
        deadline -= 1
        subprocess.run(["sleep", "0.1"])
    assert d.logs("whales-bg") == "started\n"  # type: ignore[attr-defined]
    d.stop("whales-bg", time=1)  # type: ignore[attr-defined]
    stopped = d.container.inspect("whales-bg")  # type: ignore[attr-defined]
    assert not stopped.state.running and stopped.state.exit_code == 137  # PID 1 ignores SIGTERM: killed
    assert stopped.state.finished_at is not None and stopped.state.finished_at >= stopped.state.started_at
    assert d.ps() == [] and [c.id for c in d.ps(all=True)] == [ctr.id]  # type: ignore[attr-defined]
    d.container.prune()  # type: ignore[attr-defined]
    assert d.ps(all=True) == []  # type: ignore[attr-defined]


def test_save_load_and_image_prune(docker: object, root: Path, tmp_path: Path) -> None:
    d = docker
    d.image.tag(BASE, "whales/saved:1")  # type: ignore[attr-defined]
    saved_id = d.image.inspect("whales/saved:1").id  # type: ignore[attr-defined]
    archive = tmp_path / "saved.tar"
    d.image.save("whales/saved:1", output=archive)  # type: ignore[attr-defined]
    with tarfile.open(archive) as tar:
        assert "manifest.json" in tar.getnames()
    d.image.remove("whales/saved:1")  # type: ignore[attr-defined]
    assert d.image.load(archive) == ["whales/saved:1"]  # type: ignore[attr-defined]
    assert d.image.inspect("whales/saved:1").id == saved_id  # type: ignore[attr-defined]

    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        info = tarfile.TarInfo("dangling")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    dangling = d.image.import_(rootfs)  # type: ignore[attr-defined]
    assert dangling.repo_tags == []
    assert dangling.id in lamina(root, "images", "-q", "--no-trunc").split()
    d.image.prune()  # type: ignore[attr-defined]
    after = lamina(root, "images", "-q", "--no-trunc").split()
    assert dangling.id not in after and saved_id in after
    usage = d.system.disk_free()  # type: ignore[attr-defined]
    assert usage.images.total_count == len(after) and usage.containers.total_count == 0


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_push_and_pull_through_a_local_registry(docker: object, tmp_path: Path) -> None:
    from registry_server import run_registry

    d = docker
    with run_registry(tmp_path / "registry") as registry:
        remote = f"{registry.address}/whales/pushed:1"
        d.image.tag(BASE, remote)  # type: ignore[attr-defined]
        pushed_id = d.image.inspect(remote).id  # type: ignore[attr-defined]
        d.image.push(remote, quiet=True)  # type: ignore[attr-defined]
        assert ("PUT", "/v2/whales/pushed/manifests/1", 201) in registry.access_log()
        d.image.remove(remote)  # type: ignore[attr-defined]
        pulled = d.image.pull(remote, quiet=True)  # type: ignore[attr-defined]
        assert pulled.id == pushed_id and remote in pulled.repo_tags
