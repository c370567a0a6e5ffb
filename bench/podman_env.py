"""A private, throwaway podman environment, for benchmarks and interop tests.

podman 4.3 on these machines needs a few things that a normal distribution has and these VMs
lack (see NOTES.md): a ``containers.conf`` with explicit ``default_ulimits`` (root lacks
CAP_SYS_RESOURCE, so podman's default of raising nofile fails), a ``hugetlb`` cgroup v1 hierarchy
for crun on this hybrid cgroup layout, and, when rootless, an ``XDG_RUNTIME_DIR`` owned by the
user and ``/dev/net/tun`` with mode 0666.

:class:`PodmanEnv` keeps every piece of podman state (``--root``, ``--runroot``, ``--tmpdir``,
configuration files, the CNI configuration directory, the rootless user's ``HOME``) under one
temporary directory, so nothing leaks into, or reads from, any other podman state on the machine.
:func:`open_podman_env` is the usual entry point::

    with open_podman_env(storage_driver="overlay") as podman:
        podman.run(["import", "rootfs.tar", "localhost/base"])
        podman.run(["run", "--rm", "--network=none", "localhost/base", "true"])

Resource handling: the environment owns its temporary directory, every mount podman leaves
under it, and (rootless) podman's pause process; :meth:`PodmanEnv.close` (or leaving the
``with`` block) unmounts, kills that pause process by its pid and removes the directory.

Error handling: :class:`PodmanUnavailable` when podman or the host set-up it needs is missing
(callers skip or report "not available"); :class:`subprocess.CalledProcessError` from
:meth:`PodmanEnv.run` with ``check=True`` when a podman command fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ULIMITS = ('"nofile=20000:20000"', '"nproc=32768:32768"')
HUGETLB_MOUNT = Path("/sys/fs/cgroup/hugetlb")
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
BENCH_USER = "lamina-bench"


class PodmanUnavailable(RuntimeError):
    """podman cannot run here (not installed, or the host set-up it needs cannot be made)."""


@dataclass(frozen=True)
class PodmanUser:
    """The unprivileged account a rootless environment runs podman as."""

    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> PodmanUser:
    entry = pwd.getpwnam(name)
    return PodmanUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_bench_user(name: str = BENCH_USER) -> PodmanUser:
    """The unprivileged user rootless benchmarks run as, created (with subordinate ids) if missing.

    Needs root. ``useradd`` gives the new user ranges in /etc/subuid and /etc/subgid, which
    rootless podman needs to map image owners.
    """
    try:
        return lookup_user(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise PodmanUnavailable(f"user {name!r} does not exist and only root can create it")
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return lookup_user(name)


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with spaces and the like octal-escaped.
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def prepare_host(*, rootless: bool) -> None:
    """Make the machine-wide set-up podman needs here; idempotent. Needs root.

    Creates the ``hugetlb`` cgroup v1 mount crun expects on this hybrid layout and, for rootless
    use, gives ``/dev/net/tun`` and ``/dev/fuse`` mode 0666 as a normal distribution does.
    """
    if shutil.which("podman") is None:
        raise PodmanUnavailable("podman is not installed")
    if os.geteuid() != 0:
        return  # nothing we may change; podman reports what is missing
    cgroup = Path("/sys/fs/cgroup")
    v1_hierarchies = [p for p in cgroup.iterdir() if p.name in ("cpu", "memory", "pids")] if cgroup.is_dir() else []
    if v1_hierarchies and str(HUGETLB_MOUNT) not in _mountpoints():
        HUGETLB_MOUNT.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB_MOUNT)],
                              capture_output=True, text=True)
        if done.returncode != 0 and str(HUGETLB_MOUNT) not in _mountpoints():
            raise PodmanUnavailable(f"cannot mount the hugetlb cgroup: {done.stderr.strip()}")
    if rootless:
        for device in ("/dev/net/tun", "/dev/fuse"):
            if os.path.exists(device) and os.stat(device).st_mode & 0o666 != 0o666:
                os.chmod(device, 0o666)


class PodmanEnv:
    """podman with all of its state under ``base``; see the module docstring.

    ``storage_driver`` is ``vfs`` (a full copy per layer: slow but needs nothing) or ``overlay``
    (the kernel's overlayfs, also rootless on kernels >= 5.11); ``mount_program`` (e.g.
    ``/usr/bin/fuse-overlayfs``) makes the overlay driver mount through that program instead, as
    rootless podman did before native rootless overlay. ``user`` runs podman as that account.
    """

    def __init__(self, base: Path, *, storage_driver: str = "vfs", user: PodmanUser | None = None,
                 mount_program: str | None = None) -> None:
        self.base = base
        self.storage_driver = storage_driver
        self.user = user
        self.mount_program = mount_program
        self.graphroot = base / "root"
        # The overlay driver refuses a runroot longer than 50 characters: keep it short, outside base.
        self.runroot = Path(tempfile.mkdtemp(prefix="lpr-", dir="/tmp"))
        self.tmpdir = base / "tmp"
        self.home = base / "home"
        self.runtime_dir = base / "xdg-runtime"
        self.containers_conf = base / "containers.conf"
        self.storage_conf = base / "storage.conf"
        self.registries_conf = base / "registries.conf"
        self._closed = False
        self._write_layout()

    @property
    def rootless(self) -> bool:
        return self.user is not None and self.user.uid != 0

    @property
    def label(self) -> str:
        """A short name for reports, e.g. ``root/overlay`` or ``rootless/fuse-overlayfs``."""
        who = "rootless" if self.rootless else "root"
        what = "fuse-overlayfs" if self.mount_program else self.storage_driver
        return f"{who}/{what}"

    def _write_layout(self) -> None:
        for directory in (self.graphroot, self.tmpdir, self.home, self.runtime_dir,
                          self.base / "cni"):
            directory.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.chmod(0o700)
        self.containers_conf.write_text(
            "[containers]\n"
            f"default_ulimits = [{', '.join(DEFAULT_ULIMITS)}]\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.base / "events.log"}"\n'
            'runtime = "crun"\n'
            "[network]\n"
            f'network_config_dir = "{self.base / "cni"}"\n'
        )
        options = ""
        if self.mount_program:
            options = f'[storage.options.overlay]\nmount_program = "{self.mount_program}"\n'
        self.storage_conf.write_text(
            "[storage]\n"
            f'driver = "{self.storage_driver}"\n'
            f'runroot = "{self.runroot}"\n'
            f'graphroot = "{self.graphroot}"\n' + options
        )
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        if self.rootless:
            assert self.user is not None
            self.base.chmod(0o755)
            for path in [self.base, *self.base.rglob("*"), self.runroot]:
                os.lchown(path, self.user.uid, self.user.gid)
            # Every ancestor must be searchable by the user, or podman fails with a puzzling EACCES.
            if not all(ancestor.stat().st_mode & 0o001 for ancestor in self.base.parents):
                raise PodmanUnavailable(f"user {self.user.name} cannot reach {self.base}")

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "TMPDIR": str(self.tmpdir),
            "LANG": "C.UTF-8",
        }
        if self.rootless:
            assert self.user is not None
            env.update(USER=self.user.name, LOGNAME=self.user.name, XDG_RUNTIME_DIR=str(self.runtime_dir))
        return env

    def argv(self, args: Sequence[str]) -> list[str]:
        """The full podman command line for ``args`` in this environment."""
        argv = ["podman", "--root", str(self.graphroot), "--runroot", str(self.runroot),
                "--tmpdir", str(self.tmpdir), "--storage-driver", self.storage_driver]
        if self.mount_program:
            argv += ["--storage-opt", f"overlay.mount_program={self.mount_program}"]
        return argv + list(args)

    def run(self, args: Sequence[str], *, check: bool = True, capture: bool = True, input: bytes | None = None,
            cwd: Path | None = None, timeout: float = 600, extra_env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS`` (as the environment's user) and wait for it."""
        env = self.environment()
        if extra_env:
            env.update(extra_env)
        kwargs: dict = {}
        if self.rootless:
            assert self.user is not None
            kwargs.update(user=self.user.uid, group=self.user.gid, extra_groups=[])
        return subprocess.run(self.argv(args), env=env, cwd=cwd, input=input, timeout=timeout, check=check,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None, **kwargs)

    def chown_for_user(self, path: Path) -> None:
        """Give ``path`` (a file or tree the caller made for this environment) to its user."""
        if not self.rootless:
            return
        assert self.user is not None
        for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.lchown(item, self.user.uid, self.user.gid)

    def _pause_pids(self) -> list[int]:
        pids = []
        for candidate in self.base.rglob("pause.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(candidate.read_text().strip()))
        return pids

    def close(self) -> None:
        """Stop what podman left running for this environment, unmount, remove the directory."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.run(["rm", "--all", "--force", "--time", "0"], timeout=60, check=False)
        if self.rootless:
            # vfs layers of a rootless store contain files owned by subordinate ids: remove them
            # from inside the user namespace, while podman's pause process still holds it.
            with contextlib.suppress(Exception):
                self.run(["unshare", "rm", "-rf", str(self.graphroot)], timeout=120, check=False)
        # Rootless podman's user-namespace holder, started by our commands: the last podman
        # command above has run, so no new one appears after this.
        for pid in self._pause_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        prefixes = tuple(str(p.resolve()) + "/" for p in (self.base, self.runroot))
        for mountpoint in sorted((m for m in _mountpoints() if m.startswith(prefixes)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            log.warning("could not remove podman environment %s", self.base)

    def __enter__(self) -> PodmanEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_podman_env(*, storage_driver: str = "vfs", user: PodmanUser | None = None,
                    mount_program: str | None = None, parent: Path | None = None) -> Iterator[PodmanEnv]:
    """A fresh :class:`PodmanEnv` under a new temporary directory; removed on exit.

    ``parent`` is where the temporary directory goes (default: the system's, made reachable for
    a rootless ``user``). Raises :class:`PodmanUnavailable` when podman cannot work here.
    """
    prepare_host(rootless=user is not None and user.uid != 0)
    base = Path(tempfile.mkdtemp(prefix="lamina-podman-", dir=parent))
    try:
        env = PodmanEnv(base, storage_driver=storage_driver, user=user, mount_program=mount_program)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    with env:
        yield env
