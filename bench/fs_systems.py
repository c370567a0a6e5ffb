"""The unions the filesystem suite measures, and how each is mounted and unmounted.

Each system mounts the image's layers with a fresh upper and work directory of its own. A mount
is timed from spawning the mount command until the mount point is in ``/proc/self/mountinfo`` and
answers ``stat``: the same for a command that mounts and exits (``mount -t overlay``), one that
forks a server once mounted (fuse-overlayfs, lamina-unionfs) or one that stays in the foreground.

Resource handling: a :class:`UnionMount` owns its mount and its directories; ``unmount`` and
``remove`` are safe to call more than once, and they wait (briefly) for a FUSE server to exit so
that one system's leftover work does not land in the next one's timing. Only mounts under the
system's own directory are ever unmounted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import LAMINA, NOT_AVAILABLE

log = logging.getLogger(__name__)

KERNEL = "kernel"
FUSE_OVERLAYFS = "fuse-overlayfs"
# Another build of lamina-unionfs (e.g. the last release's venv) to A/B a change against, in the
# same interleaved run: LAMINA_BENCH_BASELINE_UNIONFS=/path/to/old/.venv/bin/lamina-unionfs.
BASELINE = "baseline"
BASELINE_ENV = "LAMINA_BENCH_BASELINE_UNIONFS"
MOUNT_TIMEOUT_S = 60.0
SERVER_EXIT_WAIT_S = 5.0


class MountFailed(RuntimeError):
    """A mount command failed or its mount did not appear in time."""


def unionfs_command() -> Path:
    """The lamina-unionfs entry point of the interpreter running us (the project's venv)."""
    beside = Path(sys.executable).parent / "lamina-unionfs"
    if beside.exists():
        return beside
    found = shutil.which("lamina-unionfs")
    return Path(found) if found else beside


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def mounts_under(directory: Path) -> list[str]:
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    return [m for m in mount_points() if m.startswith(prefix)]


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    return f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"


@dataclass(frozen=True)
class UnionSystem:
    """One competitor: how to mount a union of ``lowers`` (top-most first) and how to unmount it."""

    name: str
    mount_argv: Callable[[Sequence[Path], Path, Path, Path], list[str]]
    unmount_argv: Callable[[Path], list[str]]
    is_fuse: bool


def kernel_overlayfs() -> UnionSystem:
    return UnionSystem(KERNEL, lambda lowers, upper, work, mnt: [
        "mount", "-t", "overlay", "overlay", "-o", overlay_options(lowers, upper, work), str(mnt)],
        lambda mnt: ["umount", str(mnt)], is_fuse=False)


def _fuse_system(name: str, command: str) -> UnionSystem:
    """A FUSE union that takes fuse-overlayfs's command line and is unmounted with fusermount3."""
    return UnionSystem(name, lambda lowers, upper, work, mnt: [
        command, "-o", overlay_options(lowers, upper, work), str(mnt)],
        lambda mnt: ["fusermount3", "-u", str(mnt)], is_fuse=True)


def fuse_overlayfs() -> UnionSystem:
    return _fuse_system(FUSE_OVERLAYFS, FUSE_OVERLAYFS)


def lamina_unionfs() -> UnionSystem:
    return _fuse_system(LAMINA, str(unionfs_command()))


def baseline_unionfs() -> UnionSystem | None:
    """The baseline build named by ``LAMINA_BENCH_BASELINE_UNIONFS``, or None when unset."""
    command = os.environ.get(BASELINE_ENV, "")
    return _fuse_system(BASELINE, command) if command else None


def unavailable_reason(system: UnionSystem, probe_dir: Path) -> str | None:
    """None when ``system`` can mount here, else why not (probed with a one-layer union)."""
    if system.name == FUSE_OVERLAYFS and shutil.which(FUSE_OVERLAYFS) is None:
        return f"{NOT_AVAILABLE}: fuse-overlayfs is not installed (`make bench` installs it)"
    if system.name == LAMINA and not unionfs_command().exists():
        return f"{NOT_AVAILABLE}: {unionfs_command()} is not installed"
    if system.name == BASELINE and not os.access(os.environ.get(BASELINE_ENV, ""), os.X_OK):
        return f"{NOT_AVAILABLE}: {BASELINE_ENV} does not name an executable"
    if system.is_fuse and not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        return f"{NOT_AVAILABLE}: no /dev/fuse or fusermount3"
    lower = probe_dir / "lower"
    lower.mkdir(parents=True, exist_ok=True)
    mount = UnionMount(system, probe_dir / system.name, [lower])
    try:
        mount.create()
        mount.mount()
    except (MountFailed, OSError) as exc:
        return f"{NOT_AVAILABLE}: {str(exc)[:200]}"
    finally:
        mount.remove()
    return None


class UnionMount:
    """One system's union of the image's layers, with its own upper, work and mount directories."""

    def __init__(self, system: UnionSystem, base: Path, lowers: Sequence[Path]) -> None:
        self.system = system
        self.base = base
        self.lowers = list(lowers)
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        self.log_file = base.parent / f"{system.name}.mount.log"
        self.server_pids: list[int] = []

    def create(self) -> None:
        """Fresh, empty upper, work and mount directories."""
        self.remove()
        for directory in (self.upper, self.work, self.mnt):
            directory.mkdir(parents=True)

    def is_mounted(self) -> bool:
        return os.path.realpath(self.mnt) in mount_points()

    def mount(self) -> float:
        """Mount; seconds from spawning the command until the mount answers ``stat``."""
        if self.is_mounted():
            raise MountFailed(f"{self.mnt} is already mounted")
        argv = self.system.mount_argv(self.lowers, self.upper, self.work, self.mnt)
        with open(self.log_file, "ab") as log_out:
            start = time.perf_counter()
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out,
                                       start_new_session=True)
        while not self.is_mounted():
            code = process.poll()
            if code is not None and code != 0:
                raise MountFailed(f"`{' '.join(argv)}` exited {code}: {self._log_tail()}")
            if time.perf_counter() - start > MOUNT_TIMEOUT_S:
                process.kill()
                process.wait()
                raise MountFailed(f"{self.mnt} not mounted after {MOUNT_TIMEOUT_S:.0f} s: {self._log_tail()}")
            time.sleep(0.001)
        os.stat(self.mnt)
        elapsed = time.perf_counter() - start
        if process.poll() is None:
            self.server_pids = [process.pid]  # stays in the foreground: it is the server
        else:
            process.wait()
            self.server_pids = fuse_servers(self.mnt) if self.system.is_fuse else []
        return elapsed

    def unmount(self) -> None:
        if self.is_mounted():
            subprocess.run(self.system.unmount_argv(self.mnt), capture_output=True, timeout=120)
        if self.is_mounted():
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=60)
        deadline = time.monotonic() + SERVER_EXIT_WAIT_S
        for pid in self.server_pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            if _alive(pid):
                log.warning("%s: server %d still running after unmount", self.system.name, pid)
        self.server_pids = []

    def remove(self) -> None:
        """Unmount (this mount and anything left under its directory) and delete the directories."""
        self.unmount()
        if self.base.exists():
            for leftover in sorted(mounts_under(self.base), key=len, reverse=True):
                subprocess.run(["umount", "-l", leftover], capture_output=True, timeout=60)
            shutil.rmtree(self.base)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
        except OSError:
            return ""


def fuse_servers(mnt: Path) -> list[int]:
    """Processes holding /dev/fuse whose command line names ``mnt``: a daemonized server."""
    wanted, found = str(mnt).encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if wanted not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            descriptors = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse" for fd in descriptors):
                found.append(int(entry))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)  # our own foreground child: reap it
        except ChildProcessError:
            pass
        return False
    return state != "X"
