"""``--memory``, ``--cpus`` and ``--pids-limit`` through a cgroup v2 subtree delegated to this user.

Rootless, the only cgroups lamina may write are those the system delegated to the user (systemd's
``user@UID.service`` with ``Delegate=yes``, or a container manager that handed over its subtree):
directories of the unified hierarchy owned by the user, whose ``cgroup.subtree_control`` enables
the controllers. :func:`find_delegation` walks up from lamina's own cgroup to the topmost such
directory; a container then gets a child ``lamina-<id>`` of it with ``memory.max``, ``cpu.max`` and
``pids.max`` written, and its keeper is moved there before the container's first process exists,
so every process of the container is inside.

Without such a subtree (cgroup v1, a hybrid layout, no delegation, a controller not enabled) the
limits cannot be applied. As rootless podman does on such a system, the container runs without
them after a warning; :func:`plan_limits` returns that warning.

Resource handling: :class:`CgroupLimits` owns the directory it made; :meth:`CgroupLimits.remove`
deletes it once the container's processes are gone (the kernel refuses while any is inside).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP2_SUPER_MAGIC = 0x63677270
CPU_PERIOD_US = 100_000
# The record's resource names -> the controller each one needs.
CONTROLLERS = {"Memory": "memory", "NanoCpus": "cpu", "PidsLimit": "pids"}
WARNING = "Resource limits are not supported and ignored on cgroups V1 rootless systems"


def _own_cgroup(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _is_cgroup2(path: Path) -> bool:
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return int(buf.f_type) == CGROUP2_SUPER_MAGIC


def find_delegation(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None,
                    uid: int | None = None) -> Path | None:
    """The topmost cgroup v2 directory above (or at) this process's own cgroup that ``uid`` owns
    and may move processes within; None when there is none (or no unified hierarchy at ``root``)."""
    uid = os.geteuid() if uid is None else uid
    if proc_cgroup is None:
        try:
            with open("/proc/self/cgroup") as f:
                proc_cgroup = f.read(1 << 16)
        except OSError:
            return None
    own = _own_cgroup(proc_cgroup)
    if own is None or not (root / "cgroup.controllers").is_file():
        return None
    if root == CGROUP_ROOT and not _is_cgroup2(root):
        return None
    path = (root / own.lstrip("/")).resolve()
    found = None
    while True:
        procs = path / "cgroup.procs"
        try:
            owned = uid == 0 or (path.stat().st_uid == uid and procs.stat().st_uid == uid)
        except OSError:
            owned = False
        if not owned:
            break
        found = path
        if path == root or path.parent == path:
            break
        path = path.parent
    return found


def enabled_controllers(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.subtree_control").read_text().split())
    except OSError:
        return set()


def limit_files(resources: dict[str, int]) -> dict[str, str]:
    """The cgroup v2 files and values for docker's resource fields."""
    files = {}
    if resources.get("Memory"):
        files["memory.max"] = str(resources["Memory"])
        # docker's default --memory-swap is twice --memory: as much swap again.
        files["memory.swap.max"] = str(resources["Memory"])
    if resources.get("NanoCpus"):
        files["cpu.max"] = f"{resources['NanoCpus'] * CPU_PERIOD_US // 1_000_000_000} {CPU_PERIOD_US}"
    limit = resources.get("PidsLimit")
    if limit is not None and limit != 0:
        files["pids.max"] = "max" if limit < 0 else str(limit)
    return files


@dataclass
class CgroupLimits:
    """A container's cgroup with its limits written."""

    directory: Path

    def add_process(self, pid: int) -> None:
        (self.directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


def plan_limits(resources: dict[str, int], delegation: Path | None) -> str | None:
    """Why the limits cannot be applied here (the warning to print), or None when they can."""
    wanted = {CONTROLLERS[name] for name, value in resources.items() if value and name in CONTROLLERS}
    if not wanted:
        return None
    if delegation is None:
        return WARNING
    missing = wanted - enabled_controllers(delegation)
    if missing:
        return (f"Resource limits need the cgroup controllers {', '.join(sorted(missing))}, not delegated to "
                f"this user in {delegation}: ignored")
    return None


def make_cgroup(delegation: Path, name: str, resources: dict[str, int]) -> CgroupLimits:
    """Make ``delegation/name`` with the limits written (OSError when the kernel refuses)."""
    directory = delegation / name
    directory.mkdir(exist_ok=True)
    limits = CgroupLimits(directory)
    try:
        for file_name, value in limit_files(resources).items():
            try:
                (directory / file_name).write_text(value)
            except FileNotFoundError:
                if file_name != "memory.swap.max":  # no swap accounting: nothing to limit
                    raise
    except OSError:
        limits.remove()
        raise
    return limits
