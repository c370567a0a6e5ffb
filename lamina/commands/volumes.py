"""``lamina volume create|ls|inspect|rm|prune``: docker's volume verbs over :mod:`runner.volumes`.

As docker's client, these verbs exit 1 on an error (a missing or busy volume, a bad name); ``run``
reports the same errors with 125.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from lamina.commands.filters import name_matches
from lamina.errors import LaminaError, UsageError
from runner.volumes import Volume, VolumeNotFound, VolumeStore, label_filter

EXIT_CLIENT_ERROR = 1


VERBS = ("create", "ls", "inspect", "rm", "prune")
ALIASES = {"ls": ["list"], "rm": ["remove"]}


def register(subparsers: argparse._SubParsersAction) -> None:
    """``lamina volume VERB``: a ``volume`` parser with one sub-parser a verb."""
    volume = subparsers.add_parser("volume", help="manage volumes")
    verbs = volume.add_subparsers(dest="volume_verb", metavar="COMMAND", required=True)
    add_verbs(lambda verb, help_text: verbs.add_parser(verb, aliases=ALIASES.get(verb, []), help=help_text))


def register_grouped(subparsers: argparse._SubParsersAction) -> None:
    """The same verbs registered as ``"volume VERB"`` top-level names, for a command line that builds
    docker's command groups itself from such names."""
    add_verbs(lambda verb, help_text: subparsers.add_parser(f"volume {verb}", help=help_text))


def add_verbs(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("create", "create a volume")
    p.add_argument("name", nargs="?", help="the volume's name (default: a random one)")
    p.add_argument("-d", "--driver", default="local", help="local (the only driver)")
    p.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-o", "--opt", action="append", default=[], metavar="KEY=VALUE", help="driver options")
    p.set_defaults(handler=cmd_volume_create)

    p = add("ls", "list volumes")
    p.add_argument("-q", "--quiet", action="store_true", help="only names")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="dangling=true|false, name=, label=KEY[=VALUE], driver=local")
    p.add_argument("--format", help="Go template per volume ({{.Name}} {{.Driver}} {{.Mountpoint}}), or json")
    p.set_defaults(handler=cmd_volume_ls)

    p = add("inspect", "show volumes as JSON")
    p.add_argument("-f", "--format", help="Go template per volume")
    p.add_argument("names", nargs="+")
    p.set_defaults(handler=cmd_volume_inspect)

    p = add("rm", "remove volumes")
    p.add_argument("-f", "--force", action="store_true", help="no error for a missing volume")
    p.add_argument("names", nargs="+")
    p.set_defaults(handler=cmd_volume_rm)

    p = add("prune", "remove anonymous volumes no container uses")
    p.add_argument("-a", "--all", action="store_true", help="named volumes too")
    p.add_argument("-f", "--force", action="store_true", help="do not ask")
    p.add_argument("--filter", action="append", default=[], metavar="label=KEY[=VALUE]")
    p.set_defaults(handler=cmd_volume_prune)


def _client_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """docker's client exits 1 when the daemon refuses; a bad command line stays 125."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except UsageError:
            raise
        except LaminaError as e:
            e.exit_code = EXIT_CLIENT_ERROR
            raise

    return run


def _labels(entries: list[str], flag: str) -> dict[str, str]:
    labels = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        if not key:
            raise UsageError(f"{flag} {entry}: empty label name")
        labels[key] = value
    return labels


@_client_errors
def cmd_volume_create(args: argparse.Namespace) -> int:
    if args.driver != "local":
        raise UsageError(f"--driver {args.driver}: only the local driver is available")
    volume = VolumeStore(args.layout).create(args.name, labels=_labels(args.label, "--label"),
                                             options=_labels(args.opt, "--opt"))
    print(volume.name)
    return 0


def _filters(filters: list[str], in_use: set[str]) -> Callable[[Volume], bool]:
    """docker's volume filters: values of one key are alternatives (``name`` a regular expression,
    as its daemon's ``filters.Args.Match``), every ``label`` and ``dangling`` must hold."""
    grouped: dict[str, list[str]] = {}
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep:
            raise UsageError(f"--filter {text}: expected KEY=VALUE")
        if key not in ("dangling", "name", "label", "driver"):
            raise UsageError(f"--filter {text}: invalid filter '{key}'")
        if key == "dangling" and value.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"--filter {text}: invalid filter 'dangling={value}'")
        grouped.setdefault(key, []).append(value)
    dangling = [value.lower() in ("true", "1") for value in grouped.get("dangling", [])]

    def wanted(v: Volume) -> bool:
        if not all((v.name not in in_use) == d for d in dangling):
            return False
        if "name" in grouped and not name_matches(grouped["name"], v.name):
            return False
        if "driver" in grouped and "local" not in grouped["driver"]:
            return False
        return all(label_filter(v.labels, s) for s in grouped.get("label", []))

    return wanted


def _row(volume: Volume) -> dict[str, str]:
    labels = ",".join(f"{k}={v}" for k, v in volume.labels.items())
    return {"Name": volume.name, "Driver": "local", "Scope": "local", "Mountpoint": str(volume.data),
            "Labels": labels, "Links": "N/A", "Size": "N/A", "CreatedAt": volume.created}


def _render(template: str, row: dict[str, object]) -> str:
    from lamina.commands.formatting import render_template

    return render_template(template, row)


@_client_errors
def cmd_volume_ls(args: argparse.Namespace) -> int:
    store = VolumeStore(args.layout)
    wanted = _filters(args.filter, set(store.users()))
    volumes = [v for v in store.all() if wanted(v)]
    if args.quiet:
        for v in volumes:
            print(v.name)
        return 0
    if args.format:
        for v in volumes:
            row = _row(v)
            print(json.dumps(row) if args.format == "json" else _render(args.format, dict(row)))
        return 0
    print(f"{'DRIVER':<10}VOLUME NAME")
    for v in volumes:
        print(f"{'local':<10}{v.name}")
    return 0


@_client_errors
def cmd_volume_inspect(args: argparse.Namespace) -> int:
    store = VolumeStore(args.layout)
    found, failed = [], 0
    for name in args.names:
        try:
            found.append(store.get(name).inspect())
        except VolumeNotFound:
            print(f"Error: No such volume: {name}", file=sys.stderr)  # docker's words
            failed = EXIT_CLIENT_ERROR
    if args.format:
        for item in found:
            print(_render(args.format, item))
    else:
        print(json.dumps(found, indent=4))
    return failed


@_client_errors
def cmd_volume_rm(args: argparse.Namespace) -> int:
    store = VolumeStore(args.layout)
    failed = 0
    for name in args.names:
        try:
            store.remove(name, force=args.force)
            print(name)
        except LaminaError as e:
            print(f"Error response from daemon: {e}", file=sys.stderr)
            failed = EXIT_CLIENT_ERROR
    return failed


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.4g}{unit}"
        value /= 1000
    return f"{size}B"


@_client_errors
def cmd_volume_prune(args: argparse.Namespace) -> int:
    labels = []
    for text in args.filter:
        key, _, value = text.partition("=")
        if key != "label" or not value:
            raise UsageError(f"--filter {text}: only label=KEY[=VALUE] filters prune")
        labels.append(value)
    if not args.force:
        what = "all local volumes" if args.all else "anonymous local volumes"
        print(f"WARNING! This will remove {what} not used by at least one container.\n"
              "Are you sure you want to continue? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline(64).strip().lower()
        if answer not in ("y", "yes"):
            return 0
    removed, freed = VolumeStore(args.layout).prune(include_named=args.all, labels=labels)
    if removed:
        print("Deleted Volumes:")
        for name in removed:
            print(name)
        print()
    print(f"Total reclaimed space: {_human_size(freed)}")
    return 0
