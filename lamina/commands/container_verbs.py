"""More container verbs: cp, export, top, rename, pause, unpause, commit.

Handlers parse flags and leave the work to :mod:`runner.container_files` (cp, export),
:mod:`runner.freeze` (pause), :mod:`runner.commit_config` (commit's config) and the store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from lamina.errors import LaminaError, UsageError
from runner.state import ContainerStore


class CopyUsageError(UsageError):
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

    p = subparsers.add_parser("export", help="write a container's filesystem as a tar archive")
    p.add_argument("-o", "--output", help="write to a file instead of stdout")
    p.add_argument("container")
    p.set_defaults(handler=cmd_export)


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
        raise CopyUsageError("source can not be empty")
    if not dst:
        raise CopyUsageError("destination can not be empty")
    if src_container and dst_container:
        raise CopyUsageError("copying between containers is not supported")
    if not src_container and not dst_container:
        raise CopyUsageError("must specify at least one container source")
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
            raise UsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
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
