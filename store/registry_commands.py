"""Command-line verbs for registries (pull, push, login), registered into the ``lamina`` parser."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's verbs to ``lamina``. Each verb sets ``handler(args) -> int``."""
