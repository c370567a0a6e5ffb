"""The ``lamina`` command: parse the command line, dispatch to a package, translate errors once.

The verbs live in :mod:`lamina.commands`, one module per area, each with ``register(subparsers)``;
every verb's parser sets ``handler`` to a function ``handler(args) -> int``. This module owns only
what is global: ``--root``, ``--log-level``, ``--version``, logging set-up, and the error boundary
that turns a :class:`LaminaError` into one line on stderr and docker's exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lamina import __version__
from lamina.argv import requested_verb
from lamina.commands import ALL_COMMAND_MODULES, VERB_MODULES
from lamina.config import resolve_root
from lamina.errors import EXIT_LAMINA, LaminaError, UsageError
from lamina.layout import Layout
from unionfs.startup import patches_enabled

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class LaminaArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become :class:`UsageError` (exit 125, one line)."""

    def error(self, message: str) -> NoReturn:
        # "lamina: error: run: unrecognized arguments: --foo" names the verb, never "lamina" twice.
        verb = self.prog.removeprefix("lamina").strip()
        raise UsageError(f"{verb}: {message}" if verb else message)


# The one-verb parser (below) is a start-up speed trick: argparse set-up of every verb is a
# noticeable part of a short command. Like every other trick it is off under LAMINA_NO_PATCHES=1
# (unionfs.startup.patches_enabled), and tests/test_cli.py checks that each verb parses the same
# either way.
class _UnusedParser:
    """Stands in for the parser of a verb that is not on the command line: every call is a no-op."""

    def __getattr__(self, _name: str) -> Callable[..., _UnusedParser]:
        return lambda *_args, **_kwargs: self


class _OneVerb:
    """The subparsers action, narrowed to one verb: a module registering its verbs builds only the
    parser of the verb being run (argparse set-up of a dozen verbs is a noticeable part of start-up)."""

    def __init__(self, subparsers: argparse._SubParsersAction, verb: str) -> None:
        self._subparsers = subparsers
        self._verb = verb

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser | _UnusedParser:
        if name != self._verb:
            return _UnusedParser()
        return self._subparsers.add_parser(name, **kwargs)  # type: ignore[arg-type]


def build_parser(argv: Sequence[str] = ()) -> LaminaArgumentParser:
    """The full parser, or, when ``argv`` names a known verb, a parser with only that verb's module
    (and, unless start-up tricks are off, of that module's verbs only that verb's parser)."""
    parser = LaminaArgumentParser(
        prog="lamina",
        description="Build and run Docker/OCI images without root, on lamina's own union filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"lamina version {__version__}")
    parser.add_argument("--root", metavar="DIR", default=None,
                        help="where images and containers are stored (env LAMINA_ROOT; "
                             "default ~/.local/share/lamina, /var/lib/lamina for root)")
    parser.add_argument("--log-level", default=os.environ.get("LAMINA_LOG_LEVEL", "warning"),
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="how much lamina logs on stderr (default: warning)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=LaminaArgumentParser)
    verb = requested_verb(argv)
    if verb in VERB_MODULES:
        module = importlib.import_module(VERB_MODULES[verb])
        module.register(_OneVerb(subparsers, verb) if patches_enabled() else subparsers)
    else:
        for name in ALL_COMMAND_MODULES:
            importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(level_name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level_name.upper()),
        format="lamina: %(levelname)s: %(message)s" if level_name != "debug"
        else "%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def run(argv: Sequence[str]) -> int:
    if "--version" in argv and requested_verb(argv) is None:
        # Answered before any package is imported: scripts call it to probe for lamina.
        print(f"lamina version {__version__}")
        return 0
    parser = build_parser(argv)
    args = parser.parse_args(list(argv))
    configure_logging(args.log_level)
    if args.root is not None and not args.root.strip():
        # An unset variable in `--root "$DIR"` must not silently mean the default store.
        raise UsageError("--root: empty path")
    # Verbs see the root only through its layout, which hands each part its own directories.
    args.layout = Layout(resolve_root(args.root))
    del args.root
    # A store made by an older lamina was open to every user: close it before any verb uses it.
    from lamina.store.private import tighten_if_present
    tighten_if_present(args.layout)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr if args.command else sys.stdout)
        return 0 if not args.command else EXIT_LAMINA
    _sweep_debris(args.layout)
    return handler(args)


def _sweep_debris(layout: Layout) -> None:
    """What killed lamina processes left in the store goes before any command uses it."""
    from runner.state import sweep_debris

    try:
        sweep_debris(layout)
    except Exception as e:  # tidying up must never stop the command the user asked for
        logging.getLogger(__name__).debug("cleaning up after earlier commands: %r", e)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lamina`` console script. The one place errors become exit codes.

    Run as the program (``argv`` None), the process ends here without the interpreter's teardown:
    freeing every imported module takes ~10 ms, a noticeable part of a short command such as
    ``run --rm IMAGE true``, and nothing lamina holds needs it (descriptors and locks go with the
    process; the standard streams are flushed first).
    """
    code = _main(sys.argv[1:] if argv is None else list(argv))
    if argv is None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):  # output piped into `head`; or already closed
                pass
        os._exit(code)
    return code


def _main(args: list[str]) -> int:
    try:
        return run(args)
    except LaminaError as e:
        print(f"lamina: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head`: not an error of ours.
        return 0
    except OSError as e:
        # An OS error that escaped every package boundary still gets one line, naming the file.
        where = f": {e.filename}" if e.filename else ""
        print(f"lamina: error: {e.strerror or e}{where}", file=sys.stderr)
        log.debug("unhandled OSError", exc_info=True)
        return EXIT_LAMINA


if __name__ == "__main__":
    sys.exit(main())
