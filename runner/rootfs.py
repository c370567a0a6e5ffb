"""Everything the container's init does to its mount namespace before ``pivot_root``.

Order matters: the directories the container needs (its working directory, mount targets) are
created while the root is still writable; the kernel filesystems (/proc, /dev, /sys) and the
per-container files (/etc/hosts, /etc/hostname, /etc/resolv.conf) are mounted over the image's
paths; user mounts come last so they can shadow anything; ``--read-only`` remounts the root
read-only at the very end. Every target path goes through :func:`runner.paths.resolve_in_root`.

Nothing here writes to the union's upper layer for the kernel filesystems and /etc files: their
mount points come from the *init layer*, a tiny directory the sandbox puts at the bottom of the
layer stack (see :func:`make_init_layer`), so an image that lacks /proc or /etc/hosts still gets a
clean diff.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ContainerError
from runner import linux
from runner.paths import make_dirs_in_root, make_file_in_root, resolve_in_root

log = logging.getLogger(__name__)

# <asm-generic/ioctls.h>, the same on every architecture lamina runs on (termios lacks them).
_TIOCGPTN = 0x80045430
_TIOCSPTLCK = 0x40045431

ETC_FILES = ("hosts", "hostname", "resolv.conf")
DEFAULT_SHM_SIZE = 64 << 20  # docker's
HOST_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# docker's defaults (moby oci/defaults.go: ReadonlyPaths, MaskedPaths; powercap since 25.0).
READONLY_PROC_PATHS = ("sys", "sysrq-trigger", "irq", "bus", "fs")
MASKED_PROC_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
MASKED_PROC_DIRS = ("asound", "acpi", "scsi")
MASKED_SYS_DIRS = ("firmware", "devices/virtual/powercap")

# statvfs flag -> mount flag, for remounts that must repeat the flags the kernel locked.
_STATVFS_TO_MS = ((os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV),
                  (os.ST_NOEXEC, linux.MS_NOEXEC), (os.ST_NOATIME, linux.MS_NOATIME),
                  (os.ST_RELATIME, 1 << 21), (os.ST_NODIRATIME, 2048))


@dataclass(frozen=True)
class MountRequest:
    """A mount the caller asked for, with the container path not yet resolved."""

    target: str
    kind: str  # "bind", "tmpfs", "cache" (a bind of a persistent directory), "volume" (a bind
    # of a docker volume directory, filled from the image on first use)
    source: str | None = None
    readonly: bool = False
    options: str = ""


def make_init_layer(path: Path) -> Path:
    """Create the bottom layer that provides mount points: /proc /dev /sys and empty /etc files."""
    for d in ("proc", "dev", "sys", "etc"):
        (path / d).mkdir(parents=True, exist_ok=True)
    for name in ETC_FILES:
        (path / "etc" / name).touch()
    return path


def remount_readonly(path: str) -> None:
    """Make the mount at ``path`` read-only, repeating the flags a less privileged namespace locked."""
    flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
    current = os.statvfs(path).f_flag
    for st_bit, ms_bit in _STATVFS_TO_MS:
        if current & st_bit:
            flags |= ms_bit
    linux.mount(None, path, None, flags)


def _bind(source: str, target: str, readonly: bool = False, recursive: bool = True) -> None:
    linux.mount(source, target, None, linux.MS_BIND | (linux.MS_REC if recursive else 0))
    if readonly:
        remount_readonly(target)


def _setup_proc(root: str, unmask: bool, host_proc: bool = False) -> None:
    proc = make_dirs_in_root(root, "/proc")
    if host_proc:
        # --pid host: a new proc mount needs privilege over the host's PID namespace, which the
        # user namespace lacks; the host's /proc, bound, shows the same processes.
        _bind("/proc", proc)
    else:
        linux.mount("proc", proc, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    if unmask:  # --privileged, --security-opt systempaths=unconfined
        return
    # As docker: kernel knobs read-only, information leaks masked.
    for name in READONLY_PROC_PATHS:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _bind(path, path, readonly=True)
    for name in MASKED_PROC_FILES:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            try:
                _bind("/dev/null", path, recursive=False)
            except OSError as e:
                log.debug("cannot mask %s: %s", path, e)
    _mask_dirs(proc, MASKED_PROC_DIRS)


def _mask_dirs(top: str, names: tuple[str, ...]) -> None:
    """Cover each directory with an empty read-only tmpfs, as runc masks a directory."""
    for name in names:
        path = os.path.join(top, name)
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, "size=0")
            except OSError as e:
                log.debug("cannot mask %s: %s", path, e)


def _setup_dev(root: str, console: str | None, gid5_mapped: bool, shm_size: int,
               shm_source: str | None = "") -> None:
    """``shm_source``: "" a new tmpfs on /dev/shm, None no /dev/shm (``--ipc none``), else the
    directory to bind there (the host's, with its IPC namespace)."""
    dev = make_dirs_in_root(root, "/dev")
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_STRICTATIME, "mode=755,size=65536k")
    for name in HOST_DEVICES:
        target = os.path.join(dev, name)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o666))
        _bind(f"/dev/{name}", target, recursive=False)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    data = "newinstance,ptmxmode=0666,mode=0620" + (",gid=5" if gid5_mapped else "")
    linux.mount("devpts", pts, "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, data)
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    shm = os.path.join(dev, "shm")
    if shm_source is not None:
        os.mkdir(shm, 0o1777)
    if shm_source:
        _bind(shm_source, shm)
    elif shm_source is not None:
        linux.mount("shm", shm, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                    f"mode=1777,size={shm_size or DEFAULT_SHM_SIZE}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    if console is not None:
        target = os.path.join(dev, "console")
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
        _bind(console, target, recursive=False)


def open_console(root: str) -> tuple[int, int]:
    """A pty of the container's own devpts (``ROOT/dev/pts``, just mounted): ``(master, slave)``.

    As with docker and podman, the container's terminal is then ``/dev/pts/0`` of its own
    instance, and ``/dev/console`` is that pty too. Both descriptors are close-on-exec."""
    pts = os.path.join(root, "dev", "pts")
    master = os.open(os.path.join(pts, "ptmx"), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        (number,) = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, bytes(4)))
        slave_path = os.path.join(pts, str(number))
        slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        console = os.path.join(root, "dev", "console")
        os.close(os.open(console, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        _bind(slave_path, console, recursive=False)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def _setup_sys(root: str, own_netns: bool, unmask: bool = False) -> None:
    sys_dir = make_dirs_in_root(root, "/sys")
    flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    mounted = False
    if own_netns:
        try:
            linux.mount("sysfs", sys_dir, "sysfs", flags)
            mounted = True
        except OSError as e:
            log.debug("sysfs mount refused (%s), binding the host's /sys read-only", e)
    if not mounted:
        _bind("/sys", sys_dir, readonly=True)
    if not unmask:  # --privileged, --security-opt systempaths=unconfined leave them
        _mask_dirs(sys_dir, MASKED_SYS_DIRS)


def _setup_user_mount(root: str, m: MountRequest) -> None:
    if m.kind == "tmpfs":
        target = make_dirs_in_root(root, m.target)
        if target == root:
            raise ContainerError("invalid mount: destination can't be '/'")
        flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if m.readonly else 0)
        linux.mount("tmpfs", target, "tmpfs", flags, m.options or "mode=1777")
        return
    if m.kind == "tmpfs-volume":
        _mount_tmpfs_volume(root, m)
        return
    assert m.source is not None
    if m.kind == "volume":
        target = make_dirs_in_root(root, m.target)
        if target == root:
            raise ContainerError("invalid mount: destination can't be '/'")
        if not os.listdir(m.source):
            _populate_volume(target, m.source)
        _bind(m.source, target, readonly=m.readonly)
        return
    try:
        is_dir = os.path.isdir(m.source)
    except OSError:
        is_dir = False
    if not os.path.exists(m.source):
        raise ContainerError(f"invalid mount: source {m.source} does not exist")
    target = make_dirs_in_root(root, m.target) if is_dir else make_file_in_root(root, m.target)
    if target == root:
        raise ContainerError("invalid mount: destination can't be '/'")
    _bind(m.source, target, readonly=m.readonly)


def _mount_tmpfs_volume(root: str, m: MountRequest) -> None:
    """A volume of docker's local driver with ``type=tmpfs``: a new tmpfs, filled from the image
    as an empty volume is. The image's directory is read through a descriptor opened before the
    tmpfs covers it."""
    target = make_dirs_in_root(root, m.target)
    if target == root:
        raise ContainerError("invalid mount: destination can't be '/'")
    image_dir = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, m.options)
        below = f"/proc/self/fd/{image_dir}"
        if os.listdir(below):
            _populate_volume(below, target)
    finally:
        os.close(image_dir)
    if m.readonly:
        remount_readonly(target)


def _populate_volume(image_dir: str, volume: str) -> None:
    """As docker: a new volume starts as a copy of what the image has at its mount point."""
    shutil.copytree(image_dir, volume, symlinks=True, dirs_exist_ok=True)
    st = os.stat(image_dir)
    with contextlib.suppress(OSError):
        os.chmod(volume, stat.S_IMODE(st.st_mode))
        os.chown(volume, st.st_uid, st.st_gid)
    for dirpath, dirnames, filenames in os.walk(image_dir):
        for name in dirnames + filenames:
            source = os.path.join(dirpath, name)
            copy = os.path.join(volume, os.path.relpath(source, image_dir))
            with contextlib.suppress(OSError):
                st = os.lstat(source)
                os.lchown(copy, st.st_uid, st.st_gid)


def prepare_root(root: str, *, cwd: str, create_cwd: bool, etc_files: dict[str, str],
                 mounts: list[MountRequest], console: str | None, own_netns: bool,
                 readonly: bool, gid5_mapped: bool, shm_size: int = 0, unmask_proc: bool = False,
                 host_proc: bool = False, shm_source: str | None = "") -> None:
    """Mount everything under ``root`` (the future ``/``); see the module docstring for the order."""
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    if create_cwd and cwd not in ("", "/"):
        try:
            make_dirs_in_root(root, cwd)
        except OSError as e:
            raise ContainerError(f"cannot create working directory {cwd}: {e.strerror}") from e
    _setup_proc(root, unmask_proc, host_proc)
    _setup_dev(root, console, gid5_mapped, shm_size, shm_source)
    _setup_sys(root, own_netns, unmask_proc)
    for name, host_file in etc_files.items():
        target = resolve_in_root(root, "/etc/" + name)
        if not os.path.isfile(target):
            target = make_file_in_root(root, "/etc/" + name)
        _bind(host_file, target, recursive=False)
    for m in mounts:
        try:
            _setup_user_mount(root, m)
        except OSError as e:
            raise ContainerError(f"cannot mount {m.source or m.kind} on {m.target}: {e.strerror}") from e
    if readonly:
        remount_readonly(root)


def pivot_into(root: str) -> None:
    """Make ``root`` the root of this mount namespace and drop the old one."""
    os.chdir(root)
    linux.pivot_root(".", ".")
    # The old root is now stacked under the new one at "/": detach it.
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def describe_errno(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, str(e))
