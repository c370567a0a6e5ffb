"""``lamina build``: the command line of the builder.

Imports are deferred to the handler so that ``lamina --help`` and every other verb stay fast, and a
cached rebuild pays only for what it uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.bounded import TEXT_LIMIT, read_at_most, read_file_at_most
from lamina.errors import UsageError

if TYPE_CHECKING:
    from builder.build import BuildOptions


def _key_value(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not key:
        raise UsageError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value if sep else ""


def _ulimit(text: str) -> tuple[str, int, int]:
    """``--ulimit NAME=SOFT[:HARD]`` as run's, refused while the flags are parsed (docker's 125)."""
    from runner.runflags import parse_ulimit

    try:
        limit = parse_ulimit(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--ulimit {text}: ")) from None
    return limit["Name"], limit["Soft"], limit["Hard"]


def _read_dockerfile(args: argparse.Namespace, context: Path) -> tuple[str, Path | None, str]:
    """(text, path or None for stdin, name used in messages)."""
    if args.file == "-":
        data = read_at_most(sys.stdin.buffer, TEXT_LIMIT, "Dockerfile from standard input")
        return data.decode("utf-8", "surrogateescape"), None, "Dockerfile"
    if args.file:
        path = Path(args.file)
        if not path.is_absolute() and not path.exists():
            # docker resolves -f relative to the current directory; accept context-relative too.
            path = context / args.file
    else:
        path = context / "Dockerfile"
        if not path.exists() and (context / "Containerfile").exists():
            path = context / "Containerfile"
    try:
        text = read_file_at_most(str(path), TEXT_LIMIT).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        raise UsageError(f"no Dockerfile found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"-f {path}: is a directory") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return text, path, args.file if args.file and args.file != "-" else path.name


def _options(args: argparse.Namespace, context: Path, stdin_dockerfile: str | None) -> BuildOptions:
    """The build the command line asks for; every flag is checked before anything runs."""
    from builder.build import BuildOptions
    from builder.registry_cache import parse_cache_from, parse_cache_to
    from builder.session import Session, parse_secret, parse_ssh
    from lamina.store import Reference

    for tag in args.tag:
        Reference.parse(tag)  # a bad -t fails before anything runs
    build_args: dict[str, str] = {}
    for item in args.build_arg:
        key, value = _key_value("--build-arg", item)
        if "=" not in item:
            # docker: `--build-arg NAME` takes the value from the environment.
            if key not in os.environ:
                continue
            value = os.environ[key]
        build_args[key] = value
    if "SOURCE_DATE_EPOCH" not in build_args and os.environ.get("SOURCE_DATE_EPOCH"):
        # As docker buildx does: the environment's SOURCE_DATE_EPOCH becomes the build-arg.
        build_args["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
    if args.platform:
        from builder.variables import foreign_platform

        for requested in args.platform.split(","):
            if (problem := foreign_platform(requested)) is not None:
                raise UsageError(f"--platform: {problem}")
    labels = dict(_key_value("--label", item) for item in args.label)
    session = Session(secrets=dict(parse_secret(item, dict(os.environ)) for item in args.secret),
                      agents=dict(parse_ssh(item, dict(os.environ)) for item in args.ssh))
    cache_from = [parse_cache_from(item) for item in args.cache_from]
    cache_to = [parse_cache_to(item) for item in args.cache_to]
    if stdin_dockerfile is not None:
        text, path, name = stdin_dockerfile, None, "Dockerfile"
    else:
        text, path, name = _read_dockerfile(args, context)
    return BuildOptions(context=context, dockerfile_text=text, dockerfile_path=path, dockerfile_name=name,
                        tags=list(args.tag), build_args=build_args, target=args.target,
                        no_cache=args.no_cache, pull=args.pull, labels=labels,
                        quiet=args.quiet or args.progress == "quiet", session=session,
                        cache_from=cache_from, cache_to=cache_to, network=args.network, ulimits=tuple(args.ulimit))


def cmd_build(args: argparse.Namespace) -> int:
    from builder.build import build
    from builder.output_export import parse_output, write_output
    from lamina.application import open_store

    outputs = [parse_output(item) for item in args.output]
    to_stdout = any(spec.dest == "-" for spec in outputs)
    if args.context == "-" and args.file == "-":
        raise UsageError("cannot read both the build context and the Dockerfile from standard input")
    if args.context != "-" and not Path(args.context).is_dir():
        raise UsageError(f"build context {args.context!r} is not a directory")
    store = open_store(args.layout)
    with contextlib.ExitStack() as resources:
        stdin_dockerfile = None
        context = Path(args.context)
        if args.context == "-":
            from builder.stdin_context import open_stdin_context

            context, stdin_dockerfile = resources.enter_context(
                open_stdin_context(sys.stdin.buffer, store.layout.tmp))
        options = _options(args, context, stdin_dockerfile)
        # With the files on standard output, the progress goes to standard error, as buildx's does.
        image = build(store, options, sys.stderr if to_stdout else None)
    if args.iidfile:
        _write_iidfile(args.iidfile, image.digest)
    if outputs:
        from builder.fsops import LayerView
        from unionfs.core.stack import LayerStack

        with store.lock(shared=True):
            view = LayerView(LayerStack.from_bottom_up(layer.path for layer in image.layers))
            for spec in outputs:
                try:
                    write_output(view, spec, sys.stdout.buffer)
                except OSError as e:
                    raise UsageError(f"--output {spec.dest}: {e.strerror or e}") from None
    if not to_stdout:
        if not options.quiet:
            # docker's legacy builder says so, and clients read it (python-on-whales' legacy_build);
            # the builder has printed the "Successfully tagged" lines.
            print(f"Successfully built {image.short_id}")
        print(image.id)
    return 0


def _write_iidfile(path: str, digest: str) -> None:
    """docker's ``--iidfile``: the image ID (``sha256:...``, no newline), written whole or not at all."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(digest)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--iidfile {path}: {e.strerror or e}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("build", help="build an image from a Dockerfile",
                              description="Build an image from a Dockerfile and a context directory, "
                                          "without root.")
    p.add_argument("context", metavar="CONTEXT",
                   help="the build context directory ('-': a tar archive of it, or a Dockerfile, on standard input)")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="REF",
                   help="name and tag the image (repeatable)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the Dockerfile (default CONTEXT/Dockerfile; '-' reads standard input)")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="set a build-time variable")
    p.add_argument("--target", metavar="STAGE", help="build this stage (and the stages it needs) only")
    p.add_argument("--no-cache", action="store_true", help="do not use the build cache")
    p.add_argument("--pull", action="store_true", help="always pull registry base images again")
    p.add_argument("--platform", metavar="OS/ARCH",
                   help="the platform to build for: only this machine's (builds run natively)")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="add a label to the image")
    p.add_argument("--secret", action="append", default=[], metavar="id=ID[,src=FILE|env=VAR]",
                   help="a secret RUN --mount=type=secret may read (never stored in the image)")
    p.add_argument("--ssh", action="append", default=[], metavar="ID[=SOCKET]",
                   help="an SSH agent socket RUN --mount=type=ssh may use (default: $SSH_AUTH_SOCK)")
    p.add_argument("--cache-from", action="append", default=[], metavar="type=registry,ref=REF",
                   help="use a build cache from a registry, or an image's inline cache (repeatable)")
    p.add_argument("--cache-to", action="append", default=[],
                   metavar="type=registry,ref=REF[,mode=min|max]",
                   help="export the build cache to a registry (or type=inline: into the image)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    p.add_argument("--progress", choices=["auto", "plain", "tty", "quiet"], default="auto",
                   help="progress output style (lamina prints plain steps; quiet: only the image ID)")
    p.add_argument("--network", choices=["default", "none", "host"], default="default",
                   help="the network of RUN steps that do not name one (default: the host's)")
    p.add_argument("--ulimit", action="append", default=[], type=_ulimit, metavar="NAME=SOFT[:HARD]",
                   help="a resource limit of every RUN step, as run's (nofile=1024:2048; -1 unlimited)")
    p.add_argument("--iidfile", metavar="FILE", help="write the image ID to FILE")
    p.add_argument("-o", "--output", action="append", default=[], metavar="type=local,dest=DIR",
                   help="also write the image's files: type=local,dest=DIR or type=tar,dest=FILE|- (DIR, - for short)")
    p.set_defaults(handler=cmd_build)
