"""The inspector on an image made by ``lamina build`` and a container made by ``lamina run``.

The Dockerfile has three layers over the busybox base: layer 2 creates /etc/motd and /app/cache/blob,
layer 3 (COPY) shadows /etc/motd, layer 4 deletes /etc/motd (a whiteout) and re-creates /app/cache
(an opaque directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT, fuse_mounts_under
from test_inspector_render import CHROMIUM, run_chromium

DOCKERFILE = """\
FROM lamina/busybox
RUN echo "version 1" > /etc/motd && mkdir -p /app/cache && echo data > /app/cache/blob
COPY motd /etc/motd
RUN rm /etc/motd && rm -rf /app/cache && mkdir /app/cache && echo fresh > /app/cache/new
"""


def lamina(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, f"lamina {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store holding ``demo`` built from :data:`DOCKERFILE` (built once for the module)."""
    base = tmp_path_factory.mktemp("built")
    context = base / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "motd").write_text("Welcome, from the COPY layer\n")
    root = base / "root"
    lamina(root, "build", "-t", "demo", str(context))
    yield root
    for mountpoint in fuse_mounts_under(base):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_which_on_a_built_image(built: Path) -> None:
    motd = json.loads(lamina(built, "which", "demo", "/etc/motd", "--json").stdout)
    assert [(h["layer"], h["event"]) for h in motd["history"]] == [(2, "added"), (3, "changed"), (4, "deleted")]
    assert motd["history"][1]["instruction"] == "COPY motd /etc/motd"
    assert motd["present"] is False

    blob = lamina(built, "which", "demo", "/app/cache/blob").stdout
    assert "hidden by /app/cache (opaque directory)" in blob
    cache = json.loads(lamina(built, "which", "demo", "/app/cache", "--json").stdout)
    assert cache["provided_by"]["layer"] == 4 and cache["shadows"] == []
    assert [h["event"] for h in cache["history"]] == ["added", "opaque"]

    sh = json.loads(lamina(built, "which", "demo", "/bin/busybox", "--json").stdout)
    assert sh["provided_by"]["layer"] == 1 and sh["shadows"] == [] and sh["removed"] == []


def test_layers_of_a_built_image(built: Path, tmp_path: Path) -> None:
    data = json.loads(lamina(built, "layers", "demo", "--json").stdout)
    rows = data["layers"]
    assert len(rows) == 4
    assert rows[2]["instruction"] == "COPY motd /etc/motd" and rows[2]["changed"] == 1
    assert rows[3]["whiteouts"] == ["/etc/motd"] and rows[3]["opaque_dirs"] == ["/app/cache"]
    assert rows[1]["wasted"] == len("version 1\n") + len("data\n")      # overwritten, then deleted
    assert rows[2]["wasted"] == len("Welcome, from the COPY layer\n")
    assert rows[0]["wasted"] == 0 and 0 < data["efficiency"] < 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
def test_layers_html_of_a_built_image_in_chromium(built: Path, tmp_path: Path) -> None:
    page = tmp_path / "demo.html"
    lamina(built, "layers", "demo", "--html", str(page))
    dom = run_chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="band layer"') == 4
    assert dom.stdout.count('class="band container-layer"') == 1
    assert "whiteout: /etc/motd" in dom.stdout and "opaque: /app/cache" in dom.stdout


@pytest.mark.fuse
def test_mount_a_container_read_only_and_rw(built: Path, tmp_path: Path) -> None:
    lamina(built, "run", "--name", "c1", "demo", "sh", "-c",
           "echo hi > /hello && rm /etc/group && echo more >> /etc/passwd")
    mnt = Path(lamina(built, "mount", "c1").stdout.strip())
    try:
        assert (mnt / "hello").read_text() == "hi\n"
        assert not (mnt / "etc/group").exists()
        assert (mnt / "etc/passwd").read_text().endswith("more\n")
        upper_layer = os.getxattr(mnt / "hello", "user.lamina.layer").decode()
        assert upper_layer.startswith("lower:0:") and upper_layer.endswith("/upper")   # read-only view
        assert os.getxattr(mnt / "app/cache/new", "user.lamina.layer").decode().startswith("lower:1:")
        with pytest.raises(OSError):
            (mnt / "hello").write_text("no")
    finally:
        lamina(built, "umount", str(mnt))

    target = tmp_path / "rw"
    target.mkdir()
    lamina(built, "mount", "--rw", "c1", str(target))
    try:
        (target / "added-later").write_text("x\n")
        assert os.getxattr(target / "added-later", "user.lamina.layer") == b"upper"
    finally:
        lamina(built, "umount", str(target))
    assert fuse_mounts_under(tmp_path) == []
    diff = lamina(built, "diff", "c1").stdout.splitlines()
    assert "A /added-later" in diff and "A /hello" in diff and "D /etc/group" in diff

    which = lamina(built, "which", "c1", "/hello").stdout
    assert which.splitlines()[0] == "/hello: provided by the container layer"
    group = lamina(built, "which", "c1", "/etc/group").stdout
    assert "not in the container (deleted)" in group and "removed by   container layer" in group
    data = json.loads(lamina(built, "layers", "c1", "--json").stdout)
    top = data["layers"][-1]
    assert top["container"] is True and len(data["layers"]) == 5
    assert (top["added"], top["changed"], top["deleted"]) == (2, 1, 1)      # hello + added-later, passwd, group
    assert top["whiteouts"] == ["/etc/group"]
    page = tmp_path / "c1.html"
    lamina(built, "layers", "c1", "--html", str(page))
    html = page.read_text()
    assert html.count('class="band layer"') == 4 and html.count('class="band container-layer"') == 1
    assert "upperdir of container c1" in html and "whiteout: /etc/group" in html

    upto = lamina(built, "mount", "--upto", "2", "c1", check=False)
    assert upto.returncode == 125 and "--upto applies to images" in upto.stderr
