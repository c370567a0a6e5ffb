"""Mounting a union from Python: a separate server process, waited for, always unmounted.

Resource handling: :func:`mount_union` returns a :class:`UnionMount` that owns the server process
and the mount; ``unmount()`` (or leaving its ``with`` block) releases both: ``fusermount3 -u``,
then ``fusermount3 -u -z`` if the mount is busy, then SIGTERM/SIGKILL of the server.
:func:`open_union_mount` does the same from trio without blocking the event loop.

Error handling: a server that exits before its mount is ready, or is not ready within the
deadline, raises :class:`lamina.errors.MountError` carrying the server's one-line error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lamina.errors import MountError
from unionfs.core.stack import LayerStack
from unionfs.options import OptionError, ServerOptions, classify_options, redirect_dir_value


@dataclass
class MountSpec:
    """What to mount: the read-only layers, an optional upper (none means read-only)."""

    lowers: LayerStack
    upper: Path | None
    work: Path | None
    mountpoint: Path
    options: list[str] = field(default_factory=list)
    trace: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lowers, LayerStack):
            raise TypeError("MountSpec.lowers is a LayerStack (say the order of a list with "
                            "LayerStack.from_bottom_up or LayerStack.from_top_down)")

    def server_options(self) -> ServerOptions:
        """What the server process is handed (serialized once, see unionfs.options)."""
        values, flags = classify_options(self.options)
        if {"lowerdir", "upperdir", "workdir"} & set(values):
            raise OptionError("MountSpec.options names layers; give them as lowers, upper and work")
        return ServerOptions(
            lowers=[str(p) for p in self.lowers.top_down()],
            upper=str(self.upper) if self.upper is not None else None,
            work=str(self.work) if self.work is not None else None,
            mountpoint=str(self.mountpoint), flags=flags, fsname=values.get("fsname", "lamina-unionfs"),
            foreground=True, trace=str(self.trace) if self.trace is not None else None,
            redirect_dir=redirect_dir_value(values))


def command_line(spec: MountSpec) -> list[str]:
    """argv of a foreground server for ``spec`` (for callers that spawn it themselves)."""
    return [sys.executable, "-m", "unionfs", "-f", "--spec=" + spec.server_options().to_json()]


def _is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                    return True
    except OSError:
        pass
    return False


class UnionMount:
    """A mounted union served by a child process; ``unmount()`` releases both."""

    def __init__(self, spec: MountSpec, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.spec = spec
        self.mountpoint = spec.mountpoint
        self.process = process
        self._log_path = log_path
        self._mounted = True

    def error_output(self) -> str:
        try:
            return self._log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount and stop the server (idempotent)."""
        if not self._mounted:
            return
        self._mounted = False
        try:
            fusermount = shutil.which("fusermount3") or "fusermount3"
            if self.process.poll() is None:
                subprocess.run([fusermount, "-u", str(self.mountpoint)], capture_output=True)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    subprocess.run([fusermount, "-u", "-z", str(self.mountpoint)], capture_output=True)
                    self.process.terminate()
                    try:
                        self.process.wait(2)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait()
            elif _is_mountpoint(self.mountpoint):
                subprocess.run([fusermount, "-u", "-z", str(self.mountpoint)], capture_output=True)
        finally:
            try:
                self._log_path.unlink()
            except OSError:
                pass

    def __enter__(self) -> UnionMount:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()


def mount_union(spec: MountSpec, timeout: float = 10.0) -> UnionMount:
    """Start a server for ``spec`` and block until its mount is ready (or raise MountError)."""
    fd, log_name = tempfile.mkstemp(prefix="lamina-unionfs.", suffix=".log")
    log_path = Path(log_name)
    try:
        before = os.stat(spec.mountpoint).st_dev
    except OSError as e:
        os.close(fd)
        log_path.unlink()
        raise MountError(f"{spec.mountpoint}: {e.strerror}") from None
    try:
        argv = command_line(spec)
    except OptionError as e:
        os.close(fd)
        log_path.unlink()
        raise MountError(str(e)) from None
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=fd, start_new_session=True)
    os.close(fd)
    mount = UnionMount(spec, process, log_path)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        code = process.poll()
        if code is not None:
            message = mount.error_output().splitlines()
            mount._mounted = False
            log_path.unlink(missing_ok=True)
            text = message[-1] if message else f"lamina-unionfs exited with status {code}"
            raise MountError(text.removeprefix("lamina-unionfs: error: "))
        try:
            if os.stat(spec.mountpoint).st_dev != before:
                return mount
        except OSError:
            pass
        if time.monotonic() > deadline:
            mount.unmount()
            raise MountError(f"{spec.mountpoint}: union filesystem not ready after {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@asynccontextmanager
async def open_union_mount(spec: MountSpec, timeout: float = 10.0) -> AsyncIterator[UnionMount]:
    """Async context manager: mount in a worker thread, yield the mount, always unmount."""
    import trio

    mount = await trio.to_thread.run_sync(mount_union, spec, timeout)
    try:
        yield mount
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mount.unmount)
