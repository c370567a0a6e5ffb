"""Faults leave no debris (issue 13 item 6): what a failed or killed lamina command made is removed
by the command itself or, when it was killed, by the next lamina command that uses the store.

- ENOSPC while ``load`` writes a blob: the temporary blob goes (closing it flushes and fails again;
  that must not skip the unlink), and the next command works on the same small filesystem;
- ``kill -9`` of a build while a RUN step runs: no sandbox directory stays (under /tmp or in the
  store) once the next command has run;
- ``kill -9`` of ``run --rm``: the next command removes the container.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT

pytestmark = [pytest.mark.fuse]

IMAGE = "lamina/busybox"


def _lamina_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.mark.root
def test_enospc_during_load_leaves_no_temporary_blob(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs privately")
    work = tmp_path / "work"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN head -c 12000000 /dev/urandom > /big\n")
    for args in (("build", "-q", "-t", "big", str(context)), ("save", "-o", str(tmp_path / "big.tar"), "big"),
                 ("save", "-o", str(tmp_path / "small.tar"), IMAGE)):
        r = _run(_lamina_argv(work, *args))
        assert r.returncode == 0, r.stderr
    small_store = tmp_path / "small"
    small_store.mkdir()
    lamina = " ".join(_lamina_argv(small_store))
    # In a private mount namespace: a 6 MB store, too small for the 12 MB layer but not for busybox.
    script = f"""
        mount -t tmpfs -o size=6m tmpfs {small_store} || exit 99
        {lamina} load -i {tmp_path / 'big.tar'} >/dev/null 2>{tmp_path / 'big.err'}; echo "big=$?"
        echo "left=$(find {small_store}/tmp -type f | wc -l)"
        echo "used=$(du -sk {small_store} | cut -f1)"
        {lamina} load -i {tmp_path / 'small.tar'} >/dev/null 2>{tmp_path / 'small.err'}; echo "small=$?"
        {lamina} images
    """
    r = _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert "big=" in r.stdout, (r.stdout, r.stderr)
    results = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert results["big"] != "0", "the 12 MB layer fit in 6 MB: the test proves nothing"
    assert "no space left" in (tmp_path / "big.err").read_text().lower()
    assert results["left"] == "0", f"temporary files left in the store's tmp/: {results['left']}"
    assert int(results["used"]) < 3000, f"{results['used']} kB still used after the failed load"
    assert results["small"] == "0", (tmp_path / "small.err").read_text()
    assert IMAGE in r.stdout.splitlines()[-1]


class Cli:
    """lamina as root (store under tmp_path) or as an unprivileged user, run to the end or started."""

    def __init__(self, tmp_path: Path, user: object | None) -> None:
        self.user = user
        self.root: Path = user.workdir / "root" if user is not None else tmp_path / "root"  # type: ignore[attr-defined]
        self.scratch: Path = user.workdir if user is not None else tmp_path  # type: ignore[attr-defined]
        self.tmpdir = self.scratch / "tmpdir"

    def _spawn_args(self, *args: str) -> tuple[list[str], dict[str, object]]:
        # A TMPDIR of its own: what lamina leaves in a temporary directory shows there, apart from
        # other lamina processes on the machine.
        self.tmpdir.mkdir(exist_ok=True)
        if self.user is None:
            return _lamina_argv(self.root, *args), {"cwd": REPO_ROOT,
                                                    "env": {**os.environ, "TMPDIR": str(self.tmpdir)}}
        user = self.user
        self.user.chown_tree(self.tmpdir)  # type: ignore[attr-defined]
        return ["lamina", *args], {"cwd": user.workdir, "env": user.env({"TMPDIR": str(self.tmpdir)}),  # type: ignore[attr-defined]
                                   "user": user.uid, "group": user.gid, "extra_groups": []}  # type: ignore[attr-defined]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv, kwargs = self._spawn_args(*args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=300,  # type: ignore[call-overload, no-any-return]
                              stdin=subprocess.DEVNULL, **kwargs)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        argv, kwargs = self._spawn_args(*args)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # type: ignore[call-overload, no-any-return]
                                stderr=subprocess.DEVNULL, **kwargs)

    def context(self, dockerfile: str) -> Path:
        context = self.scratch / "context"
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile)
        if self.user is not None:
            self.user.chown_tree(context)  # type: ignore[attr-defined]
        return context


@pytest.fixture(params=["root", "unpriv_subids", "unpriv_nosubids"])
def lamina(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    if os.geteuid() != 0:
        pytest.skip("needs root (to create the unprivileged user too)")
    user = request.getfixturevalue(request.param) if request.param != "root" else None
    cli = Cli(tmp_path, user)
    yield cli
    ids = cli("ps", "-aq").stdout.split()
    if ids:
        cli("rm", "-f", *ids)


def _wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _running_sleep(seconds: str) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == f"sleep\0{seconds}\0".encode():
                return True
    return False


def test_a_killed_build_leaves_no_sandbox_directory(lamina: Cli) -> None:
    # The step leaves files only namespace root may delete (other ids, a 0700 directory).
    context = lamina.context(f"FROM {IMAGE}\nRUN mkdir -m 700 /d && touch /d/f && chown -R nobody /d "
                             "2>/dev/null; sleep 61.5\n")
    build = lamina.start("build", "-t", "killed", str(context))
    try:
        _wait_for(lambda: _running_sleep("61.5"), "the RUN step to run")
    finally:
        build.send_signal(signal.SIGKILL)
        build.wait()
    _wait_for(lambda: not _running_sleep("61.5"), "the RUN step to die with the build", timeout=10)
    r = lamina("images")
    assert r.returncode == 0, r.stderr
    assert os.listdir(lamina.tmpdir) == []
    left = sorted(entry.name for entry in os.scandir(lamina.root / "tmp"))
    assert left == [], f"left in the store's tmp/: {left}"


def test_a_killed_run_rm_is_removed_by_the_next_command(lamina: Cli) -> None:
    run = lamina.start("run", "--rm", IMAGE, "sleep", "62.5")
    try:
        _wait_for(lambda: _running_sleep("62.5") and lamina("ps", "-q").stdout.strip() != "",
                  "the container to run")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    r = lamina("images")
    assert r.returncode == 0, r.stderr
    containers = lamina.root / "containers"
    _wait_for(lambda: [e.name for e in os.scandir(containers) if not e.name.startswith(".lock")] == [],
              "the container's directory to be deleted", timeout=20)
    assert lamina("ps", "-aq").stdout == ""


@pytest.mark.root
def test_a_blob_writer_that_runs_out_of_space_removes_its_temporary_file(tmp_path: Path) -> None:
    """Small writes sit in the file's buffer: the flush fails with ENOSPC, and so does the close
    in the cleanup. The temporary blob must go all the same."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs privately")
    store = tmp_path / "store"
    store.mkdir()
    code = f"""
import os
from pathlib import Path
from lamina.layout import Layout
from lamina.store.blobs import BlobStore
layout = Layout(Path({str(store)!r}))
blobs = BlobStore(layout.blobs, layout.tmp)
try:
    with blobs.writer() as w:
        while True:
            w.write(os.urandom(1000))
except OSError as e:
    print("error", e.errno)
print("left", len(os.listdir(blobs.tmp_dir)))
"""
    (tmp_path / "fill.py").write_text(code)
    script = f"mount -t tmpfs -o size=1m tmpfs {store} || exit 99\n{sys.executable} {tmp_path / 'fill.py'}"
    r = _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.stdout.splitlines() == ["error 28", "left 0"], (r.stdout, r.stderr)


# lamina's command line, with an `rmi` of the container's image landing right after `run` created
# the container (the race a concurrent `lamina rmi -f` can win).
RMI_RACE_DRIVER = r"""
import sys
from runner import state
from lamina.store import Store

created = state.ContainerStore.create


def create_then_lose_the_image(self, container):
    made = created(self, container)
    store = Store.open(self.root)
    store.delete_image(store.resolve_image(container.image_id))
    return made


state.ContainerStore.create = create_then_lose_the_image
from lamina.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.root
def test_run_rm_whose_image_is_removed_meanwhile_leaves_no_container(tmp_path: Path) -> None:
    root = tmp_path / "root"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL doomed=1\n")
    r = _run(_lamina_argv(root, "build", "-q", "-t", "doomed", str(context)))
    assert r.returncode == 0, r.stderr
    r = _run([sys.executable, "-c", RMI_RACE_DRIVER, "--root", str(root), "run", "--rm", "doomed", "true"])
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert _run(_lamina_argv(root, "ps", "-aq")).stdout == ""
    _wait_for(lambda: [e.name for e in os.scandir(root / "containers") if e.name != ".lock"] == [],
              "the container's directory to be deleted", timeout=20)
