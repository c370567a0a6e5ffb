"""Attaching to a container's terminal, and detaching again (docker's ``ctrl-p,ctrl-q``).

The daemonised monitor of a ``-t`` container owns the pty's master and serves it on a Unix socket
in the container's directory (``attach.sock``; the directory is private to its owner). Any number
of clients may attach: each gets the container's output from the moment it attached, and what it
sends goes to the container's terminal. ``run -it`` and ``start -ai`` start such a monitor and
attach to it at once, so detaching (the detach keys typed on the client's terminal) leaves the
container running under its monitor, as with docker.

The socket carries frames: one kind byte, a 4-byte big-endian length, the payload. From clients:
``i`` input bytes, ``w`` a window size (rows, columns as two 16-bit numbers). From the monitor:
``o`` output bytes, ``x`` the container's exit code (4 bytes) just before it closes. The monitor
holds the output a ``run -it`` container writes before its client attaches (the first prompt),
up to :data:`HELD_OUTPUT_LIMIT` bytes, for that first client only.

Resource handling: :func:`serve_terminal` returns the clients still attached when the container's
terminal closed, for :func:`send_exit` to tell them the exit code and close them.
:func:`attach_terminal` restores the caller's terminal mode however it ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lamina.errors import ContainerError, ContainerNotFound, LaminaError
from runner import tty
from runner.state import CRASH_EXIT_CODE, Container, ContainerStore

SOCKET_NAME = "attach.sock"
HELD_OUTPUT_LIMIT = 1 << 20
MAX_FRAME = 1 << 20
CLIENT_SEND_TIMEOUT_S = 5.0
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"


class DetachKeysError(LaminaError):
    pass


class Detached(LaminaError):
    """The user typed the detach keys: the container runs on."""

    exit_code = 1  # docker attach's; run -it and start -ai end with 0 instead

    def __init__(self) -> None:
        super().__init__("read escape sequence")


def parse_detach_keys(text: str) -> bytes:
    """docker's detach keys: comma-separated ``ctrl-X`` (X in a-z, @, [, \\, ], ^, _) or single
    characters; ``ctrl-p,ctrl-q`` is the default."""
    keys = bytearray()
    for key in text.split(","):
        lowered = key.lower()
        if len(key) == 1:
            keys.append(ord(key))
        elif lowered.startswith("ctrl-") and len(key) == 6:
            char = lowered[5]
            if "a" <= char <= "z":
                keys.append(ord(char) - ord("a") + 1)
            elif char in "@[\\]^_":
                keys.append(ord(char) - ord("@"))
            else:
                raise DetachKeysError(f"Invalid detach keys ({text}) provided")
        else:
            raise DetachKeysError(f"Invalid detach keys ({text}) provided")
    if not keys:
        raise DetachKeysError(f"Invalid detach keys ({text}) provided")
    return bytes(keys)


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


class FrameReader:
    """Splits what arrives on a socket into (kind, payload) frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buffer += data
        while len(self._buffer) >= 5:
            (length,) = struct.unpack(">I", self._buffer[1:5])
            if length > MAX_FRAME:
                raise ValueError("oversized frame")
            if len(self._buffer) < 5 + length:
                return
            kind, payload = bytes(self._buffer[:1]), bytes(self._buffer[5:5 + length])
            del self._buffer[:5 + length]
            yield kind, payload


def _socket_path(directory_fd: int) -> str:
    # The container's directory may be deeper than a socket address allows (108 bytes).
    return f"/proc/self/fd/{directory_fd}/{SOCKET_NAME}"


def open_listener(directory: Path) -> socket.socket:
    """The monitor's listening socket in the container's ``directory``."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME, dir_fd=dir_fd)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(_socket_path(dir_fd))
        listener.listen(8)
    finally:
        os.close(dir_fd)
    return listener


def connect(directory: Path) -> socket.socket:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(_socket_path(dir_fd))
        except OSError:
            sock.close()
            raise
    finally:
        os.close(dir_fd)
    return sock


# --- the monitor's side ---------------------------------------------------------------------------


class _Clients:
    def __init__(self) -> None:
        self.readers: dict[socket.socket, FrameReader] = {}

    def add(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_SEND_TIMEOUT_S)
        self.readers[conn] = FrameReader()

    def drop(self, conn: socket.socket) -> None:
        self.readers.pop(conn, None)
        conn.close()

    def send(self, data: bytes) -> None:
        for conn in list(self.readers):
            try:
                conn.sendall(data)
            except OSError:  # gone, or too slow to keep up: detached
                self.drop(conn)


def serve_terminal(master: int, listener: socket.socket, copy_to: Callable[[bytes], None],
                   finished: Callable[[], bool], hold_output: bool) -> list[socket.socket]:
    """Copy the container's terminal output to ``copy_to`` and to every attached client, and the
    clients' input to the terminal, until the terminal's last slave closes."""
    clients = _Clients()
    held: bytearray | None = bytearray() if hold_output else None
    while True:
        watched: list[Any] = [master, listener, *clients.readers]
        try:
            readable, _, _ = select.select(watched, [], [], 0.2)
        except InterruptedError:
            continue
        if master in readable:
            data = tty.read_master(master)
            if not data:
                return list(clients.readers)
            copy_to(data)
            clients.send(frame(b"o", data))
            if held is not None and len(held) < HELD_OUTPUT_LIMIT:
                held += data[:HELD_OUTPUT_LIMIT - len(held)]
        if listener in readable:
            conn, _ = listener.accept()
            clients.add(conn)
            if held is not None:
                clients.send(frame(b"o", bytes(held)))
                held = None
        for conn in [c for c in readable if isinstance(c, socket.socket) and c in clients.readers]:
            _serve_client(conn, clients, master)
        if not readable and finished():
            return list(clients.readers)


def _serve_client(conn: socket.socket, clients: _Clients, master: int) -> None:
    try:
        data = conn.recv(65536)
        if not data:
            clients.drop(conn)
            return
        for kind, payload in clients.readers[conn].feed(data):
            if kind == b"i":
                tty.write_all(master, payload)
            elif kind == b"w" and len(payload) == 4:
                rows, cols = struct.unpack(">HH", payload)
                tty.set_window_size(master, rows, cols)
    except (OSError, ValueError):
        clients.drop(conn)


def send_exit(clients: list[socket.socket], code: int) -> None:
    for conn in clients:
        with contextlib.suppress(OSError):
            conn.sendall(frame(b"x", struct.pack(">i", code)))
        conn.close()


# --- the client's side ----------------------------------------------------------------------------


class EscapeMatcher:
    """docker's escape proxy: bytes that may begin the detach keys are held back until they do
    (detach) or do not (they are sent after all)."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self.held = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """What to send on, and whether the keys were typed (the rest is then dropped)."""
        out = bytearray()
        for byte in data:
            if byte == self.keys[len(self.held)]:
                self.held.append(byte)
                if len(self.held) == len(self.keys):
                    return bytes(out), True
                continue
            out += self.held
            self.held.clear()
            if byte == self.keys[0]:
                self.held.append(byte)
            else:
                out.append(byte)
        return bytes(out), False


def _window_size_frame(fd: int) -> bytes | None:
    try:
        import fcntl
        import termios

        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return frame(b"w", struct.pack(">HH", rows, cols))


def attach_terminal(sock: socket.socket, detach_keys: bytes, stdin_fd: int | None, stdout_fd: int) -> int | None:
    """Relay this process's terminal to the container's: the container's exit code when it ends,
    None when the monitor went away without one. Raises :class:`Detached` on the detach keys."""
    size_source = stdin_fd if stdin_fd is not None and os.isatty(stdin_fd) else stdout_fd
    previous = None
    if os.isatty(size_source):
        def resize(*_: object) -> None:
            size = _window_size_frame(size_source)
            if size is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(size)

        resize()
        previous = signal.signal(signal.SIGWINCH, resize)
    raw = stdin_fd is not None and os.isatty(stdin_fd)
    try:
        with tty.raw_terminal(stdin_fd) if raw and stdin_fd is not None else contextlib.nullcontext():
            return _relay(sock, EscapeMatcher(detach_keys), stdin_fd, stdout_fd)
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)


def _relay(sock: socket.socket, matcher: EscapeMatcher, stdin_fd: int | None, stdout_fd: int) -> int | None:
    reader = FrameReader()
    inputs: list[int | socket.socket] = [sock] + ([stdin_fd] if stdin_fd is not None else [])
    while True:
        try:
            readable, _, _ = select.select(inputs, [], [])
        except InterruptedError:
            continue
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                return None
            for kind, payload in reader.feed(data):
                if kind == b"o":
                    tty.write_all(stdout_fd, payload)
                elif kind == b"x":
                    (code,) = struct.unpack(">i", payload)
                    return int(code)
        if stdin_fd is not None and stdin_fd in readable:
            data = os.read(stdin_fd, 65536)
            if not data:
                inputs.remove(stdin_fd)
                sock.sendall(frame(b"i", b"\x04"))  # end of input: EOF on the terminal, as docker
                continue
            send, detach = matcher.feed(data)
            if send:
                sock.sendall(frame(b"i", send))
            if detach:
                raise Detached()


def attach_session(container: Container, keys: bytes, interactive: bool, store: ContainerStore) -> int:
    """Attach this process's stdin/stdout to ``container``'s terminal until it exits (its exit code)
    or the detach keys are typed (:class:`Detached`)."""
    try:
        sock = connect(container.directory)
    except OSError as e:
        raise ContainerError(f"cannot attach to container {container.name}: {e.strerror}") from None
    with sock:
        code = attach_terminal(sock, keys, 0 if interactive else None, 1)
    if code is not None:
        return code
    # The monitor went away without a word (killed): its record says what happened.
    while True:
        try:
            fresh = store.get(container.id)
        except ContainerNotFound:
            return CRASH_EXIT_CODE
        if not fresh.running:
            return fresh.state.exit_code if fresh.state.exit_code is not None else CRASH_EXIT_CODE
        time.sleep(0.05)
