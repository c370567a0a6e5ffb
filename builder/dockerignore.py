"""``.dockerignore``: which files of the build context COPY and ADD may see (docker's rules).

* One pattern a line; lines starting with ``#`` are comments; blanks are skipped; patterns are
  trimmed, cleaned like paths (``./a/../b`` is ``b``) and a leading ``/`` is dropped: every pattern
  is relative to the context root.
* ``*`` matches any run of characters except ``/``, ``?`` one such character, ``[...]`` a class,
  ``\\`` escapes; ``**`` matches any number of directories, zero included (``**/x``, ``a/**/b``); a
  trailing ``**`` matches everything below.
* A pattern that matches a directory matches everything inside it.
* ``!pattern`` re-includes what an earlier pattern excluded. The *last* matching pattern wins.
* ``<Dockerfile>.dockerignore`` beside the Dockerfile (``app.Dockerfile.dockerignore``) takes
  precedence over ``<context>/.dockerignore``.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from lamina.bounded import TEXT_LIMIT, read_file_at_most
from lamina.errors import LaminaError


@dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                if i >= n:
                    out.append(".*")
                else:
                    out.append("(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i < n:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append(re.escape("\\"))
        elif ch == "[":
            end = pattern.find("]", i + 1 if i < n and pattern[i] in "!^" else i)
            if end == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(ch))
    out.append("$")
    try:
        return re.compile("".join(out))
    except re.error as e:
        raise LaminaError(f"invalid .dockerignore pattern {pattern!r}: {e}") from None


def parse_patterns(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.removeprefix("\ufeff").splitlines():
        if raw.startswith("#"):
            continue
        line = raw.strip()
        if not line:
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        if not line:
            continue
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        patterns.append(Pattern(("!" if exclusion else "") + line, exclusion, _compile(line)))
    return patterns


class IgnoreRules:
    """Answers "is this context path excluded?" with docker's last-match-wins rule."""

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns
        self.has_exclusions = any(p.exclusion for p in patterns)

    @classmethod
    def from_text(cls, text: str) -> IgnoreRules:
        return cls(parse_patterns(text))

    @classmethod
    def for_build(cls, context: Path, dockerfile: Path | None) -> IgnoreRules:
        """The rules for a build: ``<Dockerfile>.dockerignore`` first, then ``context/.dockerignore``."""
        candidates = []
        if dockerfile is not None:
            candidates.append(dockerfile.with_name(dockerfile.name + ".dockerignore"))
        candidates.append(context / ".dockerignore")
        for path in candidates:
            try:
                data = read_file_at_most(str(path), TEXT_LIMIT)
                return cls.from_text(data.decode("utf-8", "surrogateescape"))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise LaminaError(f"cannot read {path}: {e.strerror}") from None
        return cls([])

    def excluded(self, relpath: str) -> bool:
        """True when ``relpath`` (relative to the context, ``/``-separated) is excluded."""
        path = posixpath.normpath(relpath).lstrip("/")
        if path in (".", ""):
            return False
        parents = path.split("/")[:-1]
        matched = False
        for pattern in self.patterns:
            # An inclusion cannot change an already-excluded path, nor an exclusion a kept one.
            if pattern.exclusion != matched:
                continue
            match = bool(pattern.regex.match(path))
            if not match:
                for i in range(len(parents)):
                    if pattern.regex.match("/".join(parents[: i + 1])):
                        match = True
                        break
            if match:
                matched = not pattern.exclusion
        return matched

    def may_skip_directory(self, relpath: str) -> bool:
        """True when a whole directory can be skipped: excluded, and no ``!`` rule could bring back
        anything inside it."""
        return not self.has_exclusions and self.excluded(relpath)
