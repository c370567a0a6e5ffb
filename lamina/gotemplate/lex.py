"""Go's text/template lexer (text/template/parse/lex.go): a template's text into tokens.

Text outside actions is one token; inside ``{{ }}`` come Go's tokens; comments are dropped and the
trim markers (``{{- `` and `` -}}``) cut the white space of the neighbouring text. A lexing error
is itself a token, where the lexer stops, because Go's parser reads tokens as the lexer makes them
and reports whatever goes wrong first.
"""

from __future__ import annotations

from dataclasses import dataclass

KEYWORDS = frozenset({"block", "break", "continue", "define", "else", "end", "if", "range", "nil",
                      "template", "with"})
SPACE = " \t\r\n"



class ParseError(Exception):
    """A template Go's parser refuses; the message is Go's, ``template: NAME:LINE: ...``."""


# --- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # text, left, right, space, pipe, lparen, rparen, declare, assign, punctuation, string,
    # rawstring, char (a constant 'x'), number, bool, nil, dot, field, variable, identifier, keyword, eof
    value: str
    pos: int
    line: int

    def describe(self) -> str:
        """Go's item.String(), used in "unexpected X in Y"."""
        if self.kind == "eof":
            return "EOF"
        if self.kind in ("keyword", "dot", "nil"):
            return f"<{self.value}>"
        if len(self.value) > 10:
            return go_quote(self.value[:10]) + "..."
        return go_quote(self.value)


def go_quote(text: str) -> str:
    """strconv.Quote: a double-quoted Go string literal."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _ESCAPES_OUT:
            out.append(_ESCAPES_OUT[ch])
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_ESCAPES_OUT = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                "\v": "\\v"}
_ESCAPES_IN = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", "'": "'", '"': '"'}


def go_unquote(literal: str) -> str:
    """strconv.Unquote of a "..." or '...' literal; ValueError when Go would refuse it."""
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError(literal)
        esc = body[i + 1]
        if esc in _ESCAPES_IN:
            out.append(_ESCAPES_IN[esc])
            i += 2
        elif esc in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[esc]
            hex_text = body[i + 2:i + 2 + digits]
            if len(hex_text) != digits or not all(c in "0123456789abcdefABCDEF" for c in hex_text):
                raise ValueError(literal)
            out.append(chr(int(hex_text, 16)))
            i += 2 + digits
        elif esc in "01234567":
            oct_text = body[i + 1:i + 4]
            if len(oct_text) != 3 or not all(c in "01234567" for c in oct_text) or int(oct_text, 8) > 255:
                raise ValueError(literal)
            out.append(chr(int(oct_text, 8)))
            i += 4
        else:
            raise ValueError(literal)
    return "".join(out)


class Lexer:
    """Go's lexer (text/template/parse/lex.go): text outside actions, tokens inside ``{{ }}``,
    comments dropped, trim markers applied to the neighbouring text."""

    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self.tokens: list[Token] = []
        self.paren_depth = 0

    def error(self, message: str, pos: int) -> _LexError:
        return _LexError(message, pos)

    def emit(self, kind: str, start: int, end: int) -> None:
        self.tokens.append(Token(kind, self.text[start:end], start, self.text.count("\n", 0, start) + 1))

    def run(self) -> list[Token]:
        """The tokens up to the end, or up to an "error" token: as Go's lexer runs ahead of the
        parser, a parse error before that point is the one reported."""
        try:
            return self._run()
        except _LexError as e:
            message, pos = e.args
            self.emit("error", pos, pos)
            self.tokens[-1] = Token("error", message, pos, self.tokens[-1].line)
            return self.tokens

    def _run(self) -> list[Token]:
        text = self.text
        pos = 0
        while True:
            start = text.find("{{", pos)
            end = len(text) if start < 0 else start
            trim_left = start >= 0 and len(text) > start + 3 and text[start + 2] == "-" and text[start + 3] in SPACE
            chunk_end = end
            if trim_left:
                while chunk_end > pos and text[chunk_end - 1] in SPACE:
                    chunk_end -= 1
            if chunk_end > pos:
                self.emit("text", pos, chunk_end)
            if start < 0:
                self.emit("eof", len(text), len(text))
                return self.tokens
            inside = start + (4 if trim_left else 2)
            if text.startswith("/*", inside):
                pos = self._comment(start, inside)
            else:
                self.emit("left", start, inside)
                pos = self._action(inside)

    def _at_right_delim(self, pos: int) -> tuple[bool, bool]:
        """(at "}}", with a trim marker " -}}")"""
        text = self.text
        if len(text) > pos + 1 and text[pos] in SPACE and text[pos + 1] == "-" and text.startswith("}}", pos + 2):
            return True, True
        return text.startswith("}}", pos), False

    def _after_right_delim(self, pos: int, trim: bool) -> int:
        if trim:
            pos += 2
        self.emit("right", pos, pos + 2)
        pos += 2
        if trim:
            while pos < len(self.text) and self.text[pos] in SPACE:
                pos += 1
        return pos

    def _comment(self, start: int, inside: int) -> int:
        close = self.text.find("*/", inside + 2)
        if close < 0:
            raise self.error("unclosed comment", start)
        delim, trim = self._at_right_delim(close + 2)
        if not delim:
            raise self.error("comment ends before closing delimiter", start)
        pos = close + 2 + (2 if trim else 0) + 2
        if trim:
            while pos < len(self.text) and self.text[pos] in SPACE:
                pos += 1
        return pos

    def _action(self, pos: int) -> int:
        text = self.text
        while True:
            delim, trim = self._at_right_delim(pos)
            if delim:
                if self.paren_depth == 0:
                    return self._after_right_delim(pos, trim)
                raise self.error("unclosed left paren", pos)
            if pos >= len(text):
                raise self.error("unclosed action", pos)
            ch = text[pos]
            if ch in SPACE:
                end = pos
                while end < len(text) and text[end] in SPACE:
                    end += 1
                delim, trim = self._at_right_delim(end - 1)
                if delim and trim:
                    end -= 1
                    if end == pos:
                        continue
                self.emit("space", pos, end)
                pos = end
            elif ch == "=":
                self.emit("assign", pos, pos + 1)
                pos += 1
            elif ch == ":":
                if not text.startswith(":=", pos):
                    raise self.error("expected :=", pos)
                self.emit("declare", pos, pos + 2)
                pos += 2
            elif ch == "|":
                self.emit("pipe", pos, pos + 1)
                pos += 1
            elif ch in "\"'`":
                pos = self._quoted(pos, ch)
            elif ch == "$" or (ch == "." and not text[pos + 1:pos + 2].isdigit()):
                pos = self._field_or_variable(pos)
            elif ch in "+-." or ch.isdigit():
                pos = self._number(pos)
            elif ch.isalnum() or ch == "_":
                pos = self._identifier(pos)
            elif ch == "(":
                self.paren_depth += 1
                self.emit("lparen", pos, pos + 1)
                pos += 1
            elif ch == ")":
                self.paren_depth -= 1
                self.emit("rparen", pos, pos + 1)
                pos += 1
            elif ord(ch) < 0x80 and ch.isprintable():
                self.emit("punctuation", pos, pos + 1)
                pos += 1
            else:
                raise self.error(f"unrecognized character in action: {_go_rune(ch)}", pos)

    def _at_terminator(self, pos: int) -> bool:
        if pos >= len(self.text) or self.text[pos] in SPACE + ".,|:()":
            return True
        return self._at_right_delim(pos)[0]

    def _alnum_end(self, pos: int) -> int:
        while pos < len(self.text) and (self.text[pos].isalnum() or self.text[pos] == "_"):
            pos += 1
        return pos

    def _identifier(self, pos: int) -> int:
        end = self._alnum_end(pos)
        if not self._at_terminator(end):
            raise self.error(f"bad character {_go_rune(self.text[end])}", end)
        word = self.text[pos:end]
        kind = ("nil" if word == "nil" else "keyword" if word in KEYWORDS
                else "bool" if word in ("true", "false") else "identifier")
        self.emit(kind, pos, end)
        return end

    def _field_or_variable(self, pos: int) -> int:
        kind = "variable" if self.text[pos] == "$" else "field"
        if self._at_terminator(pos + 1):
            self.emit("variable" if kind == "variable" else "dot", pos, pos + 1)
            return pos + 1
        end = self._alnum_end(pos + 1)
        if not self._at_terminator(end):
            raise self.error(f"bad character {_go_rune(self.text[end])}", end)
        self.emit(kind, pos, end)
        return end

    def _quoted(self, pos: int, quote: str) -> int:
        text = self.text
        i = pos + 1
        while True:
            if i >= len(text) or (quote != "`" and text[i] == "\n"):
                raise self.error({"`": "unterminated raw quoted string", "'": "unterminated character constant"}
                                 .get(quote, "unterminated quoted string"), pos)
            if quote != "`" and text[i] == "\\" and i + 1 < len(text) and text[i + 1] != "\n":
                i += 2
                continue
            if text[i] == quote:
                break
            i += 1
        self.emit({"`": "rawstring", "'": "char", '"': "string"}[quote], pos, i + 1)
        return i + 1

    def _number(self, pos: int) -> int:
        """scanNumber: sign, base prefix, digits, fraction, exponent, imaginary suffix."""
        text = self.text
        i = pos
        def accept(chars: str) -> bool:
            nonlocal i
            if i < len(text) and text[i] in chars:
                i += 1
                return True
            return False
        def accept_run(chars: str) -> None:
            while accept(chars):
                pass
        accept("+-")
        digits = "0123456789_"
        if accept("0"):
            if accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif accept("oO"):
                digits = "01234567_"
            elif accept("bB"):
                digits = "01_"
        accept_run(digits)
        if accept("."):
            accept_run(digits)
        if len(digits) == 11 and accept("eE"):
            accept("+-")
            accept_run("0123456789_")
        if len(digits) == 23 and accept("pP"):
            accept("+-")
            accept_run("0123456789_")
        accept("i")
        if i < len(text) and (text[i].isalnum() or text[i] == "_"):
            raise self.error(f"bad number syntax: {go_quote(text[pos:i + 1])}", pos)
        self.emit("number", pos, i)
        return i


class _LexError(Exception):
    """(message, pos): where the lexer stops."""


def _go_rune(ch: str) -> str:
    """Go's %#U: U+0023 '#'."""
    return f"U+{ord(ch):04X} '{ch}'"
