"""Pass 1 of the Dockerfile parser: parser directives, comments, line continuations, heredocs.

See :mod:`builder.dockerfile` for the whole picture. The result is a list of :class:`LogicalLine`:
one per instruction, its continuation lines joined, with the bodies of its heredocs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from builder.record import Record, record
from builder.shellwords import split_words
from lamina.errors import DockerfileError

# Parser directives we understand; any other ``# key=value`` at the top is an ordinary comment and
# ends the directive section (as documented for docker).
KNOWN_DIRECTIVES = ("syntax", "escape", "check")
_DIRECTIVE_RE = re.compile(r"^#[ \t]*([A-Za-z][A-Za-z0-9]*)[ \t]*=[ \t]*(.+?)[ \t]*$")
# A heredoc word: optional fd, <<, optional '-' (strip leading tabs), the delimiter (maybe quoted).
HEREDOC_WORD_RE = re.compile(r"^(\d*)<<(-?)([^<]+)$")


@record
class Directives(Record):
    escape: str = "\\"
    syntax: str | None = None
    check: str | None = None


@record
class Heredoc(Record):
    """One heredoc of an instruction: ``name`` is the delimiter, ``body`` its text (tabs already
    stripped for ``<<-``), ``expand`` False when the delimiter was quoted."""

    name: str
    body: str
    expand: bool
    strip_tabs: bool
    raw_body: str  # as written, for handing to a shell that does its own heredoc processing


@dataclass
class LogicalLine:
    keyword: str  # upper case
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword
    text: str  # the logical line as written (continuations joined), for error messages
    heredocs: list[Heredoc] = field(default_factory=list)


def parse_directives(lines: list[str], file: str) -> tuple[Directives, int]:
    """Read the directive section; return the directives and the index of the first other line."""
    directives = Directives()  # replaced, never changed: a parse result is immutable
    seen: set[str] = set()
    index = 0
    for index, line in enumerate(lines):
        m = _DIRECTIVE_RE.match(line)
        if not m or m.group(1).lower() not in KNOWN_DIRECTIVES:
            return directives, index
        key, value = m.group(1).lower(), m.group(2)
        if key in seen:
            raise DockerfileError(f"only one {key} parser directive can be used", file, index + 1, line)
        seen.add(key)
        if key == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"invalid escape token '{value}' does not match ` or \\", file,
                                      index + 1, line)
            directives = dataclasses.replace(directives, escape=value)
        elif key == "syntax":
            directives = dataclasses.replace(directives, syntax=value)
        else:
            _check_directive(value, file, index + 1, line)
            directives = dataclasses.replace(directives, check=value)
    return directives, len(lines)


def _check_directive(value: str, file: str, line: int, text: str) -> None:
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key not in ("skip", "error") or not val:
            raise DockerfileError(f"invalid check directive: {part.strip()!r} (expected skip=... or error=...)",
                                  file, line, text)
        if key == "error" and val.lower() not in ("true", "false"):
            raise DockerfileError(f"invalid check directive: error must be true or false, not {val!r}",
                                  file, line, text)


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _find_heredocs(args: str, escape: str) -> list[tuple[str, bool, bool]]:
    """(delimiter, expand, strip_tabs) for every heredoc word in ``args``, in order."""
    found = []
    for word in split_words(args, escape):
        m = HEREDOC_WORD_RE.match(word)
        if not m:
            continue
        name = m.group(3)
        expand = True
        if len(name) >= 2 and name[0] == name[-1] and name[0] in ("'", '"'):
            name, expand = name[1:-1], False
        elif "'" in name or '"' in name:
            # <<E"O"F: any quoting disables expansion, as in the shell.
            name, expand = name.replace("'", "").replace('"', ""), False
        if not name:
            continue
        found.append((name, expand, m.group(2) == "-"))
    return found


HEREDOC_INSTRUCTIONS = ("RUN", "COPY", "ADD")


def logical_lines(text: str, file: str = "Dockerfile") -> tuple[Directives, list[LogicalLine]]:
    """Pass 1: directives, comments, continuations and heredoc bodies."""
    text = text.removeprefix("\ufeff")
    lines = text.splitlines()
    directives, i = parse_directives(lines, file)
    escape = directives.escape
    continuation = re.compile(re.escape(escape) + r"[ \t]*$")
    result: list[LogicalLine] = []
    n = len(lines)
    while i < n:
        line = lines[i]
        if not line.strip() or _is_comment(line):
            i += 1
            continue
        start = i
        current = line.lstrip()
        pieces: list[str] = []
        while True:
            m = continuation.search(current)
            if not m:
                pieces.append(current)
                i += 1
                break
            pieces.append(current[:m.start()])
            i += 1
            # Comment and blank lines inside a continued instruction are dropped.
            while i < n and (not lines[i].strip() or _is_comment(lines[i])):
                i += 1
            if i >= n:
                break
            current = lines[i]
        logical = "".join(pieces)
        keyword, _, args = logical.strip().partition(" ")
        if "\t" in keyword:
            keyword, _, rest = keyword.partition("\t")
            args = rest + " " + args if args else rest
        args = args.strip()
        keyword_upper = keyword.upper()
        heredocs: list[Heredoc] = []
        if keyword_upper in HEREDOC_INSTRUCTIONS or (
                keyword_upper == "ONBUILD" and args.split(None, 1)[0].upper() in HEREDOC_INSTRUCTIONS):
            for name, expand, strip_tabs in _find_heredocs(args, escape):
                body_lines: list[str] = []
                raw_lines: list[str] = []
                while True:
                    if i >= n:
                        raise DockerfileError(f"unterminated heredoc: no line {name!r} before end of file",
                                              file, start + 1, logical)
                    body_line = lines[i]
                    i += 1
                    candidate = body_line.lstrip("\t") if strip_tabs else body_line
                    if candidate == name:
                        break
                    raw_lines.append(body_line + "\n")
                    body_lines.append(candidate + "\n")
                heredocs.append(Heredoc(name, "".join(body_lines), expand, strip_tabs, "".join(raw_lines)))
        result.append(LogicalLine(keyword_upper, args, start + 1, logical.strip(), heredocs))
    return directives, result
