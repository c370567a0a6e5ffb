"""The ``lamina`` entry point: lazy verb dispatch, global flags, docker's error conventions."""

from __future__ import annotations

import importlib

from lamina.argv import requested_verb
from lamina.cli import ALL_COMMAND_MODULES, VERB_MODULES, LaminaArgumentParser


def test_verb_table_matches_what_each_module_registers() -> None:
    for module_name in ALL_COMMAND_MODULES:
        parser = LaminaArgumentParser(prog="lamina")
        subparsers = parser.add_subparsers(dest="command", parser_class=LaminaArgumentParser)
        importlib.import_module(module_name).register(subparsers)
        registered = set(subparsers.choices)
        listed = {verb for verb, owner in VERB_MODULES.items() if owner == module_name}
        assert registered == listed, module_name


def test_requested_verb_skips_global_options() -> None:
    assert requested_verb(["--root", "/x", "--log-level", "debug", "run", "--rm", "img"]) == "run"
    assert requested_verb(["--root=/x", "images"]) == "images"
    assert requested_verb(["--version"]) is None


def test_help_lists_every_verb(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    out = lamina_cmd("--help").stdout
    for verb in ("build", "run", "images", "pull", "mount", "which"):
        assert verb in out


def test_unknown_verb_is_a_usage_error(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    result = lamina_cmd("frobnicate", check=False)
    assert result.returncode == 125
    assert "frobnicate" in result.stderr and result.stderr.startswith("lamina: error:")


def test_lamina_error_is_one_line_without_traceback(lamina_cmd) -> None:  # type: ignore[no-untyped-def]
    result = lamina_cmd("inspect", "no-such-image-anywhere", check=False)
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_libraries_know_nothing_of_the_command_line() -> None:
    """The store, inspector, builder and runner are libraries: flags are parsed in lamina.commands."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    libraries = [repo / "lamina" / "store", repo / "lamina" / "inspector", repo / "builder", repo / "runner"]
    offenders = []
    for path in sorted(p for library in libraries for p in library.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "argparse" or n.startswith(("lamina.commands", "lamina.cli")) for n in names):
                offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert offenders == []
