"""Docker's word processing for Dockerfile arguments: quotes, escapes and ``$variable`` substitution.

This follows moby's ``shell/lex.go`` (the lexer BuildKit uses for ENV, LABEL, COPY, WORKDIR, FROM...),
not a POSIX shell: there is no command substitution, no globbing and no tilde expansion, only

* single quotes (everything literal), double quotes (``\\``, ``"`` and ``$`` may be escaped), and the
  escape character (``\\`` or the one set by ``# escape=``) outside quotes;
* ``$name``, ``${name}``, ``${name:-word}``, ``${name-word}``, ``${name:+word}``, ``${name+word}``,
  ``${name:?message}``, ``${name?message}`` (the colon forms treat an empty value as unset), and the
  BuildKit pattern forms ``${name#pat}``, ``${name##pat}``, ``${name%pat}``, ``${name%%pat}``,
  ``${name/pat/repl}``, ``${name//pat/repl}``;
* an unset variable expands to the empty string; a ``$`` not followed by a name stays literal.

:func:`split_words` finds word boundaries without processing anything (docker's ``parseWords``, used
by the parser for ENV/LABEL/ARG); :meth:`Lexer.process_word` expands one word to one string; and
:meth:`Lexer.process_words` expands and splits, an unquoted expansion splitting on whitespace as the
shell would.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from lamina.errors import LaminaError


class SubstitutionError(LaminaError):
    """A malformed ``${...}`` or an unterminated quote; the Dockerfile parser adds file and line."""


_SPECIAL_PARAMS = set("@*#?-$!0")


class _Words:
    """Accumulates words the way moby's ``wordsStruct`` does (quoted text never splits)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.word: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch.isspace():
            if self.in_word:
                self.words.append("".join(self.word))
                self.word = []
                self.in_word = False
        else:
            self.add_raw(ch)

    def add_raw(self, text: str) -> None:
        self.word.append(text)
        self.in_word = True

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def result(self) -> list[str]:
        if self.in_word:
            self.words.append("".join(self.word))
            self.word = []
            self.in_word = False
        return self.words


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.pos += 1
        return ch


# ``${a:-${b:-...}}`` deeper than this is refused (no real Dockerfile nests more than a few levels).
MAX_NESTING = 100


class Lexer:
    """Expands Dockerfile words against a mapping of variables, with a given escape character."""

    def __init__(self, escape: str = "\\") -> None:
        self.escape = escape

    def process_word(self, text: str, env: Mapping[str, str]) -> str:
        """Quotes removed, escapes resolved, variables substituted; never split."""
        result, _ = _Run(self, text, env).process_stop_on("")
        return result

    def process_words(self, text: str, env: Mapping[str, str]) -> list[str]:
        """Like :meth:`process_word`, split into words on whitespace outside quotes."""
        _, words = _Run(self, text, env).process_stop_on("")
        return words


class _Run:
    def __init__(self, lexer: Lexer, text: str, env: Mapping[str, str]) -> None:
        self.escape = lexer.escape
        self.scanner = _Scanner(text)
        self.env = env
        self.depth = 0

    def process_stop_on(self, stop: str) -> tuple[str, list[str]]:
        result: list[str] = []
        words = _Words()
        sc = self.scanner
        while sc.peek():
            ch = sc.peek()
            if stop and ch == stop:
                sc.next()
                return "".join(result), words.result()
            if ch == "'":
                text = self.single_quote()
                result.append(text)
                words.add_raw(text)
            elif ch == '"':
                text = self.double_quote()
                result.append(text)
                words.add_raw(text)
            elif ch == "$":
                text = self.dollar()
                result.append(text)
                words.add_string(text)
            else:
                ch = sc.next()
                if ch == self.escape:
                    ch = sc.next()
                    if not ch:
                        break
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                result.append(ch)
        if stop:
            raise SubstitutionError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(result), words.result()

    def single_quote(self) -> str:
        sc = self.scanner
        sc.next()
        out: list[str] = []
        while True:
            ch = sc.next()
            if not ch:
                raise SubstitutionError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                return "".join(out)
            out.append(ch)

    def double_quote(self) -> str:
        sc = self.scanner
        sc.next()
        out: list[str] = []
        while True:
            ch = sc.peek()
            if not ch:
                raise SubstitutionError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                sc.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = sc.next()
            if ch == self.escape:
                following = sc.peek()
                if not following:
                    continue
                if following in ('"', "$", self.escape):
                    ch = sc.next()
            out.append(ch)

    def name(self) -> str:
        sc = self.scanner
        out: list[str] = []
        while sc.peek():
            ch = sc.peek()
            if not out and ch.isdigit():
                while sc.peek().isdigit():
                    out.append(sc.next())
                return "".join(out)
            if not out and ch in _SPECIAL_PARAMS:
                return sc.next()
            if not (ch.isalnum() or ch == "_"):
                break
            out.append(sc.next())
        return "".join(out)

    def lookup(self, name: str) -> str | None:
        return self.env.get(name)

    def dollar(self) -> str:
        sc = self.scanner
        sc.next()  # the $
        if sc.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.lookup(name) or ""
        sc.next()  # the {
        self.depth += 1
        try:
            return self._braced()
        finally:
            self.depth -= 1

    def _braced(self) -> str:
        """The rest of a ``${...}`` substitution, after the brace."""
        sc = self.scanner
        if self.depth > MAX_NESTING:
            # Each level is a few Python frames: refuse before the interpreter's recursion limit does.
            raise SubstitutionError(f"substitutions nested more than {MAX_NESTING} deep")
        if not sc.peek():
            raise SubstitutionError("syntax error: missing '}'")
        if sc.peek() == "}":
            raise SubstitutionError("bad substitution: ${}")
        name = self.name()
        if not name:
            raise SubstitutionError("bad substitution: invalid variable name in ${...}")
        ch = sc.next()
        value = self.lookup(name)
        if ch == "}":
            return value or ""
        if ch == ":":
            modifier = sc.next()
            word, _ = self.process_stop_on("}")
            if modifier == "+":
                return word if value else ""
            if modifier == "-":
                return value if value else word
            if modifier == "?":
                if not value:
                    raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
                return value
            raise SubstitutionError(f"unsupported modifier ({modifier}) in substitution")
        if ch in ("+", "-", "?"):
            word, _ = self.process_stop_on("}")
            if ch == "+":
                return word if value is not None else ""
            if ch == "-":
                return value if value is not None else word
            if value is None:
                raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
            return value
        if ch in ("#", "%"):
            longest = sc.peek() == ch
            if longest:
                sc.next()
            pattern, _ = self.process_stop_on("}")
            return _trim(value or "", pattern, from_start=(ch == "#"), longest=longest)
        if ch == "/":
            replace_all = sc.peek() == "/"
            if replace_all:
                sc.next()
            pattern, _ = self.process_stop_on("/")
            replacement, _ = self.process_stop_on("}")
            regex = _glob_regex(pattern)
            return re.sub(regex, lambda _m: replacement, value or "", count=0 if replace_all else 1)
        if not ch:
            raise SubstitutionError("syntax error: missing '}'")
        raise SubstitutionError(f"unsupported modifier ({ch}) in substitution")


def _glob_regex(pattern: str) -> str:
    # fnmatch.translate anchors with \Z; strip the anchoring to search inside the value.
    translated = fnmatch.translate(pattern)
    return translated.removeprefix("(?s:").removesuffix(")\\Z")


def _trim(value: str, pattern: str, *, from_start: bool, longest: bool) -> str:
    cuts = range(len(value), -1, -1) if longest else range(len(value) + 1)
    for n in cuts:
        part = value[:n] if from_start else value[len(value) - n:]
        if fnmatch.fnmatchcase(part, pattern):
            return value[n:] if from_start else value[:len(value) - n]
    return value


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split on whitespace outside quotes, keeping quotes and escapes in the words (docker's parseWords)."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    i = 0
    in_word = False
    while i < len(text):
        ch = text[i]
        if not in_word:
            if ch.isspace():
                i += 1
                continue
            in_word = True
        if ch.isspace() and not quote:
            words.append("".join(word))
            word = []
            in_word = False
            i += 1
            continue
        if ch == escape and i + 1 < len(text):
            word.append(ch + text[i + 1])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
        word.append(ch)
        i += 1
    if in_word:
        words.append("".join(word))
    return words
