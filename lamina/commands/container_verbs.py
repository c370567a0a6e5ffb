"""More container verbs: cp, export, attach, top, rename, pause, unpause, commit.

Handlers parse flags and leave the work to :mod:`runner.container_files` (cp, export),
:mod:`runner.freeze` (pause), :mod:`runner.commit_config` (commit's config) and the store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.errors import ContainerError, ContainerNotFound, LaminaError, UsageError
from lamina.layout import Layout
from runner.state import Container, ContainerStore


class ClientUsageError(UsageError):
    exit_code = 1  # docker's client


class ContainerStateError(ContainerError):
    exit_code = 1  # docker's client


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add these verbs to ``lamina``; each parser sets ``handler(args) -> int``."""
    p = subparsers.add_parser("cp", help="copy files between a container and the host",
                              description="lamina cp [OPTIONS] CONTAINER:SRC_PATH DEST_PATH|-\n"
                                          "lamina cp [OPTIONS] SRC_PATH|- CONTAINER:DEST_PATH")
    p.add_argument("-a", "--archive", action="store_true", help="keep the source's uid/gid (into a container)")
    p.add_argument("-L", "--follow-link", action="store_true", help="always follow a symlink in SRC_PATH")
    p.add_argument("-q", "--quiet", action="store_true", help="print no progress (none is printed anyway)")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(handler=cmd_cp)

    p = subparsers.add_parser("attach", help="attach to a running container's terminal or output")
    p.add_argument("--detach-keys", help='the keys that detach (default "ctrl-p,ctrl-q")')
    p.add_argument("--no-stdin", action="store_true", help="do not attach stdin")
    p.add_argument("--sig-proxy", action="store_true", default=True,
                   help="accepted for docker's command lines (a terminal passes signals as keys)")
    p.add_argument("container")
    p.set_defaults(handler=cmd_attach)

    p = subparsers.add_parser("commit", help="make an image from a container's changes and config")
    p.add_argument("-a", "--author", help='the author ("A. Name <a@example.org>")')
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction: CMD, ENTRYPOINT, ENV, EXPOSE, HEALTHCHECK, LABEL, ONBUILD, "
                        "STOPSIGNAL, USER, VOLUME, WORKDIR")
    p.add_argument("-m", "--message", default="", help="the commit message (in the image's history)")
    # A boolean as docker's: `--pause=false` goes through the parser's one rule (lamina.parser).
    p.add_argument("-p", "--pause", action="store_true", default=True,
                   help="pause the container's processes while its layer is read (default true)")
    p.add_argument("container")
    p.add_argument("reference", nargs="?")
    p.set_defaults(handler=cmd_commit)

    p = subparsers.add_parser("top", help="list a container's processes (ps options, default -ef)")
    p.add_argument("container")
    p.add_argument("ps_options", nargs=argparse.REMAINDER, help="options for ps (default -ef)")
    p.set_defaults(handler=cmd_top)

    p = subparsers.add_parser("rename", help="rename a container")
    p.add_argument("container")
    p.add_argument("new_name")
    p.set_defaults(handler=cmd_rename)

    for verb, helptext, handler in (("pause", "hold every process of containers still", cmd_pause),
                                    ("unpause", "let paused containers run again", cmd_unpause)):
        p = subparsers.add_parser(verb, help=helptext)
        p.add_argument("containers", nargs="+")
        p.set_defaults(handler=handler)

    p = subparsers.add_parser("export", help="write a container's filesystem as a tar archive")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")
    p.add_argument("container")
    p.set_defaults(handler=cmd_export)


def detach_keys(args: argparse.Namespace) -> bytes:
    from runner.attach import DEFAULT_DETACH_KEYS, parse_detach_keys

    return parse_detach_keys(getattr(args, "detach_keys", None) or DEFAULT_DETACH_KEYS)


def start_and_attach(args: argparse.Namespace, container: Container, keys: bytes, interactive: bool) -> int:
    """``run -it``, ``start -ai``: start under a monitor, attach this terminal; the container's exit
    code, or 0 when the user detaches (as docker)."""
    from runner.attach import Detached, attach_session
    from runner.lifecycle import start_detached

    start_detached(args.layout, container, hold_output=True)
    try:
        return attach_session(container, keys, interactive, ContainerStore(args.layout))
    except Detached:
        return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from runner.attach import attach_session
    from runner.tty import check_tty

    keys = detach_keys(args)
    store = ContainerStore(args.layout)
    container = store.get(args.container)
    if not container.running:
        raise ContainerStateError("You cannot attach to a stopped container, start it first")
    if not container.tty:
        return _follow_output(store, container)
    interactive = container.interactive and not args.no_stdin
    check_tty(interactive, True)
    return attach_session(container, keys, interactive, store)


def _follow_output(store: ContainerStore, container: Container) -> int:
    """A container without a terminal: its output from now on, each stream on its own descriptor,
    until it exits; its exit code."""
    import time

    from runner.containerlog import STDOUT, LogReader

    outputs = {STDOUT: sys.stdout.buffer}
    with contextlib.closing(LogReader(container.log_path)) as reader:
        for _records in reader.read_all():
            pass  # what it wrote before we attached is for `logs`
        while True:
            running = _still_running(store, container.id)
            for records in reader.read_all():
                for record in records:
                    out = outputs.get(record.stream, sys.stderr.buffer)
                    out.write(record.data)
                    out.flush()
            if not running:
                break
            time.sleep(0.05)
    try:
        code = store.get(container.id).state.exit_code
    except ContainerNotFound:
        return 0
    return code if code is not None else 0


def _still_running(store: ContainerStore, container_id: str) -> bool:
    try:
        return store.get(container_id).running
    except ContainerNotFound:
        return False


def _commit_layer(layout: Layout, upper: Path) -> Any:
    from lamina.store import Store

    return Store.open(layout).commit_layer(upper)


def cmd_commit(args: argparse.Namespace) -> int:
    from lamina.application import open_store
    from lamina.lazy.fill import fill_now
    from runner.commit_config import committed_config
    from runner.freeze import paused
    from runner.sandbox import call_in_userns
    from runner.state import now

    container = ContainerStore(args.layout).get(args.container)
    store = open_store(args.layout)
    fill_now(args.layout, container.image_id)  # a lazy image's layers must be in the store first
    pause = paused(container.state.pid) if args.pause and container.running else contextlib.nullcontext()
    # Shared lock from the new layer to the image that names it: a concurrent prune must not
    # collect the layer in between (shared holders never block each other).
    with store.lock(shared=True):
        base = store.resolve_image(container.image_id)
        config = committed_config(base.config, container, args.change, args.author, args.message, now())
        with pause:
            try:
                layer = _commit_layer(args.layout, container.upper)
            except PermissionError:
                # Directories the container made private under subordinate ids: read them as
                # namespace root.
                layer = call_in_userns(_commit_layer, args.layout, container.upper)
        image = store.create_image([*base.layers, layer], config,
                                   tags=[args.reference] if args.reference else [], base=base)
    print(f"sha256:{image.id}")
    return 0


def _running(container: Container) -> Container:
    if not container.running or not container.state.pid:
        raise ContainerStateError(f"Container {container.name} is not running")
    return container


def cmd_top(args: argparse.Namespace) -> int:
    from runner.freeze import container_pids

    container = _running(ContainerStore(args.layout).get(args.container))
    options = [word for option in args.ps_options for word in option.split()] or ["-ef"]
    result = subprocess.run(["ps", *options], capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else "ps failed"
        raise ContainerStateError(f"ps {' '.join(options)}: {message}")
    for line in top_lines(result.stdout, container_pids(container.state.pid)):
        print(line)
    return 0


def top_lines(ps_output: str, pids: set[int]) -> list[str]:
    """docker's top: the header and the lines of ``ps`` whose PID column is one of ``pids``."""
    lines = ps_output.splitlines()
    if not lines:
        return []
    header = lines[0].split()
    if "PID" not in header:
        raise ContainerStateError("Couldn't find PID field in ps output")
    column = header.index("PID")
    kept = [lines[0]]
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            kept.append(line)
    return kept


def cmd_rename(args: argparse.Namespace) -> int:
    from runner.state import valid_name

    store = ContainerStore(args.layout)
    if not valid_name(args.new_name):
        raise ContainerStateError(f"Invalid container name ({args.new_name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are "
                                  "allowed")
    with store.lock():
        container = store.get(args.container)
        if container.name == args.new_name:
            raise ContainerStateError("Renaming a container with the same name as its current name")
        for other in store.all():
            if other.name == args.new_name:
                raise ContainerStateError(f'Conflict. The container name "/{args.new_name}" is already in use by '
                                          f'container "{other.id}". You have to remove (or rename) that container '
                                          "to be able to reuse that name.")
        container.name = args.new_name
        container.save()
    return 0


def _each_running(args: argparse.Namespace, action: Callable[[ContainerStore, Container], None]) -> int:
    store = ContainerStore(args.layout)
    failed = 0
    for name in args.containers:
        try:
            container = _running(store.get(name))
            with store.lock():
                action(store, store.get(container.id))
            print(name)
        except LaminaError as e:
            print(f"lamina: error: {e}", file=sys.stderr)
            failed = 1
    return failed


def cmd_pause(args: argparse.Namespace) -> int:
    from runner.freeze import pause

    def pause_one(store: ContainerStore, container: Container) -> None:
        if container.state.paused:
            raise ContainerStateError(f"Container {container.name} is already paused")
        container.state.paused = pause(container.state.pid)
        container.save()

    return _each_running(args, pause_one)


def cmd_unpause(args: argparse.Namespace) -> int:
    from runner.freeze import resume

    def unpause_one(store: ContainerStore, container: Container) -> None:
        if not container.state.paused:
            raise ContainerStateError(f"Container {container.name} is not paused")
        resume(container.state.pid, container.state.paused)
        container.state.paused = ""
        container.save()

    return _each_running(args, unpause_one)


def split_copy_argument(arg: str) -> tuple[str, str]:
    """docker's splitCpArg: ("CONTAINER", "PATH") or ("", local path)."""
    if arg.startswith("/"):
        return "", arg
    container, sep, path = arg.partition(":")
    if not sep or container.startswith("."):
        return "", arg
    return container, path


def cmd_cp(args: argparse.Namespace) -> int:
    from runner.container_files import copy_from_container, copy_to_container

    src_container, src = split_copy_argument(args.source)
    dst_container, dst = split_copy_argument(args.destination)
    if not src:
        raise ClientUsageError("source can not be empty")
    if not dst:
        raise ClientUsageError("destination can not be empty")
    if src_container and dst_container:
        raise ClientUsageError("copying between containers is not supported")
    if not src_container and not dst_container:
        raise ClientUsageError("must specify at least one container source")
    store = ContainerStore(args.layout)
    if src_container:
        container = store.get(src_container)
        out = sys.stdout.buffer if dst == "-" else None
        copy_from_container(args.layout, container, src, dst, args.follow_link, out)
    else:
        container = store.get(dst_container)
        archive_in = sys.stdin.buffer if src == "-" else None
        copy_to_container(args.layout, container, src, dst, args.follow_link, args.archive, archive_in)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from runner.container_files import export_container

    container = ContainerStore(args.layout).get(args.container)
    if args.output is None:
        if sys.stdout.isatty():
            raise ClientUsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
        export_container(args.layout, container, sys.stdout.buffer)
        return 0
    tmp = f"{args.output}.lamina-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            export_container(args.layout, container, out)
        os.replace(tmp, args.output)
    except (LaminaError, OSError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return 0
