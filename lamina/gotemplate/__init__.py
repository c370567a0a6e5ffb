"""Go's text/template, as docker's ``--format`` uses it.

``Template.parse(text)`` parses like text/template's Parse with docker's functions
(github.com/docker/cli/templates), ``template.execute(data)`` runs it. Both fail with
:class:`TemplateError` whose message is Go's own. Data are plain Python values (see
:mod:`lamina.gotemplate.values`); :class:`GoStruct` stands for a Go struct, whose unknown fields
are errors where a map's missing keys print ``<no value>``.

The package is pure: no I/O, no lamina imports beyond itself.
"""

from __future__ import annotations

from typing import Any

from lamina.gotemplate.execute import ExecError, Function, execute
from lamina.gotemplate.functions import BUILTINS, DOCKER_FUNCTIONS, HEADER_FUNCTIONS
from lamina.gotemplate.parse import ListNode, ParseError, parse
from lamina.gotemplate.values import MISSING, NIL_POINTER, GoInt, GoMap, GoMethod, GoStruct, to_json

TemplateError = (ParseError, ExecError)


class Template:
    """A parsed template and the functions it may call."""

    def __init__(self, name: str, text: str, trees: dict[str, ListNode], functions: dict[str, Function]) -> None:
        self.name = name
        self.text = text
        self.trees = trees
        self.functions = functions

    @classmethod
    def parse(cls, text: str, name: str = "", functions: dict[str, Function] | None = None) -> Template:
        """Parse ``text`` with Go's builtins and docker's functions; ParseError as Go's Parse."""
        table = {**BUILTINS, **DOCKER_FUNCTIONS, **(functions or {})}
        return cls(name, text, parse(text, name, table.__contains__), table)

    def with_functions(self, functions: dict[str, Function]) -> Template:
        """The same trees with some functions replaced, as Go's Template.Funcs after Parse."""
        return Template(self.name, self.text, self.trees, {**self.functions, **functions})

    def execute(self, data: Any, missing_key_error: bool = False) -> str:
        """The text the template makes of ``data``; ExecError where Go's Execute fails."""
        return execute(self.name, self.text, self.trees, self.functions, data, missing_key_error)


__all__ = ["HEADER_FUNCTIONS", "MISSING", "NIL_POINTER", "ExecError", "Function", "GoInt", "GoMap", "GoMethod", "GoStruct", "ParseError", "Template",
           "TemplateError", "to_json"]
