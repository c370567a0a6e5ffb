"""Execution of parsed templates, as text/template's exec.go does it.

The evaluation follows Go's step for step where it shows: a missing map key gives ``<no value>``
(or an error with ``missingkey=error``), an unknown field of a struct is an error, a value taken out
of a map or a slice is an ``interface {}`` to Go (which names it so in its errors), a pipeline's
nil interface result becomes the invalid value, arguments are checked against each function's
parameter types, and an error reads ``template: NAME:LINE:COL: executing "NAME" at <NODE>: ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lamina.gotemplate import parse as p
from lamina.gotemplate.values import (
    MISSING,
    NIL_POINTER,
    GoInt,
    GoMap,
    GoMethod,
    GoStruct,
    format_value,
    type_name,
)

MAX_DEPTH = 100_000  # Go's maxExecDepth, for {{template}} recursion
ANY, STRING, INT, VALUE = "interface {}", "string", "int", "reflect.Value"


class ExecError(Exception):
    """A template that fails while it runs; the message is Go's."""


class FunctionError(Exception):
    """Raised by a template function: Go reports it as ``error calling NAME: MESSAGE``."""


@dataclass(frozen=True)
class Function:
    """A template function and its Go signature, which decides how arguments are checked."""

    call: Callable[..., Any]
    params: tuple[str, ...]
    variadic: bool = False  # the last of params is the type of each variadic argument


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


@dataclass
class _Dot:
    """The value of dot, and whether Go holds it in an ``interface {}`` (an element of a map or
    slice) rather than as its own type: that changes only the type Go names in an error."""

    value: Any
    boxed: bool = False


def truth(value: Any) -> bool | None:
    """Go's isTrue; None when the value has no truth (never for the values we hold)."""
    if value is MISSING or value is None or value is NIL_POINTER:
        return False
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    if isinstance(value, (bool, int, float)):
        return bool(value)
    if isinstance(value, GoStruct):
        return True
    return None


class State:
    def __init__(self, name: str, text: str, trees: dict[str, p.ListNode], functions: dict[str, Function],
                 missing_key_error: bool) -> None:
        self.name = name
        self.text = text
        self.trees = trees
        self.functions = functions
        self.missing_key_error = missing_key_error
        self.out: list[str] = []
        self.vars: list[tuple[str, Any]] = []
        self.node: p.Node | None = None
        self.depth = 0

    # -- errors --

    def at(self, node: p.Node) -> None:
        self.node = node

    def error(self, message: str) -> ExecError:
        if self.node is None:
            return ExecError(f"template: {self.name}: {message}")
        pos = self.node.pos
        before = self.text[:pos]
        newline = before.rfind("\n")
        column = pos if newline < 0 else pos - newline - 1
        context = str(self.node)
        location = f"{self.name}:{before.count(chr(10)) + 1}:{column}"
        return ExecError(f"template: {location}: executing {_quote(self.name)} at <{context}>: {message}")

    # -- variables --

    def push(self, name: str, value: Any) -> None:
        self.vars.append((name, value))

    def mark(self) -> int:
        return len(self.vars)

    def pop(self, mark: int) -> None:
        del self.vars[mark:]

    def set_var(self, name: str, value: Any) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i] = (name, value)
                return
        raise self.error(f"undefined variable: {name}")

    def set_top_var(self, n: int, value: Any) -> None:
        self.vars[-n] = (self.vars[-n][0], value)

    def var_value(self, name: str) -> Any:
        for var_name, value in reversed(self.vars):
            if var_name == name:
                return value
        raise self.error(f"undefined variable: {name}")

    # -- walking --

    def walk(self, dot: _Dot, node: p.Node) -> None:
        self.at(node)
        if isinstance(node, p.ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.print_value(node, value)
        elif isinstance(node, p.ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, p.TextNode):
            self.out.append(node.text)
        elif isinstance(node, p.BranchNode):
            if node.keyword == "range":
                self.walk_range(dot, node)
            else:
                self.walk_if_or_with(dot, node)
        elif isinstance(node, p.TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, p.LoopControlNode):
            raise _Break() if node.keyword == "break" else _Continue()
        else:
            raise self.error(f"unknown node: {node}")

    def walk_if_or_with(self, dot: _Dot, node: p.BranchNode) -> None:
        mark = self.mark()
        try:
            value = self.eval_pipeline(dot, node.pipe)
            is_true = truth(value)
            if is_true is None:
                raise self.error(f"if/with can't use {format_value(value)}")
            if is_true:
                self.walk(_Dot(value) if node.keyword == "with" else dot, node.body)
            elif node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            self.pop(mark)

    def walk_range(self, dot: _Dot, node: p.BranchNode) -> None:
        self.at(node)
        mark = self.mark()
        try:
            value = self.eval_pipeline(dot, node.pipe)
            if isinstance(value, list):
                items: list[tuple[Any, Any]] = [(GoInt(i), v) for i, v in enumerate(value)]
            elif isinstance(value, dict):
                items = [(k, value[k]) for k in sorted(value)]
            elif value is MISSING or value is None:
                items = []
            elif isinstance(value, int) and not isinstance(value, bool):  # Go 1.22: range over an int
                if len(node.pipe.decl) > 1:
                    raise self.error(f"can't use {value} to iterate over more than one variable")
                items = [(GoInt(i), GoInt(i)) for i in range(value)]
            else:
                raise self.error(f"range can't iterate over {format_value(value)}")
            body_mark = self.mark()
            for index, element in items:
                self._one_iteration(node, index, element, body_mark)
                if self._broke:
                    break
            if not items and node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            self._broke = False
            self.pop(mark)

    _broke = False

    def _one_iteration(self, node: p.BranchNode, index: Any, element: Any, mark: int) -> None:
        decl = node.pipe.decl
        if decl:
            if node.pipe.is_assign:
                self.set_var(decl[0].idents[0], index if len(decl) > 1 else element)
            else:
                self.set_top_var(1, element)
        if len(decl) > 1:
            if node.pipe.is_assign:
                self.set_var(decl[1].idents[0], element)
            else:
                self.set_top_var(2, index)
        try:
            self.walk(_Dot(element, boxed=True), node.body)
        except _Continue:
            pass
        except _Break:
            self._broke = True
        finally:
            self.pop(mark)

    def walk_template(self, dot: _Dot, node: p.TemplateNode) -> None:
        self.at(node)
        tree = self.trees.get(node.name)
        if tree is None:
            raise self.error(f"template {_quote(node.name)} not defined")
        if self.depth >= MAX_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_DEPTH})")
        value = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else MISSING
        saved_vars, saved_name = self.vars, self.name
        self.vars = [("$", value)]
        self.depth += 1
        self.name = node.name
        try:
            self.walk(_Dot(value), tree)
        finally:
            self.vars, self.name = saved_vars, saved_name
            self.depth -= 1

    # -- pipelines and commands --

    def eval_pipeline(self, dot: _Dot, pipe: p.PipeNode) -> Any:
        self.at(pipe)
        value: Any = _NO_FINAL
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
            if value is None:  # a nil interface{} result is Go's invalid value
                value = MISSING
        for variable in pipe.decl:
            if pipe.is_assign:
                self.set_var(variable.idents[0], value)
            else:
                self.push(variable.idents[0], value)
        return value

    def eval_command(self, dot: _Dot, cmd: p.CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        if isinstance(first, p.FieldNode):
            self.at(first)
            return self.eval_field_chain(dot, dot, first, first.idents, cmd.args, final)
        if isinstance(first, p.ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, p.IdentifierNode):
            return self.eval_function(dot, first, cmd, cmd.args, final)
        if isinstance(first, p.PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, p.VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.at(first)
        self.not_a_function(cmd.args, final)
        if isinstance(first, p.BoolNode):
            return first.value
        if isinstance(first, p.DotNode):
            return dot.value
        if isinstance(first, p.NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, p.NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, p.StringNode):
            return first.text
        raise self.error(f"can't evaluate command {_quote(str(first))}")

    def not_a_function(self, args: list[p.Node], final: Any) -> None:
        if len(args) > 1 or final is not _NO_FINAL:
            raise self.error(f"can't give argument to non-function {args[0]}")

    def ideal_constant(self, node: p.NumberNode) -> Any:
        self.at(node)
        text = node.text
        is_hex_int = len(text) > 2 and text[0] == "0" and text[1] in "xX" and not any(c in text for c in "pP")
        if not node.is_int or (not is_hex_int and not text.startswith("'") and any(c in text for c in ".eEpP")):
            return float(node.value)
        if not -2 ** 63 <= node.value < 2 ** 63:
            raise self.error(f"{text} overflows int")
        return GoInt(node.value)

    def eval_chain(self, dot: _Dot, chain: p.ChainNode, args: list[p.Node], final: Any) -> Any:
        self.at(chain)
        if isinstance(chain.node, p.NilNode):
            raise self.error(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, ANY, chain.node)
        return self.eval_field_chain(dot, _Dot(receiver), chain, chain.fields, args, final)

    def eval_variable(self, dot: _Dot, variable: p.VariableNode, args: list[p.Node], final: Any) -> Any:
        self.at(variable)
        value = self.var_value(variable.idents[0])
        if len(variable.idents) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, _Dot(value), variable, variable.idents[1:], args, final)

    def eval_field_chain(self, dot: _Dot, receiver: _Dot, node: p.Node, idents: list[str],
                         args: list[p.Node], final: Any) -> Any:
        for ident in idents[:-1]:
            receiver = _Dot(self.eval_field(dot, ident, node, [], _NO_FINAL, receiver), boxed=_boxes(receiver.value))
        return self.eval_field(dot, idents[-1], node, args, final, receiver)

    def eval_field(self, dot: _Dot, name: str, node: p.Node, args: list[p.Node], final: Any,
                   receiver: _Dot) -> Any:
        value = receiver.value
        if value is MISSING or (value is None and not receiver.boxed):
            if self.missing_key_error:
                raise self.error(f"nil data; no entry for key {_quote(name)}")
            return MISSING
        static_type = "interface {}" if receiver.boxed else type_name(value)
        if value is None:
            raise self.error(f"nil pointer evaluating {static_type}.{name}")
        has_args = len(args) > 1 or final is not _NO_FINAL
        if isinstance(value, GoMap) and name in value.methods:
            method = value.methods[name]
            return self.eval_call(dot, Function(method.function, (STRING,) * method.arity), False,
                                  node, name, args, final)
        if isinstance(value, GoStruct):
            if name in value.fields:
                field = value.fields[name]
                if isinstance(field, GoMethod):
                    return self.eval_call(dot, Function(field.function, (STRING,) * field.arity), False,
                                          node, name, args, final)
                if has_args:
                    raise self.error(f"{name} has arguments but cannot be invoked as function")
                return field
        elif isinstance(value, dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if name in value:
                return value[name]
            if self.missing_key_error:
                raise self.error(f"map has no entry for key {_quote(name)}")
            return MISSING
        raise self.error(f"can't evaluate field {name} in type {static_type}")

    def eval_function(self, dot: _Dot, node: p.IdentifierNode, cmd: p.Node, args: list[p.Node],
                      final: Any) -> Any:
        self.at(node)
        function = self.functions.get(node.name)
        if function is None:
            raise self.error(f"{_quote(node.name)} is not a defined function")
        return self.eval_call(dot, function, True, cmd, node.name, args, final)

    def eval_call(self, dot: _Dot, function: Function, builtin: bool, node: p.Node, name: str,
                  args: list[p.Node], final: Any) -> Any:
        args = args[1:] if args else []
        params = function.params
        count = len(args) + (0 if final is _NO_FINAL else 1)
        fixed = len(params) - 1 if function.variadic else len(params)
        if function.variadic:
            if count < fixed:
                raise self.error(f"wrong number of args for {name}: want at least {fixed} got {len(args)}")
        elif count != len(params):
            raise self.error(f"wrong number of args for {name}: want {len(params)} got {count}")
        if builtin and name in ("and", "or"):
            value: Any = MISSING
            for arg in args:
                value = self.eval_arg(dot, VALUE, arg)
                if bool(truth(value)) == (name == "or"):
                    return value
            if final is not _NO_FINAL:
                value = self.validate_type(final, VALUE)
            return value
        argv = [self.eval_arg(dot, params[min(i, len(params) - 1)], arg) for i, arg in enumerate(args)]
        if builtin and name == "call":  # newer Go names the callee: docker's CLI reports it so
            argv.insert(0, str(args[0]) if args else "")
        if final is not _NO_FINAL:
            argv.append(self.validate_type(final, params[min(len(argv), len(params) - 1)]))
        try:
            result = function.call(*argv)
        except FunctionError as e:
            self.at(node)
            raise self.error(f"error calling {name}: {e}") from None
        return result

    # -- arguments --

    def eval_arg(self, dot: _Dot, param: str, node: p.Node) -> Any:
        self.at(node)
        if isinstance(node, p.DotNode):
            return self.validate_type(dot.value, param, dot.boxed)
        if isinstance(node, p.NilNode):
            if param in (ANY, VALUE):
                return None
            raise self.error(f"cannot assign nil to {param}")
        if isinstance(node, p.FieldNode):
            return self.validate_type(self.eval_field_chain(dot, dot, node, node.idents, [node], _NO_FINAL),
                                      param, True)
        if isinstance(node, p.VariableNode):
            return self.validate_type(self.eval_variable(dot, node, [], _NO_FINAL), param)
        if isinstance(node, p.PipeNode):
            return self.validate_type(self.eval_pipeline(dot, node), param)
        if isinstance(node, p.IdentifierNode):
            return self.validate_type(self.eval_function(dot, node, node, [], _NO_FINAL), param)
        if isinstance(node, p.ChainNode):
            return self.validate_type(self.eval_chain(dot, node, [], _NO_FINAL), param)
        if param == STRING:
            if isinstance(node, p.StringNode):
                return node.text
            raise self.error(f"expected string; found {node}")
        if param == INT:
            if isinstance(node, p.NumberNode) and node.is_int:
                return GoInt(node.value)
            raise self.error(f"expected integer; found {node}")
        if isinstance(node, p.BoolNode):
            return node.value
        if isinstance(node, p.NumberNode):
            return self.ideal_constant(node)
        if isinstance(node, p.StringNode):
            return node.text
        raise self.error(f"can't handle {node} for arg of type {param}")

    def validate_type(self, value: Any, param: str, boxed: bool = False) -> Any:
        if value is MISSING:
            if param in (ANY, VALUE):
                return None if param == ANY else MISSING
            raise self.error(f"invalid value; expected {param}")
        if param in (ANY, VALUE):
            return value
        if param == STRING and isinstance(value, str):
            return value
        if param == INT and isinstance(value, GoInt):
            return value
        got = "interface {}" if value is None else type_name(value)
        raise self.error(f"wrong type for value; expected {param}; got {got}")

    def print_value(self, node: p.Node, value: Any) -> None:
        self.at(node)
        if isinstance(value, GoStruct) and value.type_name.startswith("*"):  # printableValue indirects
            value = GoStruct(value.type_name[1:], value.fields)
        self.out.append(format_value(value))


_NO_FINAL: Any = object()  # Go's missingVal: no value piped in from a previous command


def _boxes(container: Any) -> bool:
    """Whether the values Go takes out of ``container`` are interface{} values."""
    return isinstance(container, (dict, list))


def _quote(text: str) -> str:
    return p.go_quote(text)


def execute(name: str, text: str, trees: dict[str, p.ListNode], functions: dict[str, Function], data: Any,
            missing_key_error: bool = False) -> str:
    """The output of the tree ``name`` run on ``data``; ExecError when Go's would fail."""
    state = State(name, text, trees, functions, missing_key_error)
    state.push("$", data)
    tree = trees.get(name)
    if tree is None:
        raise ExecError(f"template: {name}: {_quote(name)} is an incomplete or empty template")
    state.walk(_Dot(data), tree)
    return "".join(state.out)
