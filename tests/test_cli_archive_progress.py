"""Progress of save, load and import, as pull's and push's: a line (a bar on a terminal) per layer,
plain lines in a pipe, and -q as docker's. docker's save and import print no progress at all, so a
short one stays silent in a pipe; standard output keeps what scripts read (the archive, the ID,
the "Loaded image" lines)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from harness import run_with_a_terminal

from lamina.application import open_store
from lamina.store.archive import DOCKER_ARCHIVE, OCI_ARCHIVE, SaveItem, save
from lamina.store.importer import import_tarball
from lamina.store.progress import LayerProgress, PlainRenderer

Cli = Callable[..., subprocess.CompletedProcess[str]]
ESCAPES = re.compile(r"\x1b\[\d*[A-Za-z]")


def rootfs(path: Path, size: int = 300_000) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in (("bin/tool", os.urandom(size)), ("etc/motd", b"hi\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def with_stderr_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with its standard error on a pseudo-terminal; its exit code and what the
    terminal showed."""
    result, shown = run_with_a_terminal(argv, "stderr")
    return result.returncode, shown


def test_save_shows_a_bar_per_layer_on_a_terminal_and_nothing_when_short_in_a_pipe(
        lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    lamina_cmd("import", str(rootfs(tmp_path / "r.tar")), "big:1")
    diff_id = open_store(root).resolve_image("big:1").layers[0].diff_id
    lamina = [sys.executable, "-m", "lamina", "--root", str(root)]
    code, shown = with_stderr_on_a_terminal([*lamina, "save", "-o", str(tmp_path / "a.tar"), "big:1"])
    assert code == 0
    assert re.search(rf"{diff_id[7:19]}: Saving layer  \[=+>? *\]  \S+B/\S+B", shown), shown
    with open(tmp_path / "b.tar", "wb") as out:  # the archive on stdout, stderr piped
        piped = subprocess.run([*lamina, "save", "big:1"], stdout=out, stderr=subprocess.PIPE, check=True)
    assert piped.stderr == b""  # docker's save prints nothing; a short one stays so
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    code, shown = with_stderr_on_a_terminal([*lamina, "save", "-q", "-o", str(tmp_path / "c.tar"), "big:1"])
    assert code == 0 and shown == ""


def test_save_reports_each_layer_in_both_formats(lamina_cmd: Cli, tmp_path: Path) -> None:
    """In a pipe a long save is never silent: a line per layer (forced here by no silent start)."""
    lamina_cmd("import", str(rootfs(tmp_path / "r.tar")), "big:1")
    store = open_store(tmp_path / "lamina-root")
    image = store.resolve_image("big:1")
    for fmt, ident in ((DOCKER_ARCHIVE, image.layers[0].diff_id), (OCI_ARCHIVE, image.layers[0].digest)):
        out = io.StringIO()
        save(store, [SaveItem(image, [])], tmp_path / f"{fmt}.tar", fmt, LayerProgress(PlainRenderer(out)))
        size = f"{image.layers[0].size // 1000}"
        lines = out.getvalue().splitlines()
        assert lines[0].startswith(f"{ident[7:19]}: Saving layer  "), lines
        assert re.fullmatch(rf"{ident[7:19]}: Saving layer  (\S+)B/\1B", lines[-1]) and size[:2] in lines[-1], lines


def test_import_progress_on_stderr_and_the_id_alone_on_stdout(lamina_cmd: Cli, tmp_path: Path) -> None:
    root = tmp_path / "lamina-root"
    tar = rootfs(tmp_path / "r.tar")
    lamina = [sys.executable, "-m", "lamina", "--root", str(root)]
    code, shown = with_stderr_on_a_terminal([*lamina, "import", str(tar), "imp:1"])
    assert code == 0
    plain = ESCAPES.sub("", shown)
    assert re.search(r"import: Importing  \[=+>? *\]  \S+B/\S+B", shown), shown
    assert "import: Import complete" in plain
    piped = lamina_cmd("import", str(tar), "imp:2")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", piped.stdout) and piped.stderr == ""
    out = io.StringIO()
    image = import_tarball(open_store(root), str(tar), ["imp:3"], [], None, LayerProgress(PlainRenderer(out)))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("import: Importing  ") and lines[-1] == "import: Import complete", lines
    assert image.layers == open_store(root).resolve_image("imp:2").layers


def test_load_quiet_prints_only_what_was_loaded(lamina_cmd: Cli, tmp_path: Path) -> None:
    lamina_cmd("import", str(rootfs(tmp_path / "r.tar")), "ld:1")
    lamina_cmd("save", "-o", str(tmp_path / "a.tar"), "ld:1")
    other = tmp_path / "other"
    quiet = lamina_cmd("load", "-q", "-i", str(tmp_path / "a.tar"), root=other)
    assert (quiet.stdout, quiet.stderr) == ("Loaded image: ld:1\n", "")
    lamina_cmd("rmi", "ld:1", root=other)
    loud = lamina_cmd("load", "-i", str(tmp_path / "a.tar"), root=other).stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{12}: Loading layer  \S+B/\S+B", loud[0]) and loud[-1] == "Loaded image: ld:1"
