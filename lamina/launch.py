"""The ``lamina`` program's entry point: fork the union server first, then load the command line.

A foreground ``lamina run`` spends most of its start-up importing: lamina's own packages here, and
pyfuse3 and trio in the union filesystem server. The server is therefore forked before anything
else is imported (:func:`runner.unionserver.maybe_prefork`), so that on two cores both sets of
imports run at once; importing :mod:`lamina.cli` first (argparse, logging, re) would put ~30 ms in
front of the server's start. Everything else is :func:`lamina.cli.main`.
"""

from __future__ import annotations

import sys

from lamina.argv import requested_verb


def main() -> int:
    verb = requested_verb(sys.argv[1:])
    if verb == "run":
        from runner.unionserver import maybe_prefork

        maybe_prefork(sys.argv[1:])
    elif verb == "mount":  # of an image in a registry: the lazy layer server (lamina.lazy.prefork)
        from lamina.lazy.prefork import maybe_prefork as maybe_prefork_lazy

        maybe_prefork_lazy(sys.argv[1:])
    from lamina.cli import main as cli_main

    return cli_main()
