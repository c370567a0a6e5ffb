"""``lamina build``: the command line of the builder.

Imports are deferred to the handler so that ``lamina --help`` and every other verb stay fast, and a
cached rebuild pays only for what it uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lamina.bounded import TEXT_LIMIT, read_at_most, read_file_at_most
from lamina.errors import UsageError


def _key_value(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not key:
        raise UsageError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value if sep else ""


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


def cmd_build(args: argparse.Namespace) -> int:
    from builder.build import BuildOptions, build
    from builder.session import Session, parse_secret, parse_ssh
    from lamina.application import open_store
    from lamina.store import Reference

    context = Path(args.context)
    if not context.is_dir():
        raise UsageError(f"build context {args.context!r} is not a directory")
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
    text, path, name = _read_dockerfile(args, context)
    options = BuildOptions(context=context, dockerfile_text=text, dockerfile_path=path, dockerfile_name=name,
                           tags=list(args.tag), build_args=build_args, target=args.target,
                           no_cache=args.no_cache, pull=args.pull, labels=labels, quiet=args.quiet,
                           session=session)
    store = open_store(args.layout)
    image = build(store, options)
    if not args.quiet:
        # docker's legacy builder says so, and clients read it (python-on-whales' legacy_build);
        # the builder has printed the "Successfully tagged" lines.
        print(f"Successfully built {image.short_id}")
    print(image.id)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
    p = subparsers.add_parser("build", help="build an image from a Dockerfile",
                              description="Build an image from a Dockerfile and a context directory, "
                                          "without root.")
    p.add_argument("context", metavar="CONTEXT", help="the build context directory")
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
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    p.add_argument("--progress", choices=["auto", "plain", "tty"], default="auto",
                   help="progress output style (lamina always prints plain steps)")
    p.set_defaults(handler=cmd_build)
