"""The container verbs: run, create, start, stop, kill, restart, rm, wait, ps, port, logs, exec,
diff. Handlers parse flags into a :class:`runner.state.Container` and leave the work to
:mod:`runner.lifecycle`, :mod:`runner.execute` and :mod:`runner.diff`."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.commands import run_options
from lamina.errors import ContainerError, ContainerNotFound, LaminaError, UsageError
from lamina.layout import Layout
from lamina.timeparse import parse_go_duration, parse_time
from runner import imageconfig
from runner.containerlog import (
    STDERR,
    STDOUT,
    LogLine,
    LogReader,
    format_timestamp,
    last_lines,
    split_lines,
    timestamp_ns,
)
from runner.state import STATUS_CREATED, Container, ContainerStore, now
from runner.tty import check_tty

# runner.lifecycle, runner.sandbox and the store are imported by the handlers that need them, so
# that `lamina --help` and every other package's verbs do not pay for them.
if TYPE_CHECKING:
    from lamina.lazy.images import LazyImage
    from lamina.store import Image, Store
    from unionfs.core.stack import LayerStack


_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")  # docker's rule


def _add_container_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin attached")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", help="the container's name")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]", help="set a variable")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE", help="read variables from FILE")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="user[:group] by name or number")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:CTR[:ro]",
                   help="bind-mount a host path or mount a named volume (CTR alone: an anonymous volume)")
    p.add_argument("--tmpfs", action="append", default=[], metavar="PATH[:OPTIONS]",
                   help="mount a tmpfs on PATH (OPTIONS as mount -t tmpfs -o, e.g. size=64m,mode=1777)")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="[[IP:]HOST:]CTR[/PROTO]",
                   help="publish a container port on the host (a random host port when none is given)")
    p.add_argument("--entrypoint", help="override the image's ENTRYPOINT (and drop its CMD)")
    p.add_argument("--init", action="store_true", help="run a reaper as PID 1 that forwards signals")
    p.add_argument("--hostname", help="the container's host name (default: its short id)")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--network", "--net", default="slirp", help="bridge/slirp4netns (default), host or none")
    p.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                   help="seccomp=unconfined turns off the default seccomp filter")
    p.add_argument("--pull", choices=["missing", "always", "never"], default="missing",
                   help="pull the image from its registry: when missing (default), always, or never")
    p.add_argument("--lazy", action="store_true", default=True,
                   help="run an eStargz image from its registry before it is pulled (default true; "
                        "--lazy=false pulls it first)")
    run_options.add_flags(p)
    p.add_argument("image", help="image reference or id")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (replace CMD)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the container verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("run", help="run a command in a new container")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    p.add_argument("--detach-keys", help='with -it: the keys that detach (default "ctrl-p,ctrl-q")')
    _add_container_flags(p)
    p.set_defaults(handler=cmd_run)

    p = subparsers.add_parser("create", help="create a container without starting it")
    _add_container_flags(p)
    p.set_defaults(handler=cmd_create)

    p = subparsers.add_parser("start", help="start stopped containers")
    p.add_argument("-a", "--attach", action="store_true", help="attach output and wait (one container)")
    p.add_argument("-i", "--interactive", action="store_true", help="attach stdin (a -t container's terminal)")
    p.add_argument("--detach-keys", help='the keys that detach (default "ctrl-p,ctrl-q")')
    p.add_argument("containers", nargs="+")
    p.set_defaults(handler=cmd_start)

    for verb, helptext in (("stop", "stop running containers"), ("restart", "restart containers")):
        p = subparsers.add_parser(verb, help=helptext)
        p.add_argument("-t", "--time", "--timeout", type=int, default=None,
                       help="seconds before SIGKILL (default: the container's --stop-timeout, else 10)")
        p.add_argument("containers", nargs="+")
        p.set_defaults(handler=cmd_stop if verb == "stop" else cmd_restart)

    p = subparsers.add_parser("kill", help="send a signal to running containers")
    p.add_argument("-s", "--signal", default="SIGKILL")
    p.add_argument("containers", nargs="+")
    p.set_defaults(handler=cmd_kill)

    p = subparsers.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill running containers first")
    p.add_argument("-v", "--volumes", action="store_true", help="remove the containers' anonymous volumes too")
    p.add_argument("containers", nargs="+")
    p.set_defaults(handler=cmd_rm)

    p = subparsers.add_parser("wait", help="wait until containers stop, print their exit codes")
    p.add_argument("containers", nargs="+")
    p.set_defaults(handler=cmd_wait)

    p = subparsers.add_parser("container prune", help="remove every stopped container")
    p.add_argument("-f", "--force", action="store_true", help="do not ask (lamina never asks)")
    p.set_defaults(handler=cmd_container_prune)
    _register_inspection(subparsers)


def _register_inspection(subparsers: argparse._SubParsersAction) -> None:
    """The verbs that look into containers or take something out of them."""
    p = subparsers.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="id=, name=, label=, status=, exited=, ancestor=, before=, since= (docker's ps filters)")
    p.add_argument("-n", "--last", type=int, default=-1, metavar="N",
                   help="the N containers created last, in any state")
    p.add_argument("-l", "--latest", action="store_true", help="the container created last, in any state")
    p.add_argument("-s", "--size", action="store_true", help="show the size of each container's layer")
    p.add_argument("--no-trunc", action="store_true", help="full ids and commands")
    p.add_argument("--format", help="Go-template per container ({{.ID}} {{.Names}} {{.Image}} {{.Command}} "
                                    "{{.Status}} {{.Ports}} {{.State}} {{.CreatedAt}}), or json")
    p.set_defaults(handler=cmd_ps)

    p = subparsers.add_parser("port", help="list a container's published ports")
    p.add_argument("container")
    p.set_defaults(handler=cmd_port)

    p = subparsers.add_parser("logs", help="show a container's output (stdout on stdout, stderr on stderr)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until it exits")
    p.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    p.add_argument("--since", metavar="TIME", help="lines from TIME on: RFC 3339 (2006-01-02T15:04:05Z), "
                                                   "Unix seconds, or a duration ago (10m)")
    p.add_argument("--until", metavar="TIME", help="lines up to TIME (the same forms as --since)")
    p.add_argument("-n", "--tail", default="all", metavar="N", help='only the last N lines (default "all")')
    p.add_argument("container")
    p.set_defaults(handler=cmd_logs)

    p = subparsers.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-u", "--user")
    p.add_argument("-w", "--workdir")
    p.add_argument("--detach-keys", help='with -it: the keys that detach, leaving the command running '
                                         '(default "ctrl-p,ctrl-q")')
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_exec)

    p = subparsers.add_parser("diff", help="list a container's changed files (A/C/D)")
    p.add_argument("container")
    p.set_defaults(handler=cmd_diff)


# --- run / create ----------------------------------------------------------------------------------


def _new_container(args: argparse.Namespace) -> Container:
    from lamina.application import open_store
    from runner.network import normalize_network, parse_port

    store = open_store(args.layout)
    image = _image_for_run(store, args.image, args.pull, args.lazy)
    cfg: dict[str, Any] = image.config.get("config") or {}
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.name is not None and not _NAME_RE.match(args.name):
        raise UsageError(f"--name {args.name!r}: invalid container name, only [a-zA-Z0-9][a-zA-Z0-9_.-] "
                         "are allowed")
    network = run_options.resolve_network(args, args.layout, normalize_network(args.network))
    ports = [parse_port(p) for p in args.publish]
    if ports and network == "host":
        print("WARNING: Published ports are discarded when using host network mode", file=sys.stderr)
        ports = []
    if ports and network == "none":
        raise UsageError("-p: ports cannot be published with --network none")
    fields, plans = run_options.container_fields(args, args.layout, cfg)
    fields.setdefault("stop_signal", imageconfig.stop_signal(cfg))
    env = imageconfig.container_env(cfg, args.env_file, args.env)
    _refuse_nul(args.image, cfg)
    entrypoint, cmd = imageconfig.run_entrypoint_and_cmd(cfg, command, args.entrypoint)
    container = Container(
        id="", name=args.name or "", image=args.image, image_id=image.id, created=now(),
        argv=imageconfig.container_argv(cfg, command, args.entrypoint), env=env,
        workdir=imageconfig.container_workdir(cfg, args.workdir),
        user=imageconfig.container_user(cfg, args.user), hostname=args.hostname or "", network=network,
        ports=[p.to_json() for p in ports], tty=args.tty,
        interactive=args.interactive, init=args.init, readonly=args.read_only, auto_remove=args.rm,
        entrypoint=entrypoint, cmd=cmd, **fields,
    )
    run_options.check_cidfile(args.cidfile)
    container.mounts, container.anonymous_volumes = run_options.make_volumes(args.layout, plans)
    try:
        container = ContainerStore(args.layout).create(container)
    except BaseException:
        run_options.discard_volumes(args.layout, container.anonymous_volumes)
        raise
    run_options.write_cidfile(args.cidfile, container.id)
    return container


def _refuse_nul(reference: str, cfg: dict[str, Any]) -> None:
    """A NUL byte cannot reach execve or a path: refuse such an image config in one line."""
    def has_nul(value: object) -> bool:
        if isinstance(value, str):
            return "\0" in value
        if isinstance(value, dict):
            return any(has_nul(k) or has_nul(v) for k, v in value.items())
        if isinstance(value, list):
            return any(has_nul(v) for v in value)
        return False

    for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "Volumes"):
        if has_nul(cfg.get(key)):
            raise ContainerError(f"image {reference}: its config {key} contains a NUL byte")


def _image_for_run(store: Store, reference: str, policy: str, lazy: bool = True) -> Image | LazyImage:
    """The image to run; pulled from its registry as docker does (``--pull``), or recorded to be
    run lazily when it is an eStargz image and ``lazy`` (:mod:`lamina.lazy.images`)."""
    from lamina.errors import ImageNotFound
    from lamina.lazy import images as lazy_images

    if policy != "always":
        try:
            return store.resolve_image(reference)
        except ImageNotFound:
            if lazy:
                with contextlib.suppress(ImageNotFound):
                    return lazy_images.find(store.layout, reference)
                with contextlib.suppress(ImageNotFound):  # filled between the two lookups
                    return store.resolve_image(reference)
            if policy == "never":
                raise
            print(f"Unable to find image '{reference}' locally", file=sys.stderr)
    from lamina.store.transfer import pull

    try:
        if lazy:
            found = lazy_images.fetch_lazy(store.layout, reference)
            if found is not None:
                return found
        # Progress redraws lines with terminal escapes: only on a terminal.
        image = pull(store, reference, progress_stream=sys.stderr if sys.stderr.isatty() else None)
    except LaminaError as e:
        if policy == "always":
            raise
        raise ImageNotFound(f"{reference} (not in the store, and pulling it failed: {e})") from e
    lazy_images.remove(store.layout, image.id)  # pulled whole: no longer lazy
    return image


def cmd_run(args: argparse.Namespace) -> int:
    from runner import unionserver
    from runner.lifecycle import run_attached, start_detached

    if not args.detach:
        check_tty(args.interactive, args.tty)
    attach_terminal = args.interactive and args.tty and not args.detach
    if attach_terminal or args.detach_keys:
        from lamina.commands.container_verbs import detach_keys, start_and_attach

        keys = detach_keys(args)  # refused before anything is made
    if args.detach or attach_terminal:
        unionserver.discard()  # a daemonised monitor starts its own
    else:
        # Fork the union server now (if the command line hook has not already): its imports then
        # overlap with the image lookup and the container's creation.
        unionserver.prefork()
    try:
        container = _new_container(args)
    except BaseException:
        unionserver.discard()
        raise
    if args.detach:
        start_detached(args.layout, container)
        print(container.id)
        return 0
    if attach_terminal:  # under a monitor, so that the detach keys leave it running
        return start_and_attach(args, container, keys, interactive=True)
    return run_attached(args.layout, container)


def cmd_create(args: argparse.Namespace) -> int:
    container = _new_container(args)
    print(container.id)
    return 0


# --- lifecycle ---------------------------------------------------------------------------------------


def _each(args: argparse.Namespace, action: Callable[[ContainerStore, Container], None],
          missing_is_fine: bool = False) -> int:
    """Apply ``action`` to every named container; as docker, a failure is reported, the rest go on,
    and the command exits 1 (a container that does not exist is only reported with
    ``missing_is_fine``: ``rm -f``)."""
    store = ContainerStore(args.layout)
    failed = 0
    for name in args.containers:
        try:
            action(store, store.get(name))
            print(name)
        except LaminaError as e:
            print(f"lamina: error: {e}", file=sys.stderr)
            if not (missing_is_fine and isinstance(e, ContainerNotFound)):
                failed = 1
    return failed


def cmd_start(args: argparse.Namespace) -> int:
    from runner.lifecycle import run_attached, start_detached

    if args.attach:
        if len(args.containers) != 1:
            raise UsageError("start -a: exactly one container")
        container = ContainerStore(args.layout).get(args.containers[0])
        if container.running:
            raise ContainerError(f"container {container.name} is already running")
        if container.tty:
            from lamina.commands.container_verbs import detach_keys, start_and_attach

            interactive = args.interactive and container.interactive
            check_tty(interactive, True)
            return start_and_attach(args, container, detach_keys(args), interactive)
        return run_attached(args.layout, container)

    def start(store: ContainerStore, c: Container) -> None:
        if not c.running:
            start_detached(args.layout, c)

    return _each(args, start)


def _stop_timeout(args: argparse.Namespace, c: Container) -> float:
    """``stop -t`` wins over the container's ``--stop-timeout``; -1 waits for ever, as docker."""
    seconds = args.time if args.time is not None else c.stop_timeout if c.stop_timeout is not None else 10
    return float("inf") if seconds < 0 else float(seconds)


def cmd_stop(args: argparse.Namespace) -> int:
    from runner.lifecycle import stop

    return _each(args, lambda store, c: stop(store, c, _stop_timeout(args, c)))


def cmd_restart(args: argparse.Namespace) -> int:
    from runner.lifecycle import start_detached, stop

    def restart(store: ContainerStore, c: Container) -> None:
        stop(store, c, _stop_timeout(args, c))
        start_detached(args.layout, store.get(c.id))

    return _each(args, restart)


def cmd_kill(args: argparse.Namespace) -> int:
    from runner.lifecycle import mark_stopped_by_user, signal_container

    sig = imageconfig.parse_signal(args.signal)

    def kill(store: ContainerStore, c: Container) -> None:
        mark_stopped_by_user(c)
        signal_container(c, sig)

    return _each(args, kill)


def cmd_rm(args: argparse.Namespace) -> int:
    from runner.lifecycle import remove, signal_container, wait_stopped

    def rm(store: ContainerStore, c: Container) -> None:
        if c.running:
            if not args.force:
                raise ContainerError(f"cannot remove running container {c.name}: stop it first or use -f")
            signal_container(c, signal.SIGKILL)
            if not wait_stopped(store, c, 10):
                raise ContainerError(f"container {c.name} did not stop")
        remove(args.layout, c, volumes=args.volumes)

    # docker's `rm -f` reports a container that does not exist, and succeeds.
    return _each(args, rm, missing_is_fine=args.force)


def prune_containers(layout: Layout) -> tuple[list[str], int]:
    """Remove every container that is not running: their IDs, and the bytes their layers held."""
    from lamina.commands.system import disk_usage
    from runner.lifecycle import remove

    removed, freed = [], 0
    for c in ContainerStore(layout).all():
        if not c.running:
            freed += disk_usage(c.upper)
            remove(layout, c)
            removed.append(c.id)
    return removed, freed


def cmd_container_prune(args: argparse.Namespace) -> int:
    """docker's ``container prune``: "Deleted Containers:", their IDs, then the total."""
    from lamina.store.progress import human_size

    removed, freed = prune_containers(args.layout)
    if removed:
        print("Deleted Containers:")
        print("\n".join(removed))
        print()
    print(f"Total reclaimed space: {human_size(freed)}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    store = ContainerStore(args.layout)
    containers = [store.get(name) for name in args.containers]
    for c in containers:
        while c.running:
            time.sleep(0.05)
            c = store.get(c.id)
        print(c.state.exit_code if c.state.exit_code is not None else 0)
    return 0


def _published(c: Container) -> list[dict[str, Any]]:
    """The ports as published at the last start (``-p CTR`` has its random host port there)."""
    return c.state.ports if c.state.ports else c.ports


def cmd_port(args: argparse.Namespace) -> int:
    container = ContainerStore(args.layout).get(args.container)
    for p in _published(container):
        print(f"{p['container_port']}/{p['proto']} -> {p['host_ip']}:{p['host_port']}")
    return 0


# --- ps / logs ----------------------------------------------------------------------------------------


def _ago(when: dt.datetime | None) -> str:
    if when is None:
        return ""
    seconds = max(0, int((dt.datetime.now(dt.UTC) - when).total_seconds()))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return "Less than a second" if seconds < 1 else f"{seconds} second{'s' if seconds > 1 else ''}"


def _health_suffix(c: Container) -> str:
    """docker's " (healthy)", " (unhealthy)", " (health: starting)"."""
    if c.healthcheck is None:
        return ""
    from runner.health import read_health

    status = (read_health(c.directory) or {}).get("Status", "starting")
    return " (health: starting)" if status == "starting" else f" ({status})"


def _status(c: Container) -> str:
    if c.state.status == STATUS_CREATED:
        return "Created"
    if c.running:
        paused = " (Paused)" if c.state.paused else ""
        return f"Up {_ago(parse_time(c.state.started_at))}{paused}{_health_suffix(c)}"
    return f"Exited ({c.state.exit_code}) {_ago(parse_time(c.state.finished_at))} ago"


def _ps_filter(layout: Layout, texts: list[str], containers: list[Container]) -> Callable[[Container], bool]:
    from lamina.commands.filters import container_filter

    if not texts:
        return lambda c: True
    from lamina.application import open_store
    from lamina.errors import ImageNotFound

    store = open_store(layout)

    def image_of(image_id: str) -> Image | None:
        try:
            return store.resolve_image(image_id)
        except ImageNotFound:
            return None

    return container_filter(texts, containers, store.resolve_image, image_of)


def _ps_size(c: Container) -> str:
    """docker's SIZE cell: the container layer's bytes, then the image's under "virtual"."""
    from lamina.application import open_store
    from lamina.commands.system import disk_usage
    from lamina.errors import ImageNotFound
    from lamina.store.progress import human_size

    own = disk_usage(c.upper)
    try:
        image_size = open_store(c.directory.parent.parent).resolve_image(c.image_id).size
    except ImageNotFound:
        image_size = 0
    return f"{human_size(own)} (virtual {human_size(own + image_size)})"


def _ps_row(c: Container, no_trunc: bool) -> dict[str, str]:
    command = shlex.join(c.argv)
    if len(command) > 20 and not no_trunc:
        command = command[:19] + "…"
    ports = ", ".join(f"{p['host_ip']}:{p['host_port']}->{p['container_port']}/{p['proto']}" for p in _published(c))
    return {"ID": c.id if no_trunc else c.short_id, "Image": c.image, "Command": f'"{command}"',
            "CreatedAt": c.created, "RunningFor": f"{_ago(parse_time(c.created))} ago", "Status": _status(c),
            "State": c.state.status, "Ports": ports if c.running else "", "Names": c.name}


def cmd_ps(args: argparse.Namespace) -> int:
    from lamina.commands.formatting import format_kind, precheck_format

    if args.format:
        from lamina.commands.ps_format import empty_ps_context

        precheck_format(args.format, empty_ps_context())  # before any output, as docker does
    every = ContainerStore(args.layout).all()  # newest first
    wanted = _ps_filter(args.layout, args.filter, every)
    last = 1 if args.latest else args.last
    # As docker's daemon: -n, -l and the status, before and since filters show stopped containers
    # too; the other filters look only at running ones unless -a.
    shown_all = args.all or last > 0 or any(f.startswith(("status=", "before=", "since=")) for f in args.filter)
    containers = [c for c in every if (shown_all or c.running) and wanted(c)]
    if last > 0:
        containers = containers[:last]
    rows = [_ps_row(c, args.no_trunc) for c in containers]
    if args.size:
        for row, c in zip(rows, containers, strict=True):
            row["Size"] = _ps_size(c)
    if args.quiet:
        for row in rows:
            print(row["ID"])
        return 0
    if format_kind(args.format) != "default":
        from lamina.commands.formatting import render_rows
        from lamina.commands.ps_format import PS_HEADER, ps_context

        sys.stdout.write(render_rows(args.format, [ps_context(c, r) for c, r in zip(containers, rows, strict=True)],
                                     PS_HEADER))
        return 0
    size = ("SIZE",) if args.size else ()
    table = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES", *size)]
    table += [(r["ID"], r["Image"], r["Command"], r["RunningFor"], r["Status"], r["Ports"], r["Names"],
               *((r["Size"],) if args.size else ())) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return 0


_UNIX_TIME = re.compile(r"(\d+)(?:\.(\d{1,9}))?")


def log_time_ns(flag: str, value: str, now_ns: int) -> int:
    """``logs --since/--until TIME`` in nanoseconds since the epoch, read as docker reads it: a Go
    duration (``10m``, ``1h30m``, ``-5s``) counts back from now, a value with a ``-`` is an RFC 3339
    date or time (local without a zone), anything else Unix seconds with an optional fraction."""
    sign, number = (-1, value[1:]) if value.startswith("-") else (1, value.removeprefix("+"))
    if number != "0":  # "0" alone is the epoch (below), not a zero duration
        try:
            return now_ns - sign * parse_go_duration(number)
        except ValueError:
            pass
    try:
        if "-" in value:
            return timestamp_ns(value)
        match = _UNIX_TIME.fullmatch(value)
        if match is None:
            raise ValueError(value)
        return int(match[1]) * 1_000_000_000 + int((match[2] or "0").ljust(9, "0"))
    except ValueError:
        raise UsageError(f"{flag} {value}: expected a time (RFC 3339 such as 2006-01-02T15:04:05Z, "
                         "or Unix seconds) or a duration such as 10m") from None


def _tail_count(value: str) -> int | None:
    """``--tail``: None for all ("all" or a negative number, as docker). Anything else that is not a
    number is refused, as podman does: docker's daemon silently shows everything for ``-n abc``."""
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        raise UsageError(f"logs: --tail {value!r}: expected a number of lines or \"all\"") from None
    return count if count >= 0 else None


def _print_log_lines(lines: list[LogLine], since: int | None, until: int | None, timestamps: bool) -> None:
    """Each stream on its own descriptor, flushed at every switch so that a terminal showing both
    shows them in the order they were written."""
    outputs = {STDOUT: sys.stdout.buffer, STDERR: sys.stderr.buffer}
    previous = None
    for line in lines:
        if (since is not None and line.time_ns < since) or (until is not None and line.time_ns > until):
            continue
        out = outputs[line.stream]
        if previous is not None and previous is not out:
            previous.flush()
        previous = out
        if timestamps and not line.continues:
            out.write(format_timestamp(line.time_ns).encode() + b" ")
        out.write(line.data)
    for out in outputs.values():
        out.flush()


def _still_running(store: ContainerStore, container_id: str) -> bool:
    try:
        return store.get(container_id).running
    except ContainerNotFound:  # run -d --rm: it is gone with its directory, the open log still reads
        return False


def cmd_logs(args: argparse.Namespace) -> int:
    now_ns = time.time_ns()
    since = log_time_ns("--since", args.since, now_ns) if args.since else None
    until = log_time_ns("--until", args.until, now_ns) if args.until else None
    tail = _tail_count(args.tail)
    store = ContainerStore(args.layout)
    container = store.get(args.container)
    open_lines: dict[str, int] = {}  # carried across reads when following
    with contextlib.closing(LogReader(container.log_path)) as reader:
        if tail is None:
            for records in reader.read_all():
                _print_log_lines(split_lines(records, open_lines), since, until, args.timestamps)
        else:
            # Only the last lines stay in memory, however long the log is.
            kept: list[LogLine] = []
            for records in reader.read_all():
                kept = last_lines(kept + split_lines(records, open_lines), tail)
            _print_log_lines(kept, since, until, args.timestamps)
        while args.follow and (until is None or time.time_ns() <= until):
            # Asked before reading: once the monitor has recorded the exit, it has written everything.
            running = _still_running(store, container.id)
            for records in reader.read_all():
                _print_log_lines(split_lines(records, open_lines), since, until, args.timestamps)
            if not running:
                break
            time.sleep(0.1)
    return 0


# --- exec / commit / diff -----------------------------------------------------------------------------


def cmd_exec(args: argparse.Namespace) -> int:
    from runner.execute import exec_in_container

    container = ContainerStore(args.layout).get(args.container)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("exec: no command given")
    check_tty(args.interactive, args.tty)
    from lamina.commands.container_verbs import detach_keys

    keys = detach_keys(args)  # refused before anything runs, with or without a terminal
    if container.running and container.state.paused:
        raise ContainerError(f"Container {container.name} is paused, unpause the container before exec")
    env = dict(container.env)
    env.update(imageconfig.container_env({}, [], args.env))
    workdir = args.workdir or container.workdir
    if not workdir.startswith("/"):
        raise UsageError(f"-w {workdir}: the working directory must be an absolute path")
    if not container.running:
        raise ContainerError(f"container {container.name} is not running")
    try:
        return exec_in_container(container, command, env, args.user or container.user, workdir,
                                 args.tty, args.interactive, keys)
    except ContainerError as e:
        # docker's daemon gives an exec that could not start (working directory, user) 126.
        from lamina.errors import CommandNotInvokable

        raise CommandNotInvokable(str(e)) from e


def _changes(upper: Path, lowers: LayerStack) -> list[tuple[str, str]]:
    from runner.diff import changes

    return changes(upper, lowers)


def cmd_diff(args: argparse.Namespace) -> int:
    from lamina.lazy.lower import image_lowers
    from runner.sandbox import call_in_userns

    container = ContainerStore(args.layout).get(args.container)
    lowers = image_lowers(args.layout, container.image_id)
    for kind, path in call_in_userns(_changes, container.upper, lowers):
        print(f"{kind} {path}")
    return 0



