"""Unmounting a union lets go of its layers: the layers' own filesystems can be unmounted next.

umount(8) of a FUSE mount returns as soon as the kernel has cut the connection; the server learns
of it afterwards. Whatever it still holds then (layer directories, open files) keeps the layers'
filesystems busy (``umount LOWERFS``: EBUSY), for as long as its teardown takes. So the server lets
go of every layer first, and ``lamina umount`` (like unionfs.mount's unmount) returns only once the
server is gone.

Each test runs a few dozen mount/unmount cycles with the lower layer on a tmpfs of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import force_unmount, start_union, union_argv
from inspector import mounts
from unionfs.mount import MountSpec, mount_union

pytestmark = [pytest.mark.root, pytest.mark.fuse]

CYCLES = 24
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
    root = tmp_path / "root"
    for cycle in range(WAIT_CYCLES):
        base = tmp_path / f"c{cycle}"
        base.mkdir()
        with lower_filesystem(base / "lowerfs") as lower:
            if how == "lamina umount":
                request = mounts.StackRequest(lowers=[lower], upper=None, work=None, source="test",
                                              image_id="test", container_id=None, layers=1, scratch_rw=True)
                state = mounts.mount_image_stack(root, request, None)
                use(Path(state.mountpoint))
                mounts.unmount(root, Path(state.mountpoint))
            else:
                upper, work, mnt = base / "upper", base / "work", base / "mnt"
                for d in (upper, work, mnt):
                    d.mkdir()
                with mount_union(MountSpec(lowers=[lower], upper=upper, work=work, mountpoint=mnt)):
                    use(mnt)
            result = umount(lower.parent)
            assert result.returncode == 0, f"cycle {cycle}: {result.stderr}"
