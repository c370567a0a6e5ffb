"""``images`` and ``ps`` filters and listing flags, compared with podman's answers on the same images
and containers (podman agrees with docker on these; see lamina/commands/filters.py for docker's
rules)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from test_store_interop import podman, run_podman

from harness import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.fuse]

__all__ = ["podman"]

BASE = "lamina/busybox"


class Tools(NamedTuple):
    root: Path
    podman: object

    def lamina(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lamina", "--root", str(self.root), *args], text=True,
                              capture_output=True, cwd=REPO_ROOT, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def podman_out(self, *args: str) -> str:
        return run_podman(self.podman, *args).stdout.decode()

    def both(self, *args: str) -> tuple[str, str]:
        return self.lamina(*args), self.podman_out(*(a.replace(BASE, f"localhost/{BASE}") for a in args))


def _rootfs(path: Path, name: str) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(name)
        tar.addfile(info, io.BytesIO(name.encode()))
    return path


@pytest.fixture(scope="module")
def tools(podman: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tools]:
    """The same images and containers in a lamina store and in podman's."""
    work = tmp_path_factory.mktemp("filters")
    t = Tools(work / "root", podman)
    archive = work / "base.tar"
    t.lamina("save", "-o", str(archive), BASE)
    run_podman(podman, "load", "-i", str(archive))
    steps = [
        ("import", "--change", "LABEL color=red", str(_rootfs(work / "1.tar", "one")), "red/one:1"),
        ("import", "--change", "LABEL color=blue", "--change", "LABEL shape=round",
         str(_rootfs(work / "2.tar", "two")), "blue/two:1"),
        ("tag", "blue/two:1", "blue/two:extra"),
        ("import", str(_rootfs(work / "3.tar", "three"))),
    ]
    for step in steps:
        t.both(*step)
        time.sleep(1.1)  # created times one second apart: before= and since= need an order
    for step in [("create", "--name", "c-created", BASE, "true"),
                 ("run", "--network=none", "--name", "c-zero", BASE, "true"),
                 ("run", "--network=none", "--name", "c-three", BASE, "sh", "-c", "exit 3"),
                 ("run", "-d", "--network=none", "--name", "c-up", BASE, "sleep", "300")]:
        if step[-1] == "exit 3":  # fails in both, by design
            ours = subprocess.run([sys.executable, "-m", "lamina", "--root", str(t.root), *step], cwd=REPO_ROOT,
                                  capture_output=True, timeout=300)
            theirs = run_podman(podman, *(a.replace(BASE, f"localhost/{BASE}") for a in step), check=False)
            assert ours.returncode == theirs.returncode == 3
        else:
            t.both(*step)
        time.sleep(1.1)
    yield t
    t.lamina("rm", "-f", "c-created", "c-zero", "c-three", "c-up")


def _names_and_tags(table: str) -> set[str]:
    """REPOSITORY:TAG of each row of an ``images`` table, podman's ``localhost/`` dropped."""
    return {":".join(line.split()[:2]).removeprefix("localhost/") for line in table.splitlines()[1:]}


IMAGE_FILTERS = [
    ["dangling=true"], ["dangling=false"], ["reference=red/*"], ["reference=*/two"], ["label=color"],
    ["label=color=blue"], ["label=color=blue", "label=shape=round"], ["before=blue/two:1"],
    ["since=red/one:1"], ["dangling=false", "label=color"], ["reference=red/*", "reference=blue/*"],
]

# Where podman 4.3 answers differently from docker, docker's answer (its daemon, github moby/moby
# daemon/images/images.go): a reference filter lists only the matching names of an image, and
# every label filter must hold (podman shows all names, and any label).
DOCKER_ONLY = {
    ("reference=blue/two:extra",): {"blue/two:extra"},
    ("label=color=red", "label=shape"): set(),
}


@pytest.mark.parametrize("filters", IMAGE_FILTERS, ids=[" ".join(f) for f in IMAGE_FILTERS])
def test_images_filter_as_podman(tools: Tools, filters: list[str]) -> None:
    argv = ["images", *[arg for f in filters for arg in ("--filter", f)]]
    ours, theirs = tools.both(*argv)
    assert _names_and_tags(ours) == _names_and_tags(theirs), (ours, theirs)


@pytest.mark.parametrize("filters", list(DOCKER_ONLY), ids=[" ".join(f) for f in DOCKER_ONLY])
def test_images_filter_as_docker_where_podman_differs(tools: Tools, filters: tuple[str, ...]) -> None:
    argv = ["images", *[arg for f in filters for arg in ("--filter", f)]]
    ours, theirs = tools.both(*argv)
    assert _names_and_tags(ours) == DOCKER_ONLY[filters], ours
    assert _names_and_tags(theirs) != DOCKER_ONLY[filters], "podman now answers as docker: compare with it"


def test_images_no_trunc_and_digests(tools: Tools) -> None:
    ours, theirs = tools.both("images", "-q", "--no-trunc", BASE)
    assert ours == theirs and ours.startswith("sha256:")
    table = tools.lamina("images", "--digests", BASE).splitlines()
    assert table[0].split()[:3] == ["REPOSITORY", "TAG", "DIGEST"]
    assert table[1].split()[2] == tools.lamina("inspect", "--format", "{{.Digest}}", BASE).strip()
    long_id = tools.lamina("images", "--no-trunc", BASE).splitlines()[1].split()[2]
    assert long_id == ours.strip()


PS_QUERIES = [
    ["-a", "--filter", "status=exited"], ["-a", "--filter", "status=created"], ["--filter", "status=running"],
    ["--filter", "status=exited"], ["-a", "--filter", "exited=3"], ["-a", "--filter", "exited=0"],
    ["-a", "--filter", "name=c-t"], ["-a", "--filter", "name=^c-z"], ["-a", "--filter", f"ancestor={BASE}"],
    ["-a", "--filter", "since=c-zero"], ["-a", "--filter", "before=c-three"], ["-n", "2"], ["-l"],
    ["-a", "--filter", "status=exited", "--filter", "status=created"],
    ["-a", "--filter", "name=c-", "--filter", "exited=3"],
]


@pytest.mark.parametrize("query", PS_QUERIES, ids=[" ".join(q) for q in PS_QUERIES])
def test_ps_filter_as_podman(tools: Tools, query: list[str]) -> None:
    ours, theirs = tools.both("ps", *query, "--format", "{{.Names}}")
    assert sorted(ours.split()) == sorted(theirs.split()), query


def test_ps_id_filter_no_trunc_and_size(tools: Tools) -> None:
    full_id = tools.lamina("ps", "-q", "--no-trunc", "--filter", "name=c-up").strip()
    assert len(full_id) == 64
    assert tools.lamina("ps", "-a", "--filter", f"id={full_id[:10]}", "--format", "{{.Names}}").split() == ["c-up"]
    sized = tools.lamina("ps", "-s", "--filter", "name=c-up").splitlines()
    assert sized[0].split()[-1] == "SIZE" and "(virtual " in sized[1]
    podman_sized = tools.podman_out("ps", "-s", "--filter", "name=c-up").splitlines()
    assert podman_sized[0].split()[-1] == "SIZE" and "(virtual " in podman_sized[1]
