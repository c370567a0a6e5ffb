"""Containers on disk: ``ROOT/containers/<64-hex id>/container.json`` plus the container's files.

A container directory holds ``container.json`` (the record below, rewritten atomically), ``upper/``
and ``work/`` (its writable layer), ``init/`` (the bottom layer with mount points), ``hosts``,
``hostname``, ``resolv.conf``, ``merged/`` (the mount point, used only inside the container's mount
namespace), ``container-json.log`` (the container's output, see :mod:`runner.containerlog`) and
``monitor.log`` (what a daemonised monitor itself has to say: lamina's diagnostics, never the
container's output).

A running container is served by one *monitor* process (the foreground ``lamina run``, or the
daemonised one of ``run -d``/``start``), whose pid and start time are recorded. When the monitor is
gone but the record still says running, lamina crashed or was killed: :func:`refresh` marks such a
container exited (code 255) the next time any command looks at it. Its namespaces, and with them
its union mount, died with the monitor (parent-death signals), so nothing stays mounted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import ContainerNotFound, UsageError
from lamina.layout import Layout

if TYPE_CHECKING:
    from lamina.store.usage import Needs

log = logging.getLogger(__name__)

STATUS_CREATED = "created"
STATUS_RUNNING = "running"
STATUS_EXITED = "exited"
CRASH_EXIT_CODE = 255

_ADJECTIVES = ("brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry",
               "nifty", "proud", "quirky", "sharp", "tender", "upbeat", "vivid", "witty", "zealous", "bold")
_NAMES = ("curie", "darwin", "euler", "fermi", "gauss", "hopper", "kepler", "lovelace", "noether",
          "pascal", "ritchie", "shannon", "thompson", "turing", "wozniak", "yalow", "knuth", "lamport")


_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")  # docker's rule


def valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a live monitor from a recycled pid)."""
    fields = proc_stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return fields[19]


@dataclass
class ContainerState:
    status: str = STATUS_CREATED
    pid: int = 0  # the container's init, as seen on the host
    monitor_pid: int = 0
    monitor_start: str = ""
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""
    error: str = ""
    restart_count: int = 0
    ports: list[dict[str, Any]] = field(default_factory=list)  # as published at this start
    paused: str = ""  # how `pause` holds it ("cgroup" or "signals"); "" when not paused


@dataclass
class Container:
    id: str
    name: str
    image: str
    image_id: str
    created: str
    argv: list[str]
    env: dict[str, str]
    workdir: str = "/"
    user: str = "0"
    hostname: str = ""
    network: str = "slirp"
    ports: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    anonymous_volumes: list[str] = field(default_factory=list)
    tty: bool = False
    interactive: bool = False
    init: bool = False
    readonly: bool = False
    auto_remove: bool = False
    stop_signal: int = 15
    seccomp: bool = True
    # docker's HostConfig and Config fields that run/create set (see runner.runflags)
    labels: dict[str, str] = field(default_factory=dict)
    extra_hosts: list[list[str]] = field(default_factory=list)  # [host, address]
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    capabilities: list[str] | None = None  # None: docker's default set
    privileged: bool = False
    no_new_privileges: bool = False
    unmask_proc: bool = False
    ulimits: list[dict[str, Any]] = field(default_factory=list)
    shm_size: int = 0  # 0: docker's 64 MiB
    stop_timeout: int | None = None
    restart_policy: dict[str, Any] = field(default_factory=lambda: {"Name": "no", "MaximumRetryCount": 0})
    log_options: dict[str, str] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)  # Memory, NanoCpus, PidsLimit
    platform: str = ""
    healthcheck: dict[str, Any] | None = None  # docker's Config.Healthcheck (runner.health)
    pid_mode: str = ""  # "host": the host's PID namespace
    ipc_mode: str = ""  # docker's --ipc: "" (private), none, private, shareable, host, container:<id>
    attach: list[str] = field(default_factory=list)  # run -a: the streams shown (empty: stdout, stderr)
    # Entrypoint and Cmd as run (argv is the two joined): what ``commit`` records. None in records
    # made before they were kept.
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    state: ContainerState = field(default_factory=ContainerState)
    directory: Path = field(default=Path("."), compare=False)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def upper(self) -> Path:
        return self.directory / "upper"

    @property
    def work(self) -> Path:
        return self.directory / "work"

    @property
    def log_path(self) -> Path:
        return self.directory / "container-json.log"

    @property
    def monitor_log_path(self) -> Path:
        return self.directory / "monitor.log"

    @property
    def running(self) -> bool:
        return self.state.status == STATUS_RUNNING

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> Container:
        state = ContainerState(**data.pop("state", {}))
        known = {f for f in cls.__dataclass_fields__ if f not in ("state", "directory")}
        return cls(**{k: v for k, v in data.items() if k in known}, state=state, directory=directory)

    @classmethod
    def read(cls, directory: Path) -> Container:
        """The record in ``directory`` as it is on disk now; OSError, ValueError or TypeError when
        it is missing or not a record."""
        return cls.from_json(json.loads((directory / "container.json").read_text()), directory)

    def save(self) -> None:
        path = self.directory / "container.json"
        tmp = self.directory / f".container.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    def save_state(self) -> None:
        """Save, keeping the name the record has on disk now: ``rename`` may have changed it while
        a monitor held this copy."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            name = json.loads((self.directory / "container.json").read_text()).get("name")
            if isinstance(name, str) and name:
                self.name = name
        self.save()

    def monitor_alive(self) -> bool:
        if not self.state.monitor_pid:
            return False
        return process_start_time(self.state.monitor_pid) == self.state.monitor_start


@contextlib.contextmanager
def directory_lock(layout: Layout, directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory/.lock`` (one of the store's directories, made with the
    store, private to its owner, when missing)."""
    if not directory.is_dir():
        from lamina.store import Store
        Store.open(layout)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ContainerStore:
    """The containers in ``layout.containers``."""

    def __init__(self, layout: Layout | Path) -> None:
        self.layout = Layout.of(layout)
        self.root = self.layout.root
        self.dir = self.layout.containers

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return directory_lock(self.layout, self.dir)

    def _load(self, directory: Path) -> Container | None:
        try:
            return Container.read(directory)
        except (OSError, ValueError, TypeError) as e:
            log.debug("skipping %s: %s", directory, e)
            return None

    def all(self) -> list[Container]:
        """Every container; ``--rm`` containers whose monitor was killed are removed on the way."""
        if not self.dir.is_dir():
            return []
        containers = []
        for entry in sorted(self.dir.iterdir()):
            if entry.is_dir() and len(entry.name) == 64:
                c = self._load(entry)
                if c is None:
                    continue
                c = refresh(c)
                if _abandoned(c):
                    self._remove_abandoned(c)
                    continue
                containers.append(c)
        containers.sort(key=lambda c: c.created, reverse=True)
        return containers

    def _remove_abandoned(self, container: Container) -> None:
        with self.lock():
            fresh = self._load(container.directory)
            if fresh is None or not _abandoned(refresh(fresh)):
                return  # removed meanwhile, or its monitor is live after all
            log.info("container %s: started with --rm and its monitor is gone, removing it",
                     container.short_id)
            self.remove_directory(fresh)
            remove_anonymous_volumes(self.layout, fresh)

    def store_needs(self) -> Needs:
        """The images containers were made from, each used by the containers' IDs (for the image
        store: :class:`lamina.store.usage.DigestOwner`). Read from the records as they are, without
        refreshing them: a record that cannot be read protects nothing."""
        from lamina.store.usage import Needs

        needs = Needs()
        for path in sorted(self.dir.glob("*/container.json")):
            with contextlib.suppress(OSError, ValueError, RecursionError):
                data = json.loads(path.read_bytes())
                image_id = data.get("image_id") if isinstance(data, dict) else None
                if isinstance(image_id, str) and image_id:
                    needs.use_image(image_id, path.parent.name)
        return needs

    def get(self, name_or_id: str) -> Container:
        """By exact name, full id, or unique id prefix; ContainerNotFound otherwise."""
        if not name_or_id:
            raise ContainerNotFound(name_or_id)
        containers = self.all()
        for c in containers:
            if c.name == name_or_id or c.id == name_or_id:
                return c
        matches = [c for c in containers if c.id.startswith(name_or_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"container id prefix {name_or_id!r} is ambiguous")
        raise ContainerNotFound(name_or_id)

    def create(self, container: Container) -> Container:
        """Give ``container`` an id (and a name when it has none) and its directory."""
        with self.lock():
            names = {c.name for c in self.all()}
            if container.name:
                if container.name in names:
                    raise UsageError(f'--name: the container name "{container.name}" is already in use')
            else:
                while True:
                    container.name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}"
                    if container.name not in names:
                        break
            container.id = secrets.token_hex(32)
            container.directory = self.dir / container.id
            container.directory.mkdir(parents=True, mode=0o700)
            for sub in ("upper", "work", "merged"):
                (container.directory / sub).mkdir()
            container.hostname = container.hostname or container.id[:12]
            container.save()
        return container

    def remove_directory(self, container: Container, background: bool = True) -> None:
        """Take the container's directory out of sight at once, and delete it in the background.

        The rename is what makes the container gone (``ps -a``, names, ``inspect`` no longer see it);
        the deletion itself is left to a detached process because removing directories is slow on
        filesystems that discard freed blocks (ext4 with ``-o discard``: ~4 ms a directory, 40 ms of
        every ``run --rm``). A deletion cut short by a crash is finished by the next one. With
        ``background`` False the directory is deleted here and now.
        """
        if not background:
            _delete_container_tree(container.directory)
            return
        doomed = self.dir / f"{REMOVING_PREFIX}{container.directory.name}"
        try:
            os.rename(container.directory, doomed)
        except OSError as e:
            log.debug("cannot move %s aside (%s): deleting it in place", container.directory, e)
            _delete_container_tree(container.directory)
            return
        # A doomed tree's record must not keep its image in use (store_needs reads the records).
        with contextlib.suppress(FileNotFoundError):
            (doomed / "container.json").unlink()
        _delete_in_background(self.dir)


REMOVING_PREFIX = ".removing-"


def remove_anonymous_volumes(layout: Layout, container: Container) -> None:
    """Remove the container's anonymous volumes that no other container names (``rm -v``, ``--rm``).
    Records made before volumes had names list their ``_data`` paths."""
    from runner.volumes import VolumeStore

    volumes = VolumeStore(layout)
    for entry in container.anonymous_volumes:
        volumes.remove_quietly(Path(entry).parent.name if "/" in entry else entry)


def _abandoned(container: Container) -> bool:
    """A ``--rm`` container whose monitor (or the ``run`` that was starting it) died without removing
    it: killed, or crashed. A ``create``d one that nobody started is not abandoned."""
    if not container.auto_remove or container.monitor_alive():
        return False
    return container.state.status != STATUS_CREATED or bool(container.state.monitor_pid)


def claim(container: Container) -> None:
    """Record this process as the one that starts ``container`` and watches it (its monitor): if
    it is killed before the command ends, the next command sees that (see :func:`refresh`)."""
    container.state.monitor_pid = os.getpid()
    container.state.monitor_start = process_start_time(os.getpid()) or ""
    container.save_state()


def sweep_debris(layout: Layout) -> None:
    """Remove what killed or crashed lamina processes left in the store at ``layout``: temporaries
    of writers that are gone (a killed build's step directories, the sandbox state inside them
    included) and ``--rm`` containers whose monitor is gone. Every command that uses the store
    calls this; a live process's files are never touched (their names carry its pid)."""
    from lamina.store.blobs import remove_stale_temps

    if layout.tmp.is_dir():
        remove_stale_temps(layout.tmp, remove=_remove_in_userns_if_needed)
    ContainerStore(layout).all()


def _remove_in_userns_if_needed(path: Path) -> None:
    from lamina.store.blobs import remove_tree

    try:
        remove_tree(path)
    except PermissionError:
        # A killed RUN step's upper holds files of subordinate ids: root of lamina's namespace
        # may delete them.
        from runner.sandbox import call_in_userns

        call_in_userns(remove_tree, path)


def _delete_container_tree(directory: Path) -> None:
    remove_owned_tree(directory)


def remove_owned_tree(directory: Path) -> None:
    """Delete ``directory``, whose files a container may have given subordinate ids."""
    from runner.sandbox import call_in_userns

    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError:
        # Files the container made may belong to subordinate ids: delete them as namespace root.
        with contextlib.suppress(Exception):
            call_in_userns(shutil.rmtree, directory, True)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)


def _delete_in_background(containers_dir: Path) -> None:
    """Delete every ``.removing-*`` tree under ``containers_dir`` in a detached process.

    The process holds none of our descriptors (an inherited lock would block other commands for as
    long as it runs) and outlives us. Should fork fail, the deletion happens here and now.
    """
    from runner import linux

    def delete() -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        logging.disable(logging.CRITICAL)  # nobody reads the output of a detached process
        _delete_removing_trees(containers_dir)

    try:
        linux.run_detached(delete, set())
    except OSError:
        _delete_removing_trees(containers_dir)


def _delete_removing_trees(containers_dir: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(containers_dir):
            if entry.name.startswith(REMOVING_PREFIX):
                _delete_container_tree(Path(entry.path))


def _unmount_stale(mountpoint: Path) -> None:
    """The union is mounted inside the container's namespaces and dies with them; a mount visible
    here was left by something else (an older lamina, ``lamina mount`` of the container): drop it."""
    if os.path.ismount(mountpoint):
        import subprocess

        log.info("unmounting stale %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def refresh(container: Container) -> Container:
    """Mark a container whose monitor died as exited (see the module docstring)."""
    if container.state.status == STATUS_RUNNING and not container.monitor_alive():
        fresh = None
        try:
            fresh = Container.read(container.directory)
        except (OSError, ValueError, TypeError):
            pass
        if fresh is not None and fresh.state.status != STATUS_RUNNING:
            return fresh
        log.info("container %s: its monitor is gone, marking it exited", container.short_id)
        _unmount_stale(container.directory / "merged")
        container.state.status = STATUS_EXITED
        container.state.exit_code = CRASH_EXIT_CODE
        container.state.finished_at = now()
        container.state.pid = 0
        with contextlib.suppress(OSError):
            container.save()
    return container


def _health(c: Container) -> dict[str, Any]:
    from runner.health import read_health

    if c.healthcheck is None:
        return {}
    return {"Health": read_health(c.directory) or {"Status": "starting", "FailingStreak": 0, "Log": []}}


def _port_map(ports: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    result: dict[str, list[dict[str, str]]] = {}
    for p in ports:
        result.setdefault(f"{p['container_port']}/{p['proto']}", []).append(
            {"HostIp": p["host_ip"], "HostPort": str(p["host_port"]) if p["host_port"] else ""})
    return result


def _binds(c: Container) -> list[str]:
    """``-v`` style entries for the binds and named volumes (docker lists no anonymous volume)."""
    named = [m for m in c.mounts if m.get("kind") == "bind"
             or (m.get("kind") == "volume" and m.get("volume") not in c.anonymous_volumes)]
    return [f"{m.get('volume') or m.get('source')}:{m['target']}" + (":ro" if m.get("readonly") else "")
            for m in named]


def _host_config(c: Container) -> dict[str, Any]:
    """docker's HostConfig names for what run/create recorded."""
    from runner.linux import DOCKER_DEFAULT_CAPS

    caps = c.capabilities
    default = list(DOCKER_DEFAULT_CAPS)
    security = ([] if c.seccomp else ["seccomp=unconfined"]) + (["no-new-privileges"] if c.no_new_privileges else [])
    return {
        "NetworkMode": "bridge" if c.network == "slirp" else c.network, "ReadonlyRootfs": c.readonly,
        "AutoRemove": c.auto_remove, "Init": c.init, "PortBindings": _port_map(c.ports), "PidMode": c.pid_mode,
        "IpcMode": c.ipc_mode or "private",
        "Binds": _binds(c),
        "CapAdd": None if caps is None else [x for x in caps if x not in default] or None,
        "CapDrop": None if caps is None else [x for x in default if x not in caps] or None,
        "Privileged": c.privileged, "SecurityOpt": security or None,
        "ExtraHosts": [f"{host}:{address}" for host, address in c.extra_hosts] or None,
        "Dns": list(c.dns), "DnsSearch": list(c.dns_search), "DnsOptions": list(c.dns_options),
        "Ulimits": list(c.ulimits) or None, "ShmSize": c.shm_size or 64 * 1024 * 1024,
        "RestartPolicy": dict(c.restart_policy), "LogConfig": {"Type": "json-file", "Config": dict(c.log_options)},
        "Memory": c.resources.get("Memory", 0), "NanoCpus": c.resources.get("NanoCpus", 0),
        "PidsLimit": c.resources.get("PidsLimit"),
    }
# docker's "never": Go's zero time.Time, which clients parse as a date (an empty string fails them).
GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def _signal_name(number: int) -> str:
    """docker's Config.StopSignal is a name ("SIGTERM"), not a number."""
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def inspect_container(layout: Layout, name: str) -> dict[str, Any]:
    """``lamina inspect CONTAINER``: docker's field names for the record (``{{.State.Pid}}`` etc.)."""
    c = ContainerStore(layout).get(name)
    return {
        "Id": c.id,
        "Name": "/" + c.name,
        "Created": c.created,
        "Image": "sha256:" + c.image_id,
        "Path": c.argv[0] if c.argv else "",
        "Args": c.argv[1:],
        "State": {"Status": "paused" if c.running and c.state.paused else c.state.status, "Running": c.running,
                  "Paused": bool(c.running and c.state.paused), "Pid": c.state.pid,
                  "ExitCode": c.state.exit_code if c.state.exit_code is not None else 0,
                  "Error": c.state.error, "StartedAt": c.state.started_at or GO_ZERO_TIME,
                  "FinishedAt": c.state.finished_at or GO_ZERO_TIME, **_health(c)},
        "RestartCount": c.state.restart_count,
        "Config": {"Hostname": c.hostname, "User": c.user, "Env": [f"{k}={v}" for k, v in c.env.items()],
                   "Cmd": c.argv, "Image": c.image, "WorkingDir": c.workdir, "Tty": c.tty,
                   "OpenStdin": c.interactive, "StopSignal": _signal_name(c.stop_signal),
                   "StopTimeout": c.stop_timeout,
                   "Labels": dict(c.labels), **({"Healthcheck": c.healthcheck} if c.healthcheck else {})},
        "HostConfig": _host_config(c),
        "NetworkSettings": {"Ports": _port_map(c.state.ports if c.running else [])},
        "Mounts": [{"Type": m.get("kind", "bind"), "Name": m.get("volume") or "", "Source": m.get("source"),
                    "Destination": m["target"], "RW": not m.get("readonly")} for m in c.mounts],
        "GraphDriver": {"Name": "lamina-unionfs", "Data": {"UpperDir": str(c.upper), "WorkDir": str(c.work)}},
    }
