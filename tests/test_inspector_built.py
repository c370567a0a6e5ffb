"""The inspector on an image made by ``lamina build`` and a container made by ``lamina run``.

The Dockerfile has three layers over the busybox base: layer 2 creates /etc/motd and /app/cache/blob,
layer 3 (COPY) shadows /etc/motd, layer 4 deletes /etc/motd (a whiteout) and re-creates /app/cache
(an opaque directory).
"""

from __future__ import annotations

import json
import os
import re
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


def _tar_listing(layer_tar: Path) -> dict[str, tuple[str, int, str]]:
    """GNU tar's own view of a layer: path -> (type letter, size, link target)."""
    out = subprocess.run(["tar", "--numeric-owner", "-tvf", str(layer_tar)], capture_output=True, text=True,
                         check=True).stdout
    entries = {}
    for line in out.splitlines():
        mode, _owner, size, _date, _time, name = line.split(maxsplit=5)
        target = ""
        if mode[0] == "l":
            name, target = name.split(" -> ", 1)
        elif " link to " in name:
            name, target = name.split(" link to ", 1)
            mode = "h" + mode[1:]
        entries["/" + name.strip("/").removeprefix("./")] = (mode[0], int(size), target)
    entries.pop("/", None)
    return entries


def test_layer_trees_agree_with_tar_listings(built: Path, tmp_path: Path) -> None:
    """Each layer's changes, as `lamina layers --tree`, against `tar -tv` of the saved layer tars."""
    archive = tmp_path / "demo.tar"
    lamina(built, "save", "-o", str(archive), "demo")
    unpacked = tmp_path / "saved"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(unpacked)], check=True)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    layer_tars = manifest[0]["Layers"]
    data = json.loads(lamina(built, "layers", "demo", "--tree", "--changes-only", "--json").stdout)
    assert [t["layer"] for t in data["trees"]] == list(range(1, len(layer_tars) + 1))

    for layer_tar, tree in zip(layer_tars, data["trees"], strict=True):
        nodes = {}
        pending = [tree["tree"]]
        while pending:
            node = pending.pop()
            nodes[node["path"]] = node
            pending.extend(node.get("children", []))
        listing = _tar_listing(unpacked / layer_tar)
        whiteouts = {p.rsplit("/", 1)[0] + "/" + p.rsplit("/", 1)[1][len(".wh."):]
                     for p in listing if p.rsplit("/", 1)[1].startswith(".wh.") and not p.endswith(".wh..wh..opq")}
        opaque = {p.rsplit("/", 1)[0] for p in listing if p.endswith("/.wh..wh..opq")}
        files = {p: e for p, e in listing.items() if not p.rsplit("/", 1)[1].startswith(".wh.")}
        assert {p for p, n in nodes.items() if "whiteout" in n["notes"]} == whiteouts, layer_tar
        assert {p for p, n in nodes.items() if "opaque" in n["notes"]} == opaque, layer_tar
        added_or_modified = {p for p, n in nodes.items() if n["change"] in ("A", "M") and n["kind"] != "dir"}
        assert added_or_modified == {p for p, (kind, _, _) in files.items() if kind != "d"}, layer_tar
        for path, (kind, size, target) in files.items():
            node = nodes[path] if kind != "d" else nodes.get(path)
            if kind == "-":
                assert (node["kind"], node["size"]) == ("file", size), path
            elif kind == "l":
                assert (node["kind"], node["size"]) == ("symlink", len(target.encode())), path
            elif kind == "h":   # a hard link's bytes are carried (and counted) once per layer
                assert node["kind"] == "file", path
    assert len(layer_tars) == 4


def test_fail_on_thresholds_exit_like_dive_ci(built: Path) -> None:
    data = json.loads(lamina(built, "layers", "demo", "--json").stdout)["dive"]
    # by hand: /etc/motd is met three times (10 + 29 + its whiteout, 0), nothing else twice
    assert data["wasted_bytes"] == len("version 1\n") + len("Welcome, from the COPY layer\n")
    share = data["wasted_user_share"] * 100
    ok = lamina(built, "layers", "demo", "--fail-on-waste", f"{share + 1:.2f}", "--fail-on-efficiency", "0.9")
    assert ok.stdout.splitlines()[-1].startswith("dive's figures: efficiency 99.99")
    fails = lamina(built, "layers", "demo", "--fail-on-waste", f"{share - 1:.2f}", check=False)
    assert fails.returncode == 1 and "too many bytes wasted" in fails.stderr
    assert len(fails.stderr.splitlines()) == 1 and "#  DIFF ID" in fails.stdout   # the report, then the verdict
    low = lamina(built, "layers", "demo", "--fail-on-efficiency", "1", check=False)
    assert low.returncode == 1 and "image efficiency is too low" in low.stderr
    bad = lamina(built, "layers", "demo", "--fail-on-waste", "lots", check=False)
    assert bad.returncode == 125 and "--fail-on-waste lots: not a number" in bad.stderr
    wasted = lamina(built, "layers", "demo", "--wasted").stdout
    assert "3 hidden copies of files, 44 B in all" in wasted and "hidden by /app/cache" in wasted


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
def test_explorable_page_in_chromium(built: Path, tmp_path: Path) -> None:
    """Click layers and directories with real mouse events; the trees follow the selection."""
    from cdp import Browser

    assert CHROMIUM is not None
    page = tmp_path / "demo.html"
    lamina(built, "layers", "demo", "--html", str(page))
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)|fetch\(|XMLHttpRequest|import\(""", text)
    with Browser(CHROMIUM, tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        assert browser.evaluate("document.body.dataset.selected") == "4"     # the top layer at first

        def entry(pane: str, path: str) -> list[str] | None:
            return browser.evaluate(  # type: ignore[no-any-return]
                f"(() => {{ const e = document.querySelector('#{pane} .entry[data-path=\"{path}\"]');"
                " return e ? [...e.children].map(c => c.textContent) : null; })()")

        browser.click('g.band[data-layer="1"]')
        assert browser.evaluate("document.body.dataset.selected") == "1"
        assert entry("merged", "/etc") is not None and entry("merged", "/etc/motd") is None

        browser.click('g.band[data-layer="3"]')
        assert browser.evaluate("document.getElementById('upto').textContent") == "3"
        assert entry("changes", "/etc/motd") == ["M", "motd", "29 B", "layer 3"]
        # The merged view starts collapsed: /etc's entries appear when it is clicked open.
        assert entry("merged", "/etc/passwd") is None
        browser.click('#merged details[data-path="/etc"] > summary')
        assert browser.evaluate("document.querySelector('#merged details[data-path=\"/etc\"]').open") is True
        browser.wait_for("!!document.querySelector('#merged .entry[data-path=\"/etc/passwd\"]')")
        assert entry("merged", "/etc/passwd")[:2] == [" ", "passwd"]
        assert entry("merged", "/etc/motd") == ["M", "motd", "29 B", "layer 3"]

        browser.click('tr.layer-row[data-layer="4"]')
        assert entry("changes", "/etc/motd") == ["D", "motd", "29 B", "whiteout", "layer 3"]
        assert entry("changes", "/app/cache")[:4] == ["M", "cache/", "6 B", "opaque"]
        legend = browser.evaluate("document.getElementById('legend').innerText")
        assert "whiteout: the layer deleted this path" in legend and "opaque directory:" in legend
        badge = browser.evaluate("document.querySelector('#changes .badge-whiteout').title")
        assert badge.startswith("whiteout: the layer deleted this path")
        browser.screenshot(tmp_path / "explorer.png")
    assert (tmp_path / "explorer.png").read_bytes().startswith(b"\x89PNG")


def test_terminal_explorer_in_a_pty(built: Path) -> None:
    """`lamina layers --explore` draws with curses in a real terminal, follows keys, quits on q."""
    from runner_support import on_pty, read_until

    argv = [sys.executable, "-m", "lamina", "--root", str(built), "layers", "demo", "--explore"]
    with on_pty(argv, rows=30, cols=120, cwd=REPO_ROOT, env={**os.environ, "TERM": "xterm"}) as (proc, master):
        screen = read_until(master, b"changes of layer 4", timeout=60)
        screen = read_until(master, b"[whiteout]", timeout=60, seen=screen)
        os.write(master, b"\x1bOB")                 # down (xterm keypad mode): the older layer 3
        # curses redraws only what changed; the whole title is new after c, proving both keys.
        os.write(master, b"c")
        read_until(master, b"merged view up to layer 3", timeout=60, seen=screen)
        os.write(master, b"q")
        assert proc.wait(timeout=60) == 0
    no_tty = lamina(built, "layers", "demo", "--explore", check=False)
    assert no_tty.returncode == 125 and "--explore needs a terminal" in no_tty.stderr
