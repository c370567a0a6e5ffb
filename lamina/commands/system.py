"""The verbs about lamina itself: ``version``, ``info``, and ``system df|prune|check``.

``version`` and ``info`` give docker's shape (a Client and a Server section; docker's field names
under ``--format``), filled with what is true of lamina: there is no daemon, so the "server" is
this same program on this kernel, and the storage driver is lamina's own union filesystem. Each
verb builds its data as a dict first, so ``--format`` and the text output read the same facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina import __version__
from lamina.commands.formatting import render_template
from lamina.errors import StoreError
from lamina.layout import Layout
from lamina.store.blobs import remove_tree, temp_name
from lamina.store.progress import human_size

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger(__name__)

_GO_OS = "linux"


def _go_arch() -> str:
    from lamina.store.platforms import host_platform

    return host_platform().architecture


# --- version -------------------------------------------------------------------------------------


def version_data() -> dict[str, Any]:
    """docker's ``version`` fields that mean something here (no API: lamina has no daemon)."""
    arch = _go_arch()
    kernel = platform.release()
    python = platform.python_version()
    return {
        "Client": {"Platform": {"Name": "lamina"}, "Version": __version__, "PythonVersion": python,
                   "Os": _GO_OS, "Arch": arch, "Context": "default"},
        "Server": {"Platform": {"Name": "lamina (daemonless)"},
                   "Components": [{"Name": "Engine", "Version": __version__,
                                   "Details": {"Os": _GO_OS, "Arch": arch, "KernelVersion": kernel}},
                                  {"Name": "lamina-unionfs", "Version": __version__, "Details": {}}],
                   "Version": __version__, "PythonVersion": python, "Os": _GO_OS, "Arch": arch,
                   "KernelVersion": kernel},
    }


def _print_sections(lines: list[tuple[int, str, str]], aligned: bool = True) -> None:
    """docker's indented ``Key: value`` lines: (depth, key, value); a value of "" is a heading, a
    key of "" a bare item. ``version`` aligns the values, ``info`` does not."""
    for depth, key, value in lines:
        indent = " " * depth
        if not key:
            print(f"{indent}{value}")
        elif value == "":
            print(f"{indent}{key}:")
        else:
            print(f"{indent}{key + ':':<{19 - depth}}{value}" if aligned else f"{indent}{key}: {value}")


def cmd_version(args: argparse.Namespace) -> int:
    data = version_data()
    if args.format:
        print(json.dumps(data) if args.format == "json" else render_template(args.format, data))
        return 0
    client, server = data["Client"], data["Server"]
    engine = server["Components"][0]
    lines = [(0, "Client", ""), (1, "Version", client["Version"]), (1, "Python version", client["PythonVersion"]),
             (1, "OS/Arch", f"{client['Os']}/{client['Arch']}"), (1, "Context", client["Context"])]
    _print_sections(lines)
    print()
    print(f"Server: {server['Platform']['Name']}")
    _print_sections([(1, "Engine", ""), (2, "Version", engine["Version"]),
                     (2, "OS/Arch", f"{server['Os']}/{server['Arch']}"),
                     (2, "Kernel version", server["KernelVersion"])])
    for component in server["Components"][1:]:
        _print_sections([(1, component["Name"], ""), (2, "Version", component["Version"])])
    return 0


# --- info ----------------------------------------------------------------------------------------


def cgroup_version() -> str:
    """"2" on a unified cgroup hierarchy, "1" on a legacy or hybrid one, "" without cgroups."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == "/sys/fs/cgroup":
                    fstype = fields[fields.index("-") + 1]
                    return "2" if fstype == "cgroup2" else "1"
    except (OSError, ValueError, IndexError):
        pass
    return ""


def _operating_system() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return "linux"
    return fields.get("PRETTY_NAME", "linux").strip('"')


def _memory_total() -> int:
    """MemTotal of /proc/meminfo in bytes, as docker's and podman's info read it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def info_data(layout: Layout) -> dict[str, Any]:
    """docker's ``info`` fields that make sense for lamina, with docker's names."""
    from lamina.application import open_store
    from runner.state import STATUS_RUNNING, ContainerStore

    containers = ContainerStore(layout).all()
    statuses = [c.state.status for c in containers]
    images = open_store(layout).images()
    rootless = os.geteuid() != 0
    return {
        "ID": "", "Name": socket.gethostname(),
        "Containers": len(containers), "ContainersRunning": statuses.count(STATUS_RUNNING),
        "ContainersPaused": statuses.count("paused"),
        "ContainersStopped": len(statuses) - statuses.count(STATUS_RUNNING) - statuses.count("paused"),
        "Images": len(images), "Driver": "lamina-unionfs", "DriverStatus": [["Backing Filesystem", _fs_type(layout.root)]],
        "DockerRootDir": str(layout.root), "LoggingDriver": "lamina", "CgroupDriver": "none",
        "CgroupVersion": cgroup_version(), "KernelVersion": platform.release(),
        "OperatingSystem": _operating_system(), "OSType": _GO_OS, "Architecture": platform.machine(),
        "NCPU": os.cpu_count() or 0, "MemTotal": _memory_total(), "ServerVersion": __version__,
        "SecurityOptions": ["name=seccomp,profile=builtin", *(["name=rootless"] if rootless else [])],
        "Debug": False,
    }


def _fs_type(path: Path) -> str:
    """The filesystem type of ``path`` (or its nearest existing parent), from the mount table."""
    try:
        target = os.path.realpath(path)
        best, kind = "", "unknown"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mountpoint = fields[4].encode().decode("unicode_escape")
                inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
                if inside and len(mountpoint) >= len(best):
                    best, kind = mountpoint, fields[fields.index("-") + 1]
        return kind
    except (OSError, ValueError, IndexError):
        return "unknown"


def cmd_info(args: argparse.Namespace) -> int:
    data = info_data(args.layout)
    if args.format:
        print(json.dumps(data) if args.format == "json" else render_template(args.format, data))
        return 0
    _print_sections([
        (0, "Server", ""), (1, "Containers", str(data["Containers"])),
        (2, "Running", str(data["ContainersRunning"])), (2, "Paused", str(data["ContainersPaused"])),
        (2, "Stopped", str(data["ContainersStopped"])), (1, "Images", str(data["Images"])),
        (1, "Server Version", data["ServerVersion"]), (1, "Storage Driver", data["Driver"]),
        *[(2, key, value) for key, value in data["DriverStatus"]],
        (1, "Logging Driver", data["LoggingDriver"]), (1, "Cgroup Driver", data["CgroupDriver"]),
        (1, "Cgroup Version", data["CgroupVersion"]), (1, "Security Options", ""),
        *[line for option in data["SecurityOptions"] for line in _security_option_lines(option)],
        (1, "Kernel Version", data["KernelVersion"]), (1, "Operating System", data["OperatingSystem"]),
        (1, "OSType", data["OSType"]), (1, "Architecture", data["Architecture"]), (1, "CPUs", str(data["NCPU"])),
        (1, "Total Memory", human_size(data["MemTotal"])), (1, "Name", data["Name"]),
        (1, "Docker Root Dir", data["DockerRootDir"]), (1, "Debug Mode", str(data["Debug"]).lower()),
    ], aligned=False)
    return 0


def _security_option_lines(option: str) -> list[tuple[int, str, str]]:
    """``name=seccomp,profile=builtin`` as docker prints it: ``seccomp`` then `` Profile: builtin``."""
    fields = dict(part.split("=", 1) for part in option.split(",") if "=" in part)
    return [(2, "", fields.get("name", option)),
            *[(3, key.capitalize(), value) for key, value in fields.items() if key != "name"]]


# --- system df -----------------------------------------------------------------------------------


def disk_usage(path: Path) -> int:
    """Bytes of disk under ``path`` (blocks, as du counts them); 0 when it is missing."""
    total = 0
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
    return total


def _reclaimable(amount: int, size: int) -> str:
    """docker's RECLAIMABLE cell: ``1.2MB (40%)``."""
    if size <= 0:
        return human_size(amount)
    return f"{human_size(amount)} ({int(amount * 100 / size)}%)"


def disk_usage_rows(layout: Layout) -> list[dict[str, str]]:
    """docker's four ``system df`` rows: Images, Containers, Local Volumes, Build Cache."""
    from lamina.application import open_store
    from runner.state import ContainerStore

    store = open_store(layout)
    images = store.images()
    active_images = [i for i in images if store.image_in_use(i.id)]
    images_size = sum(i.size for i in images)
    idle_size = sum(i.size for i in images if i not in active_images)
    containers = ContainerStore(layout).all()
    upper_sizes = {c.id: disk_usage(c.upper) for c in containers}
    stopped_size = sum(size for cid, size in upper_sizes.items()
                       if not next(c for c in containers if c.id == cid).running)
    volumes = sorted(p for p in layout.volumes.iterdir() if p.is_dir()) if layout.volumes.is_dir() else []
    used_volumes = {str(Path(m["source"]).parent) for c in containers for m in c.mounts
                    if m.get("kind") == "volume" and m.get("source")}
    volume_sizes = {str(v): disk_usage(v) for v in volumes}
    idle_volume_size = sum(size for v, size in volume_sizes.items() if v not in used_volumes)
    # Lazy images' caches (chunks, TOCs, whole layers) are image content: counted with the images.
    from lamina.lazy.state import usage as lazy_usage

    lazy = lazy_usage(layout)
    images_size += lazy.bytes
    idle_size += lazy.unused_bytes
    steps = layout.build_cache / "steps"
    cache_entries = sum(1 for _ in steps.rglob("*.json")) if steps.is_dir() else 0
    cache_size = disk_usage(layout.build_cache)
    rows = [
        ("Images", len(images), len(active_images), images_size, _reclaimable(idle_size, images_size)),
        ("Containers", len(containers), sum(c.running for c in containers), sum(upper_sizes.values()),
         _reclaimable(stopped_size, sum(upper_sizes.values()))),
        ("Local Volumes", len(volumes), len(used_volumes & set(volume_sizes)), sum(volume_sizes.values()),
         _reclaimable(idle_volume_size, sum(volume_sizes.values()))),
        ("Build Cache", cache_entries, 0, cache_size, human_size(cache_size)),
    ]
    return [{"Type": kind, "TotalCount": str(total), "Active": str(active), "Size": human_size(size),
             "Reclaimable": reclaimable} for kind, total, active, size, reclaimable in rows]


def cmd_system_df(args: argparse.Namespace) -> int:
    rows = disk_usage_rows(args.layout)
    if args.format:
        for row in rows:
            print(json.dumps(row) if args.format == "json" else render_template(args.format, row))
        return 0
    from lamina.commands.formatting import print_table

    print_table([["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
                 *[[r["Type"], r["TotalCount"], r["Active"], r["Size"], r["Reclaimable"]] for r in rows]])
    return 0


# --- system prune, check -------------------------------------------------------------------------


def cmd_system_prune(args: argparse.Namespace) -> int:
    """docker's system prune: stopped containers, dangling (with -a: unused) images, and with -a
    the build cache's step entries; then whatever no longer has an owner."""
    from lamina.application import open_store
    from lamina.commands.containers import prune_containers
    from lamina.commands.images import prune_images

    container_ids, container_bytes = prune_containers(args.layout)
    for container_id in container_ids:
        print(f"Deleted container: {container_id}")
    store = open_store(args.layout)
    with store.lock():
        removed, layer_bytes = prune_images(store, every_unused=args.all)
        for image in removed:
            print(f"Deleted image: sha256:{image.id}")
        if args.all and (args.layout.build_cache / "steps").exists():
            remove_build_cache(args.layout, store, mounts_too=False)
            print("Deleted build cache step entries")
        n_blobs, n_layers, freed = store.gc()
        from lamina.lazy.state import prune as prune_lazy

        lazy_files, lazy_bytes = prune_lazy(args.layout)
    print(f"Deleted {len(removed)} images, {n_layers} layers, {n_blobs} blobs")
    if lazy_files:
        print(f"Deleted {lazy_files} cached lazy layer files (chunks, TOCs, tars)")
    print(f"Total reclaimed space: {human_size(container_bytes + layer_bytes + freed + lazy_bytes)}")
    return 0


def cmd_system_check(args: argparse.Namespace) -> int:
    from lamina.application import open_store

    problems = open_store(args.layout).check(verify_blobs=not args.quick)
    if problems:
        for problem in problems:
            print(problem)
        raise StoreError(f"store {args.layout.root} has {len(problems)} problem(s)")
    print(f"store {args.layout.root}: ok")
    return 0


def remove_build_cache(layout: Layout, store: Store, mounts_too: bool) -> int:
    """Remove the build cache's step entries (they pin their layers; the next build recomputes
    them) and, with ``mounts_too``, the ``RUN --mount=type=cache`` directories; the bytes freed."""
    freed = 0
    names = ("steps", "mounts") if mounts_too else ("steps",)
    for name in names:
        directory = layout.build_cache / name
        if not directory.exists():
            continue
        freed += disk_usage(directory)
        doomed = temp_name(store.tmp_dir, "doomed")
        os.rename(directory, doomed)
        try:
            remove_tree(doomed)
        except OSError as e:  # already out of sight; the next prune retries
            log.info("cannot remove %s yet: %s", doomed, e)
    return freed


def cmd_builder_prune(args: argparse.Namespace) -> int:
    """docker's ``builder prune``: the build cache goes (with -a also RUN cache mounts); then the
    layers only it kept."""
    from lamina.application import open_store

    store = open_store(args.layout)
    with store.lock():
        freed = remove_build_cache(args.layout, store, mounts_too=args.all)
        freed += store.gc()[2]
    print(f"Total:\t{human_size(freed)}")
    return 0


# --- registration --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("version", help="lamina's version, and the kernel's")
    p.add_argument("-f", "--format", help="'json' or a template such as '{{.Client.Version}}'")
    p.set_defaults(handler=cmd_version)

    p = subparsers.add_parser("info", help="containers, images, storage and host as lamina sees them")
    p.add_argument("-f", "--format", help="'json' or a template such as '{{.Driver}}'")
    p.set_defaults(handler=cmd_info)

    p = subparsers.add_parser("system df", help="disk usage of images, containers, volumes, build cache")
    p.add_argument("--format", help="'json' or a template such as '{{.Type}} {{.Size}}'")
    p.add_argument("-v", "--verbose", action="store_true", help="accepted for docker compatibility")
    p.set_defaults(handler=cmd_system_df)

    p = subparsers.add_parser("system prune", help="remove stopped containers, dangling images, unreferenced "
                                                   "layers and blobs")
    p.add_argument("-a", "--all", action="store_true",
                   help="also images with tags (unless in use) and the build cache's step entries")
    p.add_argument("-f", "--force", action="store_true", help="do not ask (lamina never asks)")
    p.set_defaults(handler=cmd_system_prune)

    p = subparsers.add_parser("builder prune", help="remove the build cache (-a: RUN cache mounts too)")
    p.add_argument("-a", "--all", action="store_true", help="also the RUN --mount=type=cache directories")
    p.add_argument("-f", "--force", action="store_true", help="do not ask (lamina never asks)")
    p.set_defaults(handler=cmd_builder_prune)

    p = subparsers.add_parser("system check", help="verify blobs, layers, images and tags")
    p.add_argument("--quick", action="store_true", help="do not re-hash every blob")
    p.set_defaults(handler=cmd_system_check)
