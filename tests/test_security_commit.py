"""Host-side reads of a container's files never follow a symlink or leave the tree (issue 13, item 2).

The attack is docker's CVE-2018-15664 (``docker cp`` symlink-exchange race): a process inside a
running container swaps a regular file with a symlink to a host path, in a loop, while the host
reads the container's upper directory by path. A reader that checks with ``lstat`` and then
``open``s the path reads the host file, as root, into the image.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import UnprivilegedUser, fuse_mounts_under
from runner.freeze import container_pids, paused
from lamina.store import Store, fdtree
from lamina.store.layer_pack import pack_layer

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
IMAGE = "lamina/busybox"
EXCHANGER_SOURCE = Path(__file__).parent / "security" / "exchanger.c"
PAIRS = 64  # swapped pairs per container: many chances per commit for a reader that follows
COMMITS = 12


# --- the descriptor-relative reader ---------------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def open_beneath_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the kernel's openat2 and with the component-by-component fallback."""
    if request.param == "walk":
        monkeypatch.setattr(fdtree, "_have_openat2", False)
    return str(request.param)


def test_open_beneath_refuses_a_symlinked_intermediate_directory(tmp_path: Path, open_beneath_mode: str) -> None:
    """The CVE-2018-15664 class at its smallest: ``a`` is a symlink to a host directory holding
    ``secret``; ``a/secret`` opened beneath the tree must fail, not read the host file."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host secret")
    tree = tmp_path / "tree"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "file").write_text("inside")
    (tree / "a").symlink_to(host)
    (tree / "real" / "last").symlink_to(host / "secret")
    with fdtree.opened(fdtree.open_root(tree)) as root:
        with fdtree.opened(fdtree.open_beneath(root, "real/file")) as fd:
            assert os.read(fd, 100) == b"inside"
        for path in ("a/secret", "real/last", "a"):
            with pytest.raises(OSError) as caught:
                os.close(fdtree.open_beneath(root, path))
            assert caught.value.errno == errno.ELOOP, path
        for path in ("../host/secret", "real/../../host/secret", str(host / "secret")):
            with pytest.raises(OSError) as caught:
                os.close(fdtree.open_beneath(root, path))
            assert caught.value.errno == errno.EXDEV, path


def test_pack_reads_what_the_descriptor_holds_when_a_file_becomes_a_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made deterministic: the packer's lstat says ``f`` is a regular file, and then ``f``
    is a symlink to a host file (as a container's RENAME_EXCHANGE leaves it). The layer gets the
    symlink, never the host file's content."""
    secret = tmp_path / "secret"
    token = secrets.token_hex(16)
    secret.write_text(token)
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_text("inside")
    real_lstat = fdtree.lstat_in

    def lstat_then_swap(dir_fd: int, name: str) -> os.stat_result:
        st = real_lstat(dir_fd, name)
        if name == "f" and stat.S_ISREG(st.st_mode):
            os.unlink(upper / "f")
            os.symlink(secret, upper / "f")
        return st

    monkeypatch.setattr(fdtree, "lstat_in", lstat_then_swap)
    out = tmp_path / "layer.tar"
    with open(out, "wb") as f:
        pack_layer(upper, f, compress=False)
    data = out.read_bytes()
    assert token.encode() not in data
    assert str(secret).encode() in data  # the symlink, as the directory now holds it


def test_deep_trees_pack_and_too_deep_ones_fail_in_one_line(tmp_path: Path) -> None:
    """A container can nest directories as deep as it likes; packing walks them without recursion
    (the old reader hit Python's recursion limit near 500 levels) and refuses past MAX_DEPTH."""
    from lamina.errors import LayerError
    from lamina.store.layer_pack import MAX_DEPTH

    def nest(top: Path, depth: int) -> None:
        top.mkdir()
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(fd)

    nest(tmp_path / "deep", MAX_DEPTH - 1)
    out = tmp_path / "deep.tar"
    with open(out, "wb") as f:
        pack_layer(tmp_path / "deep", f, compress=False)
    with tarfile.open(out) as tar:
        assert max(name.count("/") for name in tar.getnames()) == MAX_DEPTH - 2
    nest(tmp_path / "deeper", MAX_DEPTH + 1)
    with pytest.raises(LayerError, match=f"deeper than {MAX_DEPTH} levels"), open(out, "wb") as f:
        pack_layer(tmp_path / "deeper", f, compress=False)


# --- pausing ----------------------------------------------------------------------------------------


def _state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2:].split()[0]


@pytest.mark.root
def test_pause_stops_every_process_of_the_container_and_resumes_them() -> None:
    """SIGSTOP reaches the init of a PID namespace and its children; an already stopped process
    stays stopped afterwards (it is not ours to continue)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        init = 0
        while time.monotonic() < deadline:
            children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
            if children:
                init = int(children[0])
                if len(container_pids(init)) == 3:
                    break
            time.sleep(0.02)
        members = container_pids(init)
        assert len(members) == 3 and outer.pid not in members
        already = max(members)
        os.kill(already, signal.SIGSTOP)
        while _state(already) != "T":
            time.sleep(0.01)
        with paused(init):
            assert {_state(pid) for pid in members} == {"T"}
            assert _state(outer.pid) != "T"
        assert _state(already) == "T"
        assert {_state(pid) for pid in members - {already}} <= {"S", "R"}
    finally:
        outer.kill()
        outer.wait()
        subprocess.run(["pkill", "-KILL", "-P", str(outer.pid)], check=False)


# --- the race, end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exchanger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hostile helper, compiled static so it runs on the busybox-static base."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (needed to build the static race helper)")
    bindir = tmp_path_factory.mktemp("exchanger")
    binary = bindir / "exchanger"
    built = subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(EXCHANGER_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a static binary here: {built.stderr.strip()[:200]}")
    bindir.chmod(0o755)
    return bindir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def lamina(lamina_cmd: Lamina, root: Path) -> Iterator[Lamina]:
    """``lamina(*args)`` on this test's store, unchecked; its containers are removed afterwards."""

    def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return lamina_cmd(*args, root=root, check=False, **kwargs)

    yield run
    leftover = run("ps", "-aq").stdout.split()
    assert not leftover or run("rm", "-f", *leftover).returncode == 0
    assert fuse_mounts_under(root) == []


def _layer_leaks(root: Path, image_id: str, token: bytes) -> list[str]:
    """Files of the image's top layer (as stored) whose content holds ``token``."""
    layer = Store(root).load_image(image_id.removeprefix("sha256:")).layers[-1]
    leaks = []
    for dirpath, _dirs, files in os.walk(layer.path):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode) and token in Path(path).read_bytes():
                leaks.append(path)
    return leaks


def _assert_commits_pack_no_leak(lamina: Lamina, root: Path, name: str, pauses: list[str], token: bytes) -> None:
    for attempt, pause in enumerate(pauses):
        r = lamina("commit", pause, name)
        assert r.returncode == 0, r.stderr
        leaks = _layer_leaks(root, r.stdout.strip(), token)
        assert leaks == [], f"commit {attempt + 1} packed the host file as {leaks}"
    pid = int(lamina("inspect", "--format", "{{.State.Pid}}", name).stdout)
    assert _state(pid) != "T", "the container stayed paused after commit"
    assert lamina("inspect", "--format", "{{.State.Running}}", name).stdout.strip().lower() == "true"


def _start_exchanger(lamina: Lamina, exchanger: Path, target: Path, *kind: str) -> str:
    name = "racer-" + secrets.token_hex(3)
    r = lamina("run", "-d", "--name", name, "-v", f"{exchanger}:/h:ro", IMAGE, "sh", "-c",
               f"mkdir /race && exec /h/exchanger /race {target} {PAIRS} {' '.join(kind)}")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while "ready" not in lamina("logs", name).stdout:
        assert time.monotonic() < deadline, lamina("logs", name).stderr
        time.sleep(0.05)
    return name


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.parametrize("pause", ["--pause=false", "--pause=true"])
def test_commit_of_a_racing_container_never_packs_a_host_file(lamina: Lamina, root: Path, exchanger: Path,
                                                              tmp_path: Path, pause: str) -> None:
    """CVE-2018-15664 class (docker cp symlink-exchange race), against ``lamina commit``.

    The container swaps 64 files with symlinks to a 0600 host file in a renameat2(RENAME_EXCHANGE)
    loop. With ``--pause=false`` only the descriptor-relative reader stands between the host file
    and the image; with the default pause the processes are stopped too. The reader that lstat()ed
    and then open()ed by path put the host file in the first commits.
    """
    secret = tmp_path / "host-secret"
    token = secrets.token_hex(32).encode()  # as long as the files the helper swaps
    secret.write_bytes(token)
    secret.chmod(0o600)
    name = _start_exchanger(lamina, exchanger, secret)
    _assert_commits_pack_no_leak(lamina, root, name, [pause] * COMMITS, token)


@pytest.mark.unprivileged
@pytest.mark.fuse
@pytest.mark.slow
def test_rootless_commit_of_a_racing_container_never_packs_a_host_file(unpriv: UnprivilegedUser,
                                                                       exchanger: Path) -> None:
    """CVE-2018-15664 class, rootless: the same race against a 0600 file of the user running lamina,
    with and without subordinate ids (pausing then stops processes of other host uids), with
    and without the pause."""
    bindir = unpriv.workdir / "bin"
    bindir.mkdir()
    shutil.copy(exchanger / "exchanger", bindir / "exchanger")
    secret = unpriv.workdir / "host-secret"
    token = secrets.token_hex(32).encode()
    secret.write_bytes(token)
    unpriv.chown_tree(bindir)
    unpriv.chown_tree(secret)
    secret.chmod(0o600)

    def lamina(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return unpriv.lamina(*args, **kwargs)

    try:
        name = _start_exchanger(lamina, bindir, secret)
        pauses = ["--pause=false", "--pause=true"] * (COMMITS // 4)
        _assert_commits_pack_no_leak(lamina, unpriv.workdir / "root", name, pauses, token)
    finally:
        leftover = lamina("ps", "-aq").stdout.split()
        if leftover:
            lamina("rm", "-f", *leftover)


@pytest.mark.root
@pytest.mark.fuse
def test_diff_of_a_racing_container_lists_only_its_own_tree(lamina: Lamina, exchanger: Path,
                                                           tmp_path: Path) -> None:
    """CVE-2018-15664 class against ``lamina diff``: directories swapped with symlinks to a host
    directory while the upper is walked must never show the host directory's names."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    marker = "host-only-" + secrets.token_hex(4)
    (host_dir / marker).write_text("x")
    name = _start_exchanger(lamina, exchanger, host_dir, "dir")
    for _ in range(COMMITS):
        out = lamina("diff", name)
        assert out.returncode == 0, out.stderr
        assert marker not in out.stdout
