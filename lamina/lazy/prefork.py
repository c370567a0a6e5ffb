"""Start the lazy layer server before the ``lamina mount`` command has even been parsed.

``lamina mount HOST/REPO:TAG`` is ready when the layer server has fetched the TOCs and mounted, and
that server first spends a few hundred milliseconds importing (trio, pyfuse3, the registry client).
So does the ``lamina`` command itself before it knows what to mount. :func:`maybe_prefork`, called
by :mod:`lamina.launch` first thing, starts the server at once when the command line looks like a
mount of a registry reference; both import at the same time, and the server then waits on its
standard input for its spec (:func:`lamina.lazy.serve.main` with ``--stdin``). A guess that turns
out wrong (the name is an image of the store, the command fails) costs one idle process, which
exits when its standard input closes: at the latest, when this process exits.

Resource handling: :func:`take` hands the preforked process to the caller, who must either
:func:`start` it or close its stdin (:func:`discard`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_preforked: subprocess.Popen[bytes] | None = None


def _looks_remote(word: str) -> bool:
    first = word.split("/", 1)[0]
    return "/" in word and not word.startswith("-") and ("." in first or ":" in first or first == "localhost")


def maybe_prefork(argv: list[str]) -> None:
    """Prefork when ``argv`` (lamina's arguments) is ``mount`` of something that names a registry."""
    global _preforked
    from lamina.argv import requested_words

    words = requested_words(argv, 2)
    if len(words) != 2 or words[0] != "mount" or not _looks_remote(words[1]):
        return
    try:
        _preforked = subprocess.Popen([sys.executable, "-m", "lamina.lazy.serve", "--stdin"],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError:
        _preforked = None


def take() -> subprocess.Popen[bytes] | None:
    """The preforked server, if any and still waiting (it then belongs to the caller)."""
    global _preforked
    process, _preforked = _preforked, None
    if process is not None and process.poll() is not None:
        return None
    return process


def start(process: subprocess.Popen[bytes], spec: Path, mountpoint: Path, log_path: Path) -> int:
    """Hand a preforked server its work; its pid. The server sends its output to ``log_path``."""
    assert process.stdin is not None
    message = json.dumps({"spec": str(spec), "mountpoint": str(mountpoint), "log": str(log_path)})
    process.stdin.write(message.encode() + b"\n")
    process.stdin.close()
    # Detached on purpose; stop Popen's finaliser from warning that it still runs.
    process.returncode = 0
    return process.pid


def discard() -> None:
    """Let a preforked server that will not be used go (it exits at the end of its input)."""
    process = take()
    if process is not None and process.stdin is not None:
        process.stdin.close()
        process.returncode = 0
