"""What the command line asks for, found before anything else is imported.

Kept free of imports beyond the interpreter's start-up set: :mod:`lamina.launch` reads the verb
from here to decide, within milliseconds of start, whether to fork the union filesystem server.
"""

from __future__ import annotations

from collections.abc import Sequence

GLOBAL_OPTIONS_WITH_VALUE = ("--root", "--log-level")


def requested_verb(argv: Sequence[str]) -> str | None:
    """The verb on the command line (the first word that is not a global option or its value)."""
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in GLOBAL_OPTIONS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-"):
            return arg
    return None
