"""What the command line asks for, found before anything else is imported.

Kept free of imports beyond the interpreter's start-up set: :mod:`lamina.launch` reads the verb
from here to decide, within milliseconds of start, whether to fork the union filesystem server.
"""

from __future__ import annotations

from collections.abc import Sequence

GLOBAL_OPTIONS_WITH_VALUE = ("--root", "--log-level")


def requested_verb(argv: Sequence[str]) -> str | None:
    """The verb on the command line (the first word that is not a global option or its value)."""
    words = requested_words(argv, 1)
    return words[0] if words else None


def requested_words(argv: Sequence[str], count: int) -> list[str]:
    """The first ``count`` words of the command line that are not options (nor a global option's
    value): the verb, or a command group and its sub-verb (``image ls``)."""
    words: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in GLOBAL_OPTIONS_WITH_VALUE and not words:
            skip_next = True
        elif not arg.startswith("-"):
            words.append(arg)
            if len(words) == count:
                break
    return words
