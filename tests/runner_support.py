"""Small helpers shared by the runner's tests."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import fuse_mounts_under

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]


def lamina_on_root(lamina_cmd: Lamina, root: Path, remove_volumes: bool = False) -> Iterator[Lamina]:
    """For a fixture: ``lamina(*args, check=False)`` on the store at ``root``; afterwards removes every
    container (and volume, when ``remove_volumes``) and checks that nothing stays mounted."""

    def run(*args: str, check: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return lamina_cmd(*args, root=root, check=check, **kwargs)

    yield run
    ids = run("ps", "-aq").stdout.split()
    if ids:
        run("rm", "-f", *(["-v"] if remove_volumes else []), *ids)
    if remove_volumes:
        run("volume", "prune", "-a", "-f")
    assert fuse_mounts_under(root) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get_eventually(url: str, timeout: float = 10) -> str:
    """The body at ``url``, retried until the server answers (a container that is still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_until(fd: int, needle: bytes, timeout: float = 20, seen: bytes = b"") -> bytes:
    """Read from a pty master until ``needle`` appears (fails the test after ``timeout``)."""
    data = seen
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r}; got {data!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            data += chunk
    assert needle in data, f"{needle!r} not in {data!r}"
    return data


@contextlib.contextmanager
def on_pty(argv: list[str], rows: int = 24, cols: int = 80,
           **popen_kwargs: Any) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``argv`` with a new pty as its terminal; yields (process, master); always reaps it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            **popen_kwargs)
    os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
