"""The ``lamina`` command line as argparse parsers: verbs, command groups, docker's flag rules.

Three things here are docker's rather than argparse's:

- **Command groups.** ``lamina image ls`` is ``lamina images`` under docker's second name; the
  table is :data:`lamina.commands.COMMAND_GROUPS`, and a verb module never knows where its verbs
  are placed: it registers each verb once, and :class:`_Placement` builds that parser at the top
  level, inside a group under its sub-verb names, or not at all.
- **Booleans take a value.** As with Go's pflag, every boolean flag accepts ``--rm=false``,
  ``--tty=true``, ``-d=0``; a bare ``--rm`` still never takes the next word. This is one rule of
  :class:`LaminaArgumentParser`, so every ``store_true`` flag of every verb has it.
- **Exit codes.** A usage error is docker's 125, except an unknown command or a missing argument,
  which docker's client reports with 1 (:class:`lamina.errors.CommandLineError`).

The one-verb parser is a start-up speed trick: argparse set-up of every verb is a noticeable part of
a short command. Like every other trick it is off under LAMINA_NO_PATCHES=1
(:func:`unionfs.startup.patches_enabled`), and tests/test_cli.py checks that each verb and each
group's sub-verb parses the same either way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from lamina import __version__
from lamina.argv import requested_words
from lamina.commands import GROUP_DEFAULTS, GROUP_HELP, VERB_MODULES, group_verbs, groups, is_top_level
from lamina.errors import CommandLineError, UsageError
from unionfs.startup import patches_enabled

# Go's strconv.ParseBool, which docker's flags use: exactly these spellings.
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_go_bool(text: str) -> bool | None:
    """``text`` as Go's strconv.ParseBool reads it; None when it is not a boolean."""
    return True if text in _GO_TRUE else False if text in _GO_FALSE else None


# argparse's message for a word that is no verb (or no sub-verb of a group).
_UNKNOWN_COMMAND = re.compile(r"argument COMMAND: invalid choice: '(.*)' \(choose from")


class _BooleanValue(argparse.Action):
    """``--flag=VALUE`` of a boolean flag: what the flag stores when VALUE is true, its opposite
    when false. It stands in for the flag's own action for this one occurrence."""

    def __init__(self, flag: argparse.Action, text: str) -> None:
        super().__init__(option_strings=flag.option_strings, dest=flag.dest, nargs=0)
        self.flag = flag
        self.text = text

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        value = parse_go_bool(self.text)
        if value is None:
            # Raised only when the flag is really taken: `run IMG echo --rm=maybe` is the command's.
            raise argparse.ArgumentError(self.flag, f"invalid boolean value {self.text!r} "
                                                    "(expected true or false)")
        setattr(namespace, self.dest, self.flag.const if value else not self.flag.const)


class LaminaArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser with docker's flag rules (see the module docstring); its usage errors
    become :class:`UsageError` (one line, exit 125)."""

    def error(self, message: str) -> NoReturn:
        # "lamina: error: run: unrecognized arguments: --foo" names the verb, never "lamina" twice.
        verb = self.prog.removeprefix("lamina").strip()
        unknown = _UNKNOWN_COMMAND.match(message)
        if unknown:
            raise CommandLineError(f"{unknown[1]!r} is not a {self.prog} command; see '{self.prog} --help'")
        text = f"{verb}: {message}" if verb else message
        if message.startswith("the following arguments are required"):
            raise CommandLineError(text)
        raise UsageError(text)

    def _parse_optional(self, arg_string: str) -> Any:
        found = super()._parse_optional(arg_string)
        if found is None:
            if arg_string.startswith("--") and "=" in arg_string and " " in arg_string:
                # argparse takes an unknown `--flag=a value` (with a space) for a positional: for
                # `run` that made it the image's name. docker says the flag is unknown.
                return None, arg_string, None
            return None
        action, option_string, text = found
        if text is not None and arg_string.partition("=")[2] == text and \
                isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            # `--rm=false`: taken by a stand-in that stores the value, never by the bare flag.
            return _BooleanValue(action, text), option_string, None
        return found


# --- placing each module's verbs ---------------------------------------------------------------


class _UnusedParser:
    """Stands in for the parser of a verb that is not built: every call is a no-op."""

    def __getattr__(self, _name: str) -> Callable[..., _UnusedParser]:
        return lambda *_args, **_kwargs: self


class _Placement:
    """The subparsers action as a verb module sees it. ``places`` maps each verb to build to its
    names here (the first is the name, the rest aliases); any other verb is not built."""

    def __init__(self, subparsers: argparse._SubParsersAction, places: dict[str, list[str]],
                 defaults: dict[str, dict[str, object]] | None = None) -> None:
        self._subparsers = subparsers
        self._places = places
        self._defaults = defaults or {}
        self._built: list[tuple[argparse.ArgumentParser, dict[str, object]]] = []

    def add_parser(self, verb: str, **kwargs: Any) -> argparse.ArgumentParser | _UnusedParser:
        names = self._places.get(verb)
        if not names:
            return _UnusedParser()
        parser = self._subparsers.add_parser(names[0], aliases=names[1:], **kwargs)
        parser.set_defaults(verb=verb)
        self._built.append((parser, self._defaults.get(verb, {})))
        return parser

    def finish(self) -> None:
        """Apply what the placement implies, after the module has added its flags (set_defaults
        then also changes the default of a flag of the same name, as ``--type``)."""
        for parser, defaults in self._built:
            if defaults:
                parser.set_defaults(**defaults)


def _register(module_name: str, subparsers: argparse._SubParsersAction, places: dict[str, list[str]],
              defaults: dict[str, dict[str, object]] | None = None) -> None:
    placement = _Placement(subparsers, places, defaults)
    importlib.import_module(module_name).register(placement)
    placement.finish()


def _add_top_level(subparsers: argparse._SubParsersAction, verbs: Sequence[str]) -> None:
    for module_name in dict.fromkeys(VERB_MODULES[v] for v in verbs):
        _register(module_name, subparsers, {v: [v] for v in verbs if VERB_MODULES[v] == module_name})


def _add_group(subparsers: argparse._SubParsersAction, group: str, subs: Sequence[str]) -> None:
    """The group's parser, with the sub-verbs ``subs`` (aliases of a verb included) built."""
    members = group_verbs(group)
    parser = subparsers.add_parser(group, help=GROUP_HELP.get(group, f"manage {group}s"))
    group_subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND",
                                             parser_class=LaminaArgumentParser)
    places: dict[str, list[str]] = {}
    defaults: dict[str, dict[str, object]] = {}
    for sub in subs:
        verb = members[sub]
        places.setdefault(verb, []).append(sub)
        defaults.setdefault(verb, {}).update(GROUP_DEFAULTS.get((group, sub), {}))
    for module_name in dict.fromkeys(VERB_MODULES[v] for v in places):
        mine = {v: names for v, names in places.items() if VERB_MODULES[v] == module_name}
        _register(module_name, group_subparsers, mine, defaults)


def _global_parser() -> LaminaArgumentParser:
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
    return parser


def build_parser(argv: Sequence[str] = ()) -> LaminaArgumentParser:
    """The full parser, or, when ``argv`` names a known verb (or group and sub-verb), a parser with
    only the module owning it (and, unless start-up tricks are off, only that verb's parser)."""
    parser = _global_parser()
    # Not dest="command": run and create have a positional of that name.
    subparsers = parser.add_subparsers(dest="verb_or_group", metavar="COMMAND", parser_class=LaminaArgumentParser)
    words = requested_words(argv, 2)
    first = words[0] if words else None
    one_verb = patches_enabled()
    if first is not None and first in VERB_MODULES and is_top_level(first):
        module_name = VERB_MODULES[first]
        _add_top_level(subparsers, [first] if one_verb else
                       [v for v, m in VERB_MODULES.items() if m == module_name and is_top_level(v)])
    elif first is not None and first in groups():
        members = group_verbs(first)
        wanted = members.get(words[1]) if len(words) > 1 else None
        if wanted is None:  # `lamina image --help`, or a sub-verb to be refused by name
            subs = list(members)
        elif one_verb:
            subs = [s for s, v in members.items() if v == wanted]
        else:
            subs = [s for s, v in members.items() if VERB_MODULES[v] == VERB_MODULES[wanted]]
        _add_group(subparsers, first, subs)
    else:
        _add_top_level(subparsers, [v for v in VERB_MODULES if is_top_level(v)])
        for group in groups():
            _add_group(subparsers, group, list(group_verbs(group)))
    return parser


def print_help(parser: argparse.ArgumentParser, command: str | None) -> int:
    """``lamina`` alone: its help, exit 0. A group without a sub-verb: the group's help on stderr,
    exit 0, as docker does."""
    if command is None:
        parser.print_help(sys.stdout)
        return 0
    subparsers = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    subparsers.choices[command].print_help(sys.stderr)  # type: ignore[index]
    return 0
