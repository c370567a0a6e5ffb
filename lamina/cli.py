"""The ``lamina`` command: parse the command line, dispatch to a package, translate errors once.

The verbs live in :mod:`lamina.commands`, one module per area, each with ``register(subparsers)``;
every verb's parser sets ``handler`` to a function ``handler(args) -> int``. The parsers, with
docker's command groups and flag rules, are built by :mod:`lamina.parser`. This module owns only
what is global: logging set-up, and the error boundary that turns a :class:`LaminaError` into one
line on stderr and docker's exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from lamina import __version__
from lamina.argv import requested_verb
from lamina.commands import ALL_COMMAND_MODULES, VERB_MODULES, VERBS_FAILING_WITH_125
from lamina.config import resolve_root
from lamina.errors import EXIT_FAILED, EXIT_LAMINA, LaminaError, UsageError
from lamina.layout import Layout
from lamina.parser import LaminaArgumentParser, build_parser, print_help

__all__ = ["ALL_COMMAND_MODULES", "VERB_MODULES", "LaminaArgumentParser", "build_parser", "main"]

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


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
        return print_help(parser, args.verb_or_group)
    _sweep_debris(args.layout)
    try:
        return handler(args)
    except LaminaError as e:
        e.exit_code = docker_exit_code(args.verb, e)
        raise
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        log.debug("unhandled OSError", exc_info=True)
        failed = LaminaError(os_error_line(e))
        failed.exit_code = docker_exit_code(args.verb, failed)
        raise failed from e


def docker_exit_code(verb: str, error: LaminaError) -> int:
    """The exit code docker's client gives when ``verb`` fails with ``error``: lamina's general 125
    is 1 for every docker verb but run and create. An error class that states its own code (126,
    127, or 125 for an error docker gives 125 everywhere) keeps it."""
    states_its_code = any("exit_code" in vars(cls) for cls in type(error).__mro__[:-1]
                          if cls is not LaminaError and issubclass(cls, LaminaError))
    if error.exit_code == EXIT_LAMINA and not states_its_code and verb not in VERBS_FAILING_WITH_125:
        return EXIT_FAILED
    return error.exit_code


def os_error_line(e: OSError) -> str:
    """An OS error as one line naming the file."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


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
        print(f"lamina: error: {os_error_line(e)}", file=sys.stderr)
        log.debug("unhandled OSError", exc_info=True)
        return EXIT_LAMINA


if __name__ == "__main__":
    sys.exit(main())
