"""Go values as the template engine sees them, and Go's fmt printing of them.

Python values stand for Go's: ``str`` string, ``int`` int64 (``GoInt`` for an untyped constant in
the template, Go's ``int``), ``float`` float64, ``bool``, ``None`` a nil interface, ``list`` a
``[]interface{}``, ``dict`` a ``map[string]interface{}`` (printed and encoded in key order, as Go
sorts map keys) and :class:`GoStruct` a struct with named fields and methods, whose unknown fields
are an error rather than ``<no value>``. ``MISSING`` is Go's invalid reflect.Value: the result of a
missing map key, printed as ``<no value>``.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from lamina.gotemplate.parse import go_quote


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _NilPointer:
    """A nil pointer in a struct's field (docker's ``.Platform``): printed ``<nil>``, unlike a
    nil interface, which a pipeline turns into the invalid value."""

    def __repr__(self) -> str:
        return "NIL_POINTER"


NIL_POINTER: Any = _NilPointer()


class GoInt(int):
    """An untyped integer constant of the template: Go's ``int`` rather than a field's int64."""


class GoStrings(list[str]):
    """A ``[]string`` (what docker's split returns), a ``[]interface {}`` in all but its type name."""


class GoMethod:
    """A method with arguments, called as ``{{.Label "name"}}``: ``function(*args)``."""

    def __init__(self, function: Callable[..., Any], arity: int) -> None:
        self.function = function
        self.arity = arity


class GoStruct:
    """A Go struct (or a pointer to one): ``fields`` by name, in declaration order.

    ``type_name`` is what Go's errors name (``*formatter.imageContext``). ``json_fields`` chooses how
    ``{{json .}}`` encodes it: None for the fields in order; else a function giving the mapping to
    encode, in order, or (``marshals_itself``) with sorted keys and HTML escaped, as docker's
    formatter contexts marshal themselves through a map.
    """

    def __init__(self, type_name: str, fields: Mapping[str, Any],
                 json_fields: Callable[[], Mapping[str, Any]] | None = None, marshals_itself: bool = True) -> None:
        self.type_name = type_name
        self.fields = dict(fields)
        self.json_fields = json_fields
        self.marshals_itself = marshals_itself

    def __repr__(self) -> str:
        return f"GoStruct({self.type_name!r}, {self.fields!r})"


# Go's name for each kind of value, most specific first (bool and GoInt are ints to Python).
_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "bool"), (GoInt, "int"), (int, "int64"), (float, "float64"), (str, "string"), (GoStrings, "[]string"),
    (list, "[]interface {}"), (dict, "map[string]interface {}"))


class GoMap(dict[str, Any]):
    """A Go map type with methods (docker's SubHeaderContext): a method is found before a key."""

    def __init__(self, items: Mapping[str, Any], type_name: str, methods: Mapping[str, GoMethod]) -> None:
        super().__init__(items)
        self.type_name = type_name
        self.methods = dict(methods)


def type_name(value: Any) -> str:
    """Go's %T of a value."""
    if value is None or value is MISSING:
        return "<nil>"
    if isinstance(value, (GoStruct, GoMap)):
        return value.type_name
    for python_type, go_name in _TYPE_NAMES:
        if isinstance(value, python_type):
            return go_name
    return type(value).__name__


# --- %v ------------------------------------------------------------------------------------------


def format_value(value: Any, plus: bool = False) -> str:
    """fmt's %v (and %+v)."""
    if value is None or value is NIL_POINTER:
        return "<nil>"
    if value is MISSING:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return format_float(value, "g", -1)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + " ".join(format_value(v, plus) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{format_value(k, plus)}:{format_value(value[k], plus)}"
                                 for k in sorted(value)) + "]"
    if isinstance(value, GoStruct):
        shown = [(name, v) for name, v in value.fields.items() if not isinstance(v, GoMethod)]
        body = " ".join(f"{name}:{format_value(v, plus)}" if plus else format_value(v)
                        for name, v in shown)
        return ("&{" if value.type_name.startswith("*") else "{") + body + "}"
    return str(value)


def _shortest_digits(value: float) -> tuple[str, int]:
    """(digits, exponent) of the shortest decimal that reads back as ``value``: d.ddd x 10^exp."""
    sign, digit_tuple, exponent = decimal.Decimal(repr(abs(value))).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)) or "0"
    return digits, len(digits) - 1 + exponent


def format_float(value: float, verb: str, precision: int) -> str:
    """strconv.FormatFloat for the verbs e, f, g (precision -1: the shortest that round-trips)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if precision >= 0 or verb == "f" or verb == "e":
        shown = f"%.{6 if precision < 0 else precision}{verb}" % abs(value)
        if precision < 0 and verb == "e":
            digits, exponent = _shortest_digits(value)
            shown = _exponent_form(digits, exponent)
        elif precision < 0 and verb == "f":
            digits, exponent = _shortest_digits(value)
            shown = _fixed_form(digits, exponent)
        elif verb == "g":
            shown = _go_exponent(shown)
        return sign + (_go_exponent(shown) if verb == "e" else shown)
    digits, exponent = _shortest_digits(value)
    if value == 0:
        digits, exponent = "0", 0
    if exponent < -4 or exponent >= 6:  # strconv's %g: precision 6 decides for the shortest form
        return sign + _exponent_form(digits, exponent)
    return sign + _fixed_form(digits, exponent)


def _exponent_form(digits: str, exponent: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _fixed_form(digits: str, exponent: int) -> str:
    if exponent < 0:
        return "0." + "0" * (-exponent - 1) + digits
    if exponent + 1 >= len(digits):
        return digits + "0" * (exponent + 1 - len(digits))
    return digits[:exponent + 1] + "." + digits[exponent + 1:]


def _go_exponent(text: str) -> str:
    """Python writes e+05 as Go does; make sure of two exponent digits at least."""
    if "e" not in text:
        return text
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{exponent[0]}{int(exponent[1:]):02d}"


def sprint(args: list[Any]) -> str:
    """fmt.Sprint: a space between operands when neither side is a string."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(format_value(arg))
    return "".join(out)


def sprintln(args: list[Any]) -> str:
    return " ".join(format_value(a) for a in args) + "\n"


# --- JSON ----------------------------------------------------------------------------------------


def to_json(value: Any, escape_html: bool = False) -> str:
    """encoding/json's compact encoding (docker's ``json`` function has HTML escaping off)."""
    return _json(value, escape_html)


def _json(value: Any, escape_html: bool) -> str:
    if value is None or value is MISSING or value is NIL_POINTER:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return _json_string(value, escape_html)
    if isinstance(value, list):
        return "[" + ",".join(_json(v, escape_html) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json_string(str(k), escape_html)}:{_json(value[k], escape_html)}"
                              for k in sorted(value)) + "}"
    if isinstance(value, GoStruct):
        if value.json_fields is not None and value.marshals_itself:  # json.Marshal of a map
            return _json(dict(value.json_fields()), True)
        fields = value.fields if value.json_fields is None else value.json_fields()
        return "{" + ",".join(f"{_json_string(k, escape_html)}:{_json(v, escape_html)}"
                              for k, v in fields.items() if not isinstance(v, GoMethod)) + "}"
    raise TypeError(f"json: unsupported type: {type_name(value)}")


def _json_float(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {format_float(value, 'g', -1)}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    digits, exponent = _shortest_digits(value)
    sign = "-" if value < 0 else ""
    if abs(value) < 1e-6 or abs(value) >= 1e21:
        text = _exponent_form(digits, exponent)
        mantissa, _, exp = text.partition("e")
        return f"{sign}{mantissa}e{exp[0]}{int(exp[1:])}"
    return sign + _fixed_form(digits, exponent)


def _json_string(text: str, escape_html: bool) -> str:
    encoded = json.dumps(text, ensure_ascii=False)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    encoded = encoded.replace("\\b", "\\u0008").replace("\\f", "\\u000c").replace("\x7f", "\x7f")
    if escape_html:
        encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return encoded


# --- escapes -------------------------------------------------------------------------------------


def html_escape(text: str) -> str:
    """template.HTMLEscapeString."""
    replacements = {"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"}
    return "".join(replacements.get(c, c) for c in text)


def js_escape(text: str) -> str:
    """template.JSEscapeString."""
    out: list[str] = []
    for ch in text:
        if ch in "\\'\"":
            out.append("\\" + ch)
        elif ch in "<>&=":
            out.append(f"\\u{ord(ch):04X}")
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04X}")
        elif ord(ch) < 0x80 or ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04X}")
    return "".join(out)


def query_escape(text: str) -> str:
    """url.QueryEscape."""
    out: list[str] = []
    for byte in text.encode():
        ch = chr(byte)
        if ch.isascii() and (ch.isalnum() or ch in "-_.~"):
            out.append(ch)
        elif ch == " ":
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


__all__ = ["MISSING", "NIL_POINTER", "GoInt", "GoMap", "GoMethod", "GoStrings", "GoStruct", "format_float", "format_value", "go_quote",
           "html_escape", "js_escape", "query_escape", "sprint", "sprintln", "to_json", "type_name"]
