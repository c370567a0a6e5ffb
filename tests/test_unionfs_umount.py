"""Unmounting a union lets go of its layers: the layers' own filesystems can be unmounted next.

umount(8) of a FUSE mount returns as soon as the kernel has cut the connection; the server learns
of it afterwards. Whatever it still holds then (layer directories, open files) keeps the layers'
filesystems busy (``umount LOWERFS``: EBUSY), for as long as its teardown takes. So the server lets
go of every layer first, and ``lamina umount`` (like unionfs.mount's unmount) returns only once the
server is gone.

Each test runs a few dozen mount/unmount cycles with the lower layer on a tmpfs of its own.

And lamina-unionfs opens its layers from a throwaway mount namespace (unionfs.detached_layers), so it
pins only that namespace's copies of their mounts: the layers' filesystem can be unmounted even
while the union is mounted, as with the kernel's overlayfs, and a bare ``umount M && umount L``
never meets a server that has not woken up yet.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import UnprivilegedUser, force_unmount, start_union, union_argv
from lamina.inspector import mounts
from lamina.layout import Layout
from unionfs import detached_layers
from unionfs.core.stack import LayerStack
from unionfs.mount import MountSpec, mount_union

pytestmark = [pytest.mark.root, pytest.mark.fuse]

CYCLES = 24
BARE_CYCLES = 30
USER_CYCLES = 15  # a cycle as the user costs ~1.4 s (no import bundle)
WAIT_CYCLES = 8  # per way of unmounting: these only wait, nothing races
BUSY_DEADLINE_S = 10.0  # only bounds a failure: a server that never lets go

# A server whose teardown waits, after the kernel has cut the connection, until the test writes to
# the FIFO named first: whatever it still holds while it waits, it would hold after umount(8) for
# as long as a real teardown takes.
STALLED_SERVER = r"""
import sys
import pyfuse3
fifo = sys.argv.pop(1)
real_close = pyfuse3.close
def close_when_told(*args, **kwargs):
    with open(fifo) as f:
        f.read(1)
    real_close(*args, **kwargs)
pyfuse3.close = close_when_told
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextmanager
def lower_filesystem(path: Path) -> Iterator[Path]:
    """A small tmpfs holding one lower layer: a directory of files."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        layer = path / "lower"
        (layer / "d").mkdir(parents=True)
        for name in "abc":
            (layer / "d" / name).write_text("orig\n")
        yield layer
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def use(mountpoint: Path) -> None:
    """Open, read and change lower files (each open leaves the server a descriptor until RELEASE)."""
    assert sorted(os.listdir(mountpoint / "d")) == ["a", "b", "c"]
    assert (mountpoint / "d" / "a").read_text() == "orig\n"
    with open(mountpoint / "d" / "b", "a") as f:
        f.write("more\n")
    assert (mountpoint / "d" / "b").read_text() == "orig\nmore\n"


def umount(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["umount", str(path)], capture_output=True, text=True)


def end_stall(fifo: Path, process: subprocess.Popen[bytes]) -> None:
    """Let a stalled server finish (it may not have reached the stall yet, or never will)."""
    deadline = time.monotonic() + BUSY_DEADLINE_S
    while process.poll() is None and time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody waits on the FIFO yet
            time.sleep(0.01)
            continue
        os.write(fd, b"x")
        os.close(fd)
        break
    try:
        process.wait(BUSY_DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_layers_are_released_before_the_server_tears_down(tmp_path: Path) -> None:
    fifo = tmp_path / "teardown"
    os.mkfifo(fifo)
    busy_at_once = 0
    for cycle in range(CYCLES):
        base = tmp_path / f"c{cycle}"
        upper, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        with lower_filesystem(base / "lowerfs") as lower:
            argv = union_argv([lower], upper, work, mnt)
            argv[1:3] = ["-c", STALLED_SERVER, str(fifo)]  # [python, -m, unionfs, ...] -> the stalled server
            server = start_union(argv, mnt, base / "server.log")
            try:
                use(mnt)
                assert umount(mnt).returncode == 0
                deadline = time.monotonic() + BUSY_DEADLINE_S
                first = umount(lower.parent)
                result = first
                while result.returncode != 0:
                    assert time.monotonic() < deadline, \
                        f"cycle {cycle}: the lower filesystem stays busy while the server tears down: {result.stderr}"
                    time.sleep(0.01)
                    result = umount(lower.parent)
                busy_at_once += first.returncode != 0
                assert server.process.poll() is None  # still in its teardown: the release came first
            finally:
                force_unmount(mnt)
                end_stall(fifo, server.process)
        assert server.process.returncode == 0, server.stderr()
    sys.stderr.write(f"umount of the lower filesystem right after the union's: EBUSY in {busy_at_once} "
                     f"of {CYCLES} cycles (then free)\n")


@pytest.mark.parametrize("how", ["lamina umount", "unionfs.mount"])
def test_unmount_returns_once_nothing_holds_a_layer(tmp_path: Path, how: str) -> None:
    """After ``lamina umount`` (or unmount() of the Python API) returns, the lower filesystem unmounts
    at the first try, in every cycle."""
    root = Layout(tmp_path / "root")
    for cycle in range(WAIT_CYCLES):
        base = tmp_path / f"c{cycle}"
        base.mkdir()
        with lower_filesystem(base / "lowerfs") as lower:
            if how == "lamina umount":
                request = mounts.StackRequest(lowers=LayerStack.from_top_down([lower]), upper=None, work=None, source="test",
                                              image_id="test", container_id=None, layers=1, scratch_rw=True)
                state = mounts.mount_image_stack(root, request, None)
                use(Path(state.mountpoint))
                mounts.unmount(root, Path(state.mountpoint))
            else:
                upper, work, mnt = base / "upper", base / "work", base / "mnt"
                for d in (upper, work, mnt):
                    d.mkdir()
                with mount_union(MountSpec(lowers=LayerStack.from_top_down([lower]), upper=upper, work=work, mountpoint=mnt)):
                    use(mnt)
            result = umount(lower.parent)
            assert result.returncode == 0, f"cycle {cycle}: {result.stderr}"


@pytest.mark.parametrize("impl", ["kernel", "lamina"])
def test_lower_filesystem_unmounts_while_the_union_is_mounted(tmp_path: Path, impl: str) -> None:
    """The kernel's overlayfs serves from private clones of its layers' mounts: the caller may unmount
    the filesystem under them while the union stays mounted and keeps serving it. So does lamina."""
    mnt = tmp_path / "mnt"
    with lower_filesystem(tmp_path / "lowerfs") as lower:
        upper, work = lower.parent / "upper", lower.parent / "work"  # on the same filesystem
        for d in (upper, work, mnt):
            d.mkdir()
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        server = None
        if impl == "kernel":
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
        else:
            server = start_union(union_argv([lower], upper, work, mnt), mnt, tmp_path / "server.log")
        try:
            result = umount(lower.parent)
            assert result.returncode == 0, result.stderr
            use(mnt)
        finally:
            if server is None:
                subprocess.run(["umount", str(mnt)], check=False)
            else:
                assert server.unmount() == 0, server.stderr()


def bare_cycle(base: Path) -> bool:
    """Mount, use, ``umount M && umount L``: whether L unmounted at the first try."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    with lower_filesystem(base / "lowerfs") as lower:
        server = start_union(union_argv([lower], upper, work, mnt), mnt, base / "server.log")
        try:
            use(mnt)
            # One shell, as a script would run it: nothing between the two but the shell's fork.
            both = subprocess.run(["sh", "-c", 'umount "$1" || exit 2; umount "$2"', "sh", str(mnt),
                                   str(lower.parent)], capture_output=True, text=True)
            assert both.returncode != 2, both.stderr
            freed = both.returncode == 0
        finally:
            force_unmount(mnt)
            server.process.wait(BUSY_DEADLINE_S)
        assert server.process.returncode == 0, server.stderr()
    return freed


def test_bare_umount_then_lower_umount(tmp_path: Path) -> None:
    """Nothing waits for the server: umount(8) returns while it is still asleep, and L unmounts."""
    busy = [cycle for cycle in range(BARE_CYCLES) if not bare_cycle(tmp_path / f"c{cycle}")]
    assert busy == [], f"umount L right after umount M: EBUSY in cycles {busy} of {BARE_CYCLES}"


def test_an_earlier_mount_still_unmounts_while_a_later_one_serves(tmp_path: Path) -> None:
    """The later server's namespace copy held no other FUSE mount alive: the earlier server sees its
    unmount and exits while the later one runs."""
    servers = []
    for name in ("first", "second"):
        base = tmp_path / name
        lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
        for d in (lower / "d", upper, work, mnt):
            d.mkdir(parents=True)
        servers.append(start_union(union_argv([lower], upper, work, mnt), mnt, base / "server.log"))
    first, second = servers
    try:
        assert subprocess.run(["fusermount3", "-u", str(first.mountpoint)]).returncode == 0
        assert first.process.wait(BUSY_DEADLINE_S) == 0, first.stderr()
        assert second.process.poll() is None
        assert os.listdir(second.mountpoint / "d") == []
    finally:
        for server in servers:
            server.unmount()


# As the unprivileged user: per cycle, mount, use, fusermount3 -u, then tell root (which unmounts
# the lower tmpfs at once) and wait for its answer.
USER_SCRIPT = r"""
import os, subprocess, sys
for base in sys.argv[1:]:
    lower, mnt = f"{base}/lowerfs/lower", f"{base}/mnt"
    opts = f"lowerdir={lower},upperdir={base}/lowerfs/upper,workdir={base}/lowerfs/work"
    subprocess.run(["lamina-unionfs", "-o", opts, mnt], check=True)
    assert sorted(os.listdir(f"{mnt}/d")) == ["a", "b", "c"]
    with open(f"{mnt}/d/b", "a") as f:
        f.write("more\n")
    subprocess.run(["fusermount3", "-u", mnt], check=True)
    print(base, flush=True)
    sys.stdin.readline()
"""


@pytest.mark.unprivileged
def test_unprivileged_fusermount_then_lower_umount(unpriv_nosubids: UnprivilegedUser) -> None:
    user = unpriv_nosubids
    script = user.workdir / "cycles.py"
    script.write_text(USER_SCRIPT)
    bases = [user.workdir / f"c{cycle}" for cycle in range(USER_CYCLES)]
    busy = []
    with contextlib.ExitStack() as stack:
        for base in bases:
            base.mkdir()
            layer = stack.enter_context(lower_filesystem(base / "lowerfs"))
            for d in (layer.parent / "upper", layer.parent / "work", base / "mnt"):
                d.mkdir()
            user.chown_tree(base)
        process = subprocess.Popen(["lamina-python", str(script), *map(str, bases)], cwd=user.workdir,
                                   env=user.env(), user=user.uid, group=user.gid, extra_groups=[],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert process.stdin is not None and process.stdout is not None
        try:
            for base in bases:
                line = process.stdout.readline().strip()
                assert line == str(base), process.communicate(timeout=30)
                if umount(base / "lowerfs").returncode != 0:
                    busy.append(base.name)
                process.stdin.write("\n")
                process.stdin.flush()
            _, err = process.communicate(timeout=30)
            assert process.returncode == 0, err
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for base in bases:
                force_unmount(base / "mnt")
    assert busy == [], f"umount L right after fusermount3 -u M: EBUSY in {busy} of {USER_CYCLES}"


def mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))


def test_detached_descriptors_hold_a_copy_of_the_mount(tmp_path: Path) -> None:
    """Same directory, same filesystem, not the caller's mount of it; when one path cannot be
    opened, none comes back (the caller opens them all and gets the error itself)."""
    (tmp_path / "d").mkdir()
    assert detached_layers.open_directories([str(tmp_path / "d"), str(tmp_path / "missing")]) == {}
    opened = detached_layers.open_directories([str(tmp_path / "d"), str(tmp_path / "d")])
    own = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert list(opened) == [str(tmp_path / "d")]
        fd = opened[str(tmp_path / "d")]
        assert os.path.samestat(os.fstat(fd), os.fstat(own))
        assert mount_id(fd) != mount_id(own)
        assert not os.get_inheritable(fd)
    finally:
        os.close(own)
        for fd in opened.values():
            os.close(fd)


def test_without_a_namespace_the_caller_opens_the_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no namespace can be made (no user namespaces, a seccomp filter), nothing comes back and
    the child is reaped; the core then opens the directories itself."""
    def refuse() -> None:
        raise PermissionError(1, "unshare: Operation not permitted")

    real_fork = os.fork
    children = []

    def fork() -> int:
        pid = real_fork()
        children.append(pid)
        return pid

    monkeypatch.setattr(detached_layers, "_enter_private_mount_namespace", refuse)
    monkeypatch.setattr(os, "fork", fork)
    (tmp_path / "d").mkdir()
    assert detached_layers.open_directories([str(tmp_path / "d")]) == {}
    assert len(children) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(children[0], os.WNOHANG)
