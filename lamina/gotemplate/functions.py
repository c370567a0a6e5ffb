"""The functions a template can call: Go's builtins (text/template/funcs.go) and docker's
(github.com/docker/cli/templates: json, split, join, title, lower, upper, pad, truncate).

Each is declared with its Go signature, which the executor uses to check arguments as Go does.
``printf`` is fmt.Sprintf's verb language.
"""

from __future__ import annotations

import re
from typing import Any

from lamina.gotemplate.execute import ANY, INT, STRING, VALUE, Function, FunctionError, truth
from lamina.gotemplate.values import (
    MISSING,
    GoInt,
    GoMap,
    GoStrings,
    GoStruct,
    format_float,
    format_value,
    go_quote,
    html_escape,
    js_escape,
    query_escape,
    sprint,
    sprintln,
    to_json,
    type_name,
)

# --- comparison ----------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """Go's basicKind: what eq, lt and the others may compare."""
    for python_type, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string")):
        if isinstance(value, python_type):
            return kind
    return "invalid"


def _eq(arg1: Any, *rest: Any) -> bool:
    if not rest:
        raise FunctionError("missing argument for comparison")
    k1 = _kind(arg1)
    for arg in rest:
        k2 = _kind(arg)
        if k1 != k2:
            if arg1 is not MISSING and arg is not MISSING:
                raise FunctionError("incompatible types for comparison")
            continue
        if k1 != "invalid":
            if arg1 == arg:
                return True
            continue
        if _is_nil(arg1) or _is_nil(arg):
            if _is_nil(arg1) == _is_nil(arg):
                return True
            continue
        raise FunctionError(f"non-comparable type {format_value(arg)}: {type_name(arg)}")
    return False


def _is_nil(value: Any) -> bool:
    return value is None or value is MISSING


def _lt(arg1: Any, arg2: Any) -> bool:
    k1, k2 = _kind(arg1), _kind(arg2)
    if "invalid" in (k1, k2):
        raise FunctionError("invalid type for comparison")
    if k1 != k2:
        raise FunctionError("incompatible types for comparison")
    if k1 == "bool":
        raise FunctionError("invalid type for comparison")
    return bool(arg1 < arg2)


def _le(arg1: Any, arg2: Any) -> bool:
    return _lt(arg1, arg2) or _eq(arg1, arg2)


# --- indexing ------------------------------------------------------------------------------------


def _index_arg(index: Any, cap: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        if index is MISSING or index is None:
            raise FunctionError("cannot index slice/array with nil")
        raise FunctionError(f"cannot index slice/array with type {type_name(index)}")
    if index < 0 or index > cap:
        raise FunctionError(f"index out of range: {index}")
    return int(index)


def _index(item: Any, *indexes: Any) -> Any:
    if item is MISSING or item is None:
        raise FunctionError("index of untyped nil")
    for index in indexes:
        if item is None:
            raise FunctionError("index of nil pointer")
        if isinstance(item, (list, str)):
            x = _index_arg(index, len(item))
            if x >= len(item):
                raise FunctionError(f"index out of range: {x}")
            item = item[x] if isinstance(item, list) else GoInt(item.encode()[x])
        elif isinstance(item, dict):
            if not isinstance(index, str):
                if index is MISSING or index is None:
                    index = ""
                else:
                    raise FunctionError(f"value has type {type_name(index)}; should be string")
            item = item.get(index)
        else:
            raise FunctionError(f"can't index item of type {type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if item is MISSING or item is None:
        raise FunctionError("slice of untyped nil")
    if len(indexes) > 3:
        raise FunctionError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise FunctionError("cannot 3-index slice a string")
        data: Any = item.encode()
    elif isinstance(item, list):
        data = item
    else:
        raise FunctionError(f"can't slice item of type {type_name(item)}")
    bounds = [0, len(data), len(data)]
    for i, index in enumerate(indexes):
        bounds[i] = _index_arg(index, len(data))
    if bounds[0] > bounds[1]:
        raise FunctionError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
    if len(indexes) == 3 and bounds[1] > bounds[2]:
        raise FunctionError(f"invalid slice index: {bounds[1]} > {bounds[2]}")
    part = data[bounds[0]:bounds[1]]
    return part.decode(errors="surrogateescape") if isinstance(item, str) else part


def _call(callee: str, function: Any, *_args: Any) -> Any:
    """Go's call builtin: template data hold no Go functions, so it always fails as Go does."""
    if function is None or function is MISSING:
        raise FunctionError("call of nil")
    raise FunctionError(f"non-function {callee} of type {type_name(function)}")


def _len(item: Any) -> int:
    if item is None or item is MISSING:
        # Go's length() asks the type of the invalid value, and reflect panics
        raise FunctionError("len of nil pointer" if item is None
                            else "reflect: call of reflect.Value.Type on zero Value")
    if isinstance(item, str):
        return GoInt(len(item.encode()))
    if isinstance(item, (list, dict)):
        return GoInt(len(item))
    raise FunctionError(f"len of type {type_name(item)}")


# --- printf --------------------------------------------------------------------------------------

_VERB = re.compile(r"%([-+# 0]*)(?:\[(\d+)\])?(\*|\d+)?(?:\.(?:\[(\d+)\])?(\*|\d*))?(?:\[(\d+)\])?(.)?",
                   re.DOTALL)


def sprintf(fmt: str, *args: Any) -> str:
    """fmt.Sprintf for the verbs scripts use (v s d q x X t f e g c o b U T %), with flags,
    widths, precisions (``*`` too), argument indexes (``%[2]d``), and Go's ``%!verb(type=value)``
    for a wrong or missing argument."""
    out: list[str] = []
    arg_index = 0
    reordered = False
    pos = 0

    def take(explicit: str | None) -> tuple[str, Any]:
        """("ok", argument), ("missing", None) or ("badindex", None)."""
        nonlocal arg_index, reordered
        if explicit is not None:
            reordered = True
            if not 1 <= int(explicit) <= len(args):
                return "badindex", None
            arg_index = int(explicit) - 1
        if arg_index >= len(args):
            return "missing", None
        arg_index += 1
        return "ok", args[arg_index - 1]

    while pos < len(fmt):
        percent = fmt.find("%", pos)
        if percent < 0:
            out.append(fmt[pos:])
            break
        out.append(fmt[pos:percent])
        m = _VERB.match(fmt, percent)
        assert m is not None
        flags, width_index, width_text, precision_index, precision_text, verb_index, verb = m.groups()
        pos = m.end()
        if verb is None:
            out.append("%!(NOVERB)")
            break
        if verb == "%":
            out.append("%")
            continue
        width = precision = -1
        if width_text == "*":
            found, value = take(width_index)
            width = int(value) if found == "ok" and isinstance(value, int) else 0
        else:
            width = int(width_text) if width_text else -1
            verb_index = verb_index or width_index  # "%[2]d": the index is the verb's
        if precision_text == "*":
            found, value = take(precision_index)
            precision = int(value) if found == "ok" and isinstance(value, int) else 0
        elif precision_text is not None:
            precision = int(precision_text or 0)
            verb_index = verb_index or precision_index
        found, arg = take(verb_index)
        if found != "ok":
            out.append(f"%!{verb}({found.upper()})")
            continue
        out.append(_format_padded(arg, verb, flags, width, precision))
    if not reordered and arg_index < len(args):
        extra = ", ".join(f"{type_name(a)}={format_value(a)}" if not _is_nil(a) else "<nil>"
                          for a in args[arg_index:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _format_padded(arg: Any, verb: str, flags: str, width: int, precision: int) -> str:
    """One argument, padded to ``width``: fmt pads each element of a slice or map, not the whole."""
    if isinstance(arg, list) and verb != "T":
        return "[" + " ".join(_format_padded(a, verb, flags, width, precision) for a in arg) + "]"
    if isinstance(arg, dict) and verb in "vs" and not isinstance(arg, GoMap):
        return "map[" + " ".join(f"{_format_padded(k, verb, flags, width, precision)}:"
                                 f"{_format_padded(arg[k], verb, flags, width, precision)}"
                                 for k in sorted(arg)) + "]"
    return _pad(_format_arg(arg, verb, flags, precision), width, flags, arg)


def _pad(text: str, width: int, flags: str, arg: Any) -> str:
    if width < 0 or len(text) >= width:
        return text
    if "-" in flags:
        return text + " " * (width - len(text))
    if "0" in flags:  # fmt pads with zeros after the sign, for strings too
        numeric = isinstance(arg, (int, float)) and not isinstance(arg, bool)
        sign = text[0] if numeric and text[:1] in "+- " else ""
        return sign + "0" * (width - len(text)) + text[len(sign):]
    return " " * (width - len(text)) + text


def _bad(verb: str, arg: Any) -> str:
    if _is_nil(arg):
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({type_name(arg)}={format_value(arg)})"


def _format_arg(arg: Any, verb: str, flags: str, precision: int) -> str:
    if verb == "T":
        return type_name(arg)
    if verb == "v":
        if isinstance(arg, float):
            return _sign(format_float(arg, "g", precision), flags)
        text = format_value(arg, plus="+" in flags)
        return _sign(text, flags) if isinstance(arg, int) and not isinstance(arg, bool) else text
    if isinstance(arg, bool):
        return ("true" if arg else "false") if verb == "t" else _bad(verb, arg)
    if isinstance(arg, int):
        return _format_int(int(arg), verb, flags, precision) or _bad(verb, arg)
    if isinstance(arg, float):
        if verb in "xX":
            return _sign(_hex_float(arg, verb == "X"), flags)
        if verb in "eEfFgG":
            text = format_float(arg, verb.lower() if verb != "F" else "f",
                                precision if precision >= 0 else (-1 if verb in "gG" else 6))
            return _sign(text.upper() if verb in "EG" else text, flags)
        return _bad(verb, arg)
    if isinstance(arg, str):
        if verb == "s":
            return arg if precision < 0 else arg[:precision]
        shown = arg if precision < 0 else arg[:precision]
        if verb == "q":
            if "#" in flags and "`" not in shown and all(c.isprintable() or c == "\t" for c in shown):
                return "`" + shown + "`"  # strconv.CanBackquote
            return go_quote(shown)
        if verb in "xX":
            hex_text = (" " if " " in flags else "").join(f"{b:02x}" for b in shown.encode())
            return hex_text.upper() if verb == "X" else hex_text
        return _bad(verb, arg)
    if isinstance(arg, (dict, GoStruct)) and verb == "s":
        return format_value(arg)
    return _bad(verb, arg)


def _hex_float(value: float, upper: bool) -> str:
    """strconv's 'x' format, shortest: -0x1.fep+07."""
    text = value.hex()  # -0x1.fe00000000000p+7
    sign = "-" if text.startswith("-") else ""
    mantissa, _, exponent = text.lstrip("-").removeprefix("0x").partition("p")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    shown = f"{sign}0x{mantissa}p{exponent[0]}{int(exponent[1:]):02d}"
    return shown.upper() if upper else shown


def _sign(text: str, flags: str) -> str:
    if text.startswith("-"):
        return text
    if "+" in flags:
        return "+" + text
    if " " in flags:
        return " " + text
    return text


def _format_int(value: int, verb: str, flags: str, precision: int) -> str | None:
    if verb == "c":
        return chr(value)
    if verb == "q":
        return "'" + go_quote(chr(value))[1:-1].replace("'", "\\'").replace('\\"', '"') + "'"
    if verb == "U":
        return f"U+{value:04X}" + (f" '{chr(value)}'" if "#" in flags and chr(value).isprintable() else "")
    bases = {"d": (10, ""), "x": (16, "0x"), "X": (16, "0X"), "o": (8, "0"), "O": (8, "0o"), "b": (2, "0b")}
    if verb not in bases:
        return None
    base, prefix = bases[verb]
    digits = {10: "{:d}", 16: "{:x}", 8: "{:o}", 2: "{:b}"}[base].format(abs(value))
    if verb == "X":
        digits = digits.upper()
    if precision >= 0:
        digits = digits.rjust(precision, "0") if precision or value else ""
    if verb == "O" or ("#" in flags and verb != "d"):
        digits = prefix + digits
    return _sign(("-" if value < 0 else "") + digits, flags)


# --- docker's functions --------------------------------------------------------------------------


def _join(elements: Any, sep: str) -> str:
    if elements is None:
        return ""
    if isinstance(elements, list):
        return sep.join(format_value(e) for e in elements)
    if isinstance(elements, dict):
        return sep.join(sorted(format_value(v) for v in elements.values()))
    raise FunctionError(f"expected slice, got {type_name(elements)}")


def _split(text: str, sep: str) -> GoStrings:
    if sep == "":
        return GoStrings(text)
    return GoStrings(text.split(sep))


def _title(text: str) -> str:
    """strings.Title: the first letter of each word, after a separator, in upper case."""
    out: list[str] = []
    previous = " "
    for ch in text:
        separator = not (previous.isalnum() or previous == "_") if previous.isascii() else previous.isspace()
        out.append(ch.upper() if separator else ch)
        previous = ch
    return "".join(out)


def _pad_with_space(source: str, prefix: int, suffix: int) -> str:
    if source == "":
        return source
    if prefix < 0 or suffix < 0:  # Go's strings.Repeat panics; text/template reports the panic
        raise FunctionError("strings: negative Repeat count")
    return " " * prefix + source + " " * suffix


def _truncate(source: str, length: int) -> str:
    data = source.encode()
    if len(data) < length:
        return source
    if length < 0:
        raise FunctionError(f"runtime error: slice bounds out of range [:{length}]")
    return data[:length].decode(errors="surrogateescape")


def _json_function(value: Any) -> str:
    try:
        return to_json(value)
    except (TypeError, ValueError) as e:
        raise FunctionError(str(e)) from None


def _text_args(args: tuple[Any, ...]) -> str:
    """evalArgs: one string argument as it is, otherwise fmt.Sprint of them all."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return sprint(list(args))


BUILTINS: dict[str, Function] = {
    "and": Function(lambda *a: a[-1], (VALUE, VALUE), variadic=True),
    "or": Function(lambda *a: a[-1], (VALUE, VALUE), variadic=True),
    "not": Function(lambda a: not truth(a), (VALUE,)),
    "len": Function(_len, (VALUE,)),
    "call": Function(_call, (VALUE, VALUE), variadic=True),
    "index": Function(_index, (VALUE, VALUE), variadic=True),
    "slice": Function(_slice, (VALUE, VALUE), variadic=True),
    "print": Function(lambda *a: sprint(list(a)), (ANY,), variadic=True),
    "printf": Function(sprintf, (STRING, ANY), variadic=True),
    "println": Function(lambda *a: sprintln(list(a)), (ANY,), variadic=True),
    "html": Function(lambda *a: html_escape(_text_args(a)), (ANY,), variadic=True),
    "js": Function(lambda *a: js_escape(_text_args(a)), (ANY,), variadic=True),
    "urlquery": Function(lambda *a: query_escape(_text_args(a)), (ANY,), variadic=True),
    "eq": Function(_eq, (VALUE, VALUE), variadic=True),
    "ne": Function(lambda a, b: not _eq(a, b), (VALUE, VALUE)),
    "lt": Function(_lt, (VALUE, VALUE)),
    "le": Function(_le, (VALUE, VALUE)),
    "gt": Function(lambda a, b: not _le(a, b), (VALUE, VALUE)),
    "ge": Function(lambda a, b: not _lt(a, b), (VALUE, VALUE)),
}

DOCKER_FUNCTIONS: dict[str, Function] = {
    "json": Function(_json_function, (ANY,)),
    "split": Function(_split, (STRING, STRING)),
    "join": Function(_join, (ANY, STRING)),
    "title": Function(_title, (STRING,)),
    "lower": Function(str.lower, (STRING,)),
    "upper": Function(str.upper, (STRING,)),
    "pad": Function(_pad_with_space, (STRING, INT, INT)),
    "truncate": Function(_truncate, (STRING, INT)),
}

# docker's HeaderFunctions: a table's header row is the same template run on the column names, with
# these in place of the ones that would change a name (pad is kept, to keep the columns aligned).
HEADER_FUNCTIONS: dict[str, Function] = {
    "json": Function(lambda v: v, (STRING,)),
    "split": Function(lambda v, _sep: v, (STRING, STRING)),
    "join": Function(lambda v, _sep: v, (STRING, STRING)),
    "title": Function(lambda v: v, (STRING,)),
    "lower": Function(lambda v: v, (STRING,)),
    "upper": Function(lambda v: v, (STRING,)),
    "truncate": Function(lambda v, _n: v, (STRING, INT)),
}
