"""The inspector's verbs, ``which``, ``layers``, ``mount`` and ``umount``: their parsers.

Only the parsers live here: every ``lamina`` command builds them, so the work (store, analysis,
mounts) is imported by :mod:`lamina.commands.inspector_verbs` when one of these verbs actually runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("which", help="which layer provides a path, what it shadows, who deleted it")
    p.add_argument("image", metavar="IMAGE|CONTAINER")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(handler=_which)

    p = subparsers.add_parser("layers", help="per layer: instruction, size, added/changed/deleted, waste")
    p.add_argument("image", metavar="IMAGE|CONTAINER",
                   help="an image, or a container (its container layer is shown on top)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--html", metavar="FILE", type=Path, help="also write a self-contained HTML picture")
    out.add_argument("--svg", metavar="FILE", type=Path, help="also write the picture as an SVG file")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--tree", action="store_true",
                   help="print a layer's file tree: the merged view up to it, its changes marked A/M/D")
    p.add_argument("--layer", metavar="N", type=int, help="the layer --tree shows (default: the top one)")
    p.add_argument("--changes-only", action="store_true",
                   help="with --tree: only what the layer changed (without --layer: every layer's changes)")
    p.add_argument("--explore", action="store_true",
                   help="browse the layers and their trees in the terminal (keys: Tab, arrows, c, q)")
    p.add_argument("--wasted", action="store_true",
                   help="list the hidden files, largest first, and dive's inefficient paths")
    p.add_argument("--fail-on-waste", metavar="PERCENT",
                   help="exit 1 when dive's wasted bytes exceed PERCENT of the bytes above the base layer")
    p.add_argument("--fail-on-efficiency", metavar="RATIO",
                   help="exit 1 when dive's image efficiency (0..1) is below RATIO")
    p.set_defaults(handler=_layers)

    p = subparsers.add_parser("mount", help="mount an image or a container's root through unionfs")
    p.add_argument("--rw", action="store_true",
                   help="writable: a scratch upper discarded at umount (image) or the container's upper")
    p.add_argument("--upto", metavar="LAYER",
                   help="mount only layers 1..LAYER (number as in `lamina layers`, or a digest prefix)")
    p.add_argument("--trace", metavar="FILE", type=Path,
                   help="append one line per copy-up, whiteout, opaque directory and redirect to FILE")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users enter the mount (FUSE allow_other; with the kernel checking "
                        "permissions, and setuid bits and device nodes not honoured). Off by default: "
                        "only you can enter")
    p.add_argument("target", metavar="IMAGE|CONTAINER", nargs="?",
                   help="what to mount; without it, list the current lamina mounts")
    p.add_argument("directory", metavar="DIR", nargs="?", type=Path,
                   help="mount point (default: a new directory under ROOT/mounts/)")
    p.set_defaults(handler=_mount)

    p = subparsers.add_parser("umount", help="unmount a `lamina mount` and stop its server")
    p.add_argument("directory", metavar="DIR", type=Path)
    p.add_argument("--lazy", action="store_true", help="detach even if busy (fusermount3 -z)")
    p.set_defaults(handler=_umount)


def _which(args: argparse.Namespace) -> int:
    from lamina.commands.inspector_verbs import cmd_which

    return cmd_which(args)


def _layers(args: argparse.Namespace) -> int:
    from lamina.commands.inspector_verbs import cmd_layers

    return cmd_layers(args)


def _mount(args: argparse.Namespace) -> int:
    from lamina.commands.inspector_verbs import cmd_mount

    return cmd_mount(args)


def _umount(args: argparse.Namespace) -> int:
    from lamina.commands.inspector_verbs import cmd_umount

    return cmd_umount(args)
