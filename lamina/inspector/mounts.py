"""``lamina mount`` / ``lamina umount``: an image or a container's root, served by unionfs, left mounted.

A CLI mount must outlive the ``lamina mount`` process, so the filesystem server is started
detached (its own session, output to a log file) and what ``umount`` needs to find it again is
written to ``ROOT/mounts/<id>/state.json``: the mount point, the server's pid, and which
directories the mount created and must remove (a scratch upper for ``--rw``, a mount point it made).

Speed: mounting must not depend on the image's size. Nothing here walks a layer: the lowerdirs are
the store's unpacked layer directories as they are, and readiness is watched in
``/proc/self/mountinfo`` (a stat on the mount point could block on a server still starting).

Read-only and read-write: an image is mounted with no upper directory, so the kernel refuses writes
(EROFS) and nothing can touch the store's layers. ``--rw`` adds a scratch upper that ``umount``
throws away. A container's upper directory is shown read-only too, as the top lowerdir: the
runner may be writing to it, and two overlays sharing one upperdir is undefined. ``--rw`` on a
container uses the container's own upper and work directories, and is refused while it runs.

Unprivileged users with subordinate ids: a read-only mount's server runs as root of lamina's user
namespace (see :mod:`inspector.userns_server`), so files a container or image gave to another uid
(mode 0700 directories included) are readable through it.

Resource handling: :func:`mount_image_stack` leaves a server running and a state directory behind
by design; :func:`unmount` is their only owner afterwards. If mounting fails, nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import MountError, UsageError
from lamina.inspector import userns_server
from lamina.inspector.userns_server import log_tail
from lamina.layout import Layout

if TYPE_CHECKING:
    from lamina.store.usage import Needs
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
READY_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 3.0
LAYER_XATTR_OPTION = "layer_xattr"
SHARED_MOUNT_OPTIONS = ("allow_other", "default_permissions", "nosuid", "nodev")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space as \040


@dataclass
class MountState:
    id: str
    mountpoint: str
    pid: int
    source: str                   # what the user named: image reference or container
    image_id: str
    container_id: str | None
    layers: int                   # image layers in the stack
    writable: bool
    scratch: str | None           # directory holding a --rw scratch upper/work, removed at umount
    own_mountpoint: bool          # the mount point was created by us and is removed at umount
    log: str
    lower_pid: int | None = None          # a server the lowers live on (lazy layers), stopped after the union
    lower_mountpoint: str | None = None   # its mount point, whose directory goes at umount

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(state_dir / STATE_FILE)


@dataclass
class StackRequest:
    """What to mount: the image's layers, and optionally a writable upper."""

    lowers: LayerStack
    upper: Path | None
    work: Path | None
    source: str
    image_id: str
    container_id: str | None
    layers: int
    scratch_rw: bool = False      # create a throwaway upper for --rw
    trace: Path | None = None     # unionfs --trace file: one line per copy-up, whiteout, opaque, redirect
    allow_other: bool = False     # --allow-other: other users may enter (never the default)
    userns: bool = True           # serve a read-only mount from lamina's user namespace when it has one
    lower_server: tuple[int, str] | None = None  # (pid, mount point) of the lowers' own server, if any
    wrap_argv: Callable[[list[str]], list[str]] | None = None  # the server's command line, rewritten


class MountRecords:
    """The ``lamina mount`` records in ``layout.mounts``, as an owner of the store's images
    (:class:`lamina.store.usage.DigestOwner`): a mount whose server is alive uses its image."""

    def __init__(self, layout: Layout) -> None:
        self.directory = layout.mounts

    def store_needs(self) -> Needs:
        from lamina.store.usage import Needs

        needs = Needs()
        for path in sorted(self.directory.glob(f"*/{STATE_FILE}")):
            with contextlib.suppress(OSError, ValueError, RecursionError):
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict):
                    continue
                pid, image_id = data.get("pid"), data.get("image_id")
                if isinstance(pid, int) and pid > 0 and os.path.exists(f"/proc/{pid}") \
                        and isinstance(image_id, str) and image_id:
                    needs.use_image(image_id, "mount:" + path.parent.name)
        return needs


def fuse_mountpoints() -> set[str]:
    """Mount points of every FUSE filesystem in this mount namespace."""
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse"):
                found.add(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return found


# What a server's command line holds: unionfs, or the lazy layers' server under it.
_SERVER_MARKERS = (b"unionfs", b"lamina.lazy.serve")


def _server_alive(pid: int) -> bool:
    """True when ``pid`` is still a unionfs or lazy layer server (guards against a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    try:
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if stat_fields[0] == "Z":
            return False
    except (OSError, IndexError):
        return False
    return any(marker in cmdline for marker in _SERVER_MARKERS)


def mount_image_stack(layout: Layout, request: StackRequest, mountpoint: Path | None) -> MountState:
    """Start a detached unionfs server for ``request`` and wait until the mount is up.

    Error handling: raises :class:`MountError` (with the server's log) when the server exits or is
    not ready in time, :class:`UsageError` when ``mountpoint`` is unusable; then nothing is left
    mounted, running or recorded.
    """
    mount_id = os.urandom(6).hex()
    state_dir = layout.mounts / mount_id
    state_dir.mkdir(parents=True, mode=0o700)
    try:
        return _mount(state_dir, mount_id, request, mountpoint)
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _mount(state_dir: Path, mount_id: str, request: StackRequest, mountpoint: Path | None) -> MountState:
    # Imported here: every lamina command builds the parser that imports this module.
    from unionfs.mount import MountSpec, command_line

    own_mountpoint = mountpoint is None
    if mountpoint is None:
        mountpoint = state_dir / "merged"
        mountpoint.mkdir()
    else:
        mountpoint = mountpoint.absolute()
        if not mountpoint.is_dir():
            raise UsageError(f"mount point is not a directory: {mountpoint}")
        if str(mountpoint.resolve()) in fuse_mountpoints():
            raise UsageError(f"something is already mounted on {mountpoint}")
        mountpoint = mountpoint.resolve()

    lowers = request.lowers
    if not lowers:
        # An image without layers (FROM scratch and nothing else) still mounts, as an empty root.
        empty = state_dir / "empty"
        empty.mkdir()
        lowers = LayerStack.from_top_down([empty])
    upper, work, scratch = request.upper, request.work, None
    if request.scratch_rw:
        scratch = state_dir / "scratch"
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir(parents=True)
        work.mkdir()

    # Only the mounting user may enter, unless asked: an image's setuid-root files and device
    # nodes would otherwise be every local user's. Asked, the kernel checks permissions and honours
    # neither setuid bits nor device nodes.
    options = [LAYER_XATTR_OPTION, *(SHARED_MOUNT_OPTIONS if request.allow_other else ())]

    def argv_for(target: Path) -> list[str]:
        argv = command_line(MountSpec(lowers=lowers, upper=upper, work=work, mountpoint=target,
                                      options=options, trace=request.trace))
        return request.wrap_argv(argv) if request.wrap_argv else argv

    log_path = state_dir / "unionfs.log"
    # Read-only mounts are served from lamina's user namespace (so subordinate-owned files are
    # readable); writable ones are not: the kernel reports a caller's host uid, which the server
    # would record as an unmapped id inside the namespace on every file it creates.
    if upper is None and request.userns and userns_server.wants_userns():
        pid = userns_server.start_userns_server(argv_for, mountpoint, log_path, READY_TIMEOUT_S)
    else:
        pid = _start_server(argv_for(mountpoint), mountpoint, log_path)

    state = MountState(id=mount_id, mountpoint=str(mountpoint), pid=pid, source=request.source,
                       image_id=request.image_id, container_id=request.container_id,
                       layers=request.layers, writable=upper is not None,
                       scratch=str(scratch) if scratch else None, own_mountpoint=own_mountpoint,
                       log=str(log_path), lower_pid=request.lower_server[0] if request.lower_server else None,
                       lower_mountpoint=request.lower_server[1] if request.lower_server else None)
    state.save(state_dir)
    return state


def _start_server(argv: list[str], mountpoint: Path, log_path: Path) -> int:
    """Start a detached server that mounts ``mountpoint`` itself; its pid once the mount is up."""
    log.debug("starting %s", argv)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True, close_fds=True)
    try:
        _wait_ready(process, mountpoint, log_path)
    except BaseException:
        _stop_server(process.pid, mountpoint)
        process.wait()
        raise
    # The server is detached on purpose; stop Popen's finaliser from warning that it still runs.
    process.returncode = 0
    return process.pid


def _wait_ready(process: subprocess.Popen[bytes], mountpoint: Path, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    target = str(mountpoint)
    delay = 0.002
    while True:
        if process.poll() is not None:
            raise MountError(f"unionfs exited with status {process.returncode} before mounting "
                             f"{mountpoint}: {log_tail(log_path)}")
        if target in fuse_mountpoints():
            return
        if time.monotonic() > deadline:
            raise MountError(f"unionfs did not mount {mountpoint} within {READY_TIMEOUT_S:.0f} s: "
                             f"{log_tail(log_path)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)


def _fusermount_unmount(mountpoint: str, lazy: bool = False) -> tuple[bool, str]:
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError as e:
        raise MountError("fusermount3 not found: install the fuse3 package") from e
    return result.returncode == 0, result.stderr.strip()


def _stop_server(pid: int, mountpoint: Path | str) -> None:
    """Unmount if mounted, then make sure the server is gone. Never raises."""
    try:
        if str(mountpoint) in fuse_mountpoints():
            ok, _ = _fusermount_unmount(str(mountpoint))
            if not ok:
                _fusermount_unmount(str(mountpoint), lazy=True)
    except (OSError, MountError):
        log.debug("unmounting %s failed", mountpoint, exc_info=True)
    _wait_exit(pid)


def _wait_exit(pid: int) -> None:
    """Return once the server is gone: only then has it let go of every layer (see unmount)."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while _server_alive(pid):
        if time.monotonic() > deadline:
            # Seen here: a copy of the mount in another process's namespace keeps the server up.
            log.info("unionfs server %d still running after unmount; terminating it", pid)
            try:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    os.kill(pid, sig)
                    deadline = time.monotonic() + EXIT_TIMEOUT_S
                    while _server_alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if not _server_alive(pid):
                        break
            except (ProcessLookupError, PermissionError):
                # Gone already, or another user's server: the unmount itself has succeeded.
                pass
            return
        time.sleep(0.005)


def list_mounts(layout: Layout) -> list[tuple[Path, MountState]]:
    """Every recorded mount (state directory, state); unreadable records are skipped with a warning."""
    found = []
    base = layout.mounts
    if not base.is_dir():
        return []
    for state_path in sorted(base.glob(f"*/{STATE_FILE}")):
        try:
            found.append((state_path.parent, MountState(**json.loads(state_path.read_text()))))
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable mount record %s", state_path)
    return found


def find_mount(layout: Layout, directory: Path) -> tuple[Path, MountState]:
    wanted = str(directory.absolute().resolve()) if directory.exists() else str(directory.absolute())
    for state_dir, state in list_mounts(layout):
        if state.mountpoint == wanted or state.id == str(directory):
            return state_dir, state
    raise UsageError(f"not a lamina mount: {directory} (no record under {layout.mounts})")


def unmount(layout: Layout, directory: Path, lazy: bool = False) -> MountState:
    """Unmount a ``lamina mount``, stop its server, and remove what the mount created.

    Returns (unless ``lazy``) only once the server has exited: until then it may still hold the
    layers, and their filesystems could not be unmounted.

    Error handling: :class:`UsageError` when ``directory`` is not a recorded mount;
    :class:`MountError` when the mount is busy (a process has a file open or its cwd inside) and
    ``lazy`` is false; the record is then kept so a later ``umount`` can finish.
    """
    state_dir, state = find_mount(layout, directory)
    if state.mountpoint in fuse_mountpoints():
        ok, err = _fusermount_unmount(state.mountpoint, lazy=lazy)
        if not ok:
            raise MountError(f"cannot unmount {state.mountpoint}: {err or 'fusermount3 failed'}"
                             f"{'' if lazy else ' (busy? close files there, or use --lazy)'}")
    else:
        log.info("%s was no longer mounted; removing its record", state.mountpoint)
    if not lazy:
        _wait_exit(state.pid)
        if state.lower_pid and state.lower_mountpoint:
            _stop_server(state.lower_pid, state.lower_mountpoint)
            shutil.rmtree(Path(state.lower_mountpoint).parent, ignore_errors=True)
    elif state.lower_mountpoint and state.lower_mountpoint in fuse_mountpoints():
        # The union still holds its lowers; detached too, the lower mount goes (and its server
        # exits) when the union's server lets go of it.
        _fusermount_unmount(state.lower_mountpoint, lazy=True)
    # A lazily detached mount stays usable by the processes inside it; the kernel tells the server
    # to exit when the last of them lets go, so it is not killed here.
    # The scratch upper and a mount point we made live in the state directory: all of it goes.
    shutil.rmtree(state_dir, ignore_errors=True)
    return state
