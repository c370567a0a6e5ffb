"""Run a command with ``podman`` meaning podman in a private, throwaway environment.

    python -m bench.outside.podman_wrapper BINDIR -- COMMAND [ARGS...]

Writes ``BINDIR/podman``, a script that runs podman with every piece of its state under a temporary
directory (:mod:`bench.podman_env`), puts BINDIR first on PATH, runs COMMAND, and removes the
environment afterwards. For outside suites that call ``podman`` (or ``$PODMAN``) by name.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench.podman_env import open_podman_env


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    bindir = Path(argv[0])
    command = argv[2:]
    bindir.mkdir(parents=True, exist_ok=True)
    with open_podman_env(storage_driver="vfs") as env:
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.environment().items())
        wrapper = bindir / "podman"
        wrapper.write_text(f"#!/bin/sh\n{exports}exec {shlex.join(env.argv([]))} \"$@\"\n")
        wrapper.chmod(0o755)
        path = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return subprocess.run(command, env={**os.environ, "PATH": path}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
