"""The host side of a container's pty: raw mode, window size, copying bytes both ways.

The pty is made inside the container, of its own devpts, and only its master comes here
(:func:`receive_terminal`). The container has the slave side as its controlling terminal, so Ctrl-C typed here is a 0x03
byte that the container's line discipline turns into SIGINT for its foreground process group,
exactly as with ``docker run -it``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import termios
import tty
from collections.abc import Callable, Iterator

from lamina.errors import ContainerError, LaminaError


class NotATerminal(LaminaError):
    exit_code = 1  # docker's client


def check_tty(interactive: bool, use_tty: bool) -> None:
    """docker's CheckTty: ``-it`` needs a terminal on stdin."""
    if interactive and use_tty and not os.isatty(0):
        raise NotATerminal("the input device is not a TTY")


def receive_terminal(sock: socket.socket) -> int:
    """The pty master a container's init (or an exec helper) sent on ``sock``; it was made inside
    the container, so it is checked to be a terminal before it is used. Close-on-exec."""
    try:
        _data, fds, _flags, _address = socket.recv_fds(sock, 16, 4)
    except OSError as e:
        raise ContainerError(f"the container did not hand over its terminal: {e.strerror}") from None
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        raise ContainerError("the container did not hand over its terminal")
    master = fds[0]
    os.set_inheritable(master, False)
    if not os.isatty(master):
        os.close(master)
        raise ContainerError("the container handed over something that is not a terminal")
    return master


def copy_window_size(source_fd: int, master: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)


def set_window_size(master: int, rows: int, cols: int) -> None:
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put ``fd`` in raw mode when it is a terminal; restore it afterwards."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    # TCSANOW, not the default TCSAFLUSH: what the user typed ahead belongs to the container.
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(master: int, stdin_fd: int | None, stdout_fd: int | None, finished: Callable[[], bool],
          copy_to: Callable[[bytes], None] | None = None,
          input_filter: Callable[[bytes], tuple[bytes, bool]] | None = None) -> bool:
    """Copy ``stdin_fd`` -> master and master -> ``stdout_fd`` until the pty's slave side is closed
    (or nothing arrives and ``finished()`` says the container is gone); True when it stopped
    because ``input_filter`` (what to send on of the input, and whether to stop: the detach keys)
    said so, False otherwise.

    ``stdin_fd`` None means the container's input is not attached (``-t`` without ``-i``);
    ``stdout_fd`` None that nobody watches it live (``run -d``). When stdin is a terminal, its window
    size is copied now and on every SIGWINCH. ``copy_to`` also gets every chunk of output (the log).
    """
    if stdin_fd is not None and os.isatty(stdin_fd):
        copy_window_size(stdin_fd, master)
        previous = signal.signal(signal.SIGWINCH, lambda *_: copy_window_size(stdin_fd, master))
    else:
        previous = None
    inputs = [master] + ([stdin_fd] if stdin_fd is not None else [])
    drained = False
    try:
        while True:
            try:
                readable, _, _ = select.select(inputs, [], [], 0 if drained else 0.2)
            except InterruptedError:
                continue
            if master in readable:
                data = read_master(master)
                if not data:
                    return False
                if stdout_fd is not None:
                    write_all(stdout_fd, data)
                if copy_to is not None:
                    copy_to(data)
            if stdin_fd is not None and stdin_fd in readable:
                data = os.read(stdin_fd, 65536)
                stop = False
                if data and input_filter is not None:
                    data, stop = input_filter(data)
                    if not data and not stop:
                        continue  # held back: maybe the start of the detach keys
                if data:
                    write_all(master, data)
                if stop:
                    return True
                if not data:
                    inputs.remove(stdin_fd)
                    # End of input: send EOF to the container's terminal, as docker does.
                    with contextlib.suppress(OSError):
                        write_all(master, b"\x04")
            if not readable:
                if drained:
                    return False
                # As in copy_output: output written just before the exit is still in the pty.
                if finished():
                    drained = True
                    inputs = [master]  # nobody reads the container's input any more
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)


def copy_output(pipes: dict[int, Callable[[bytes], None]], finished: Callable[[], bool]) -> None:
    """Hand what arrives on each pipe (read end -> consumer) to its consumer, in the order it arrives,
    until every pipe reaches end of file: all the container's processes are gone. Should something
    outside the container hold a write end, ``finished()`` ends the wait once nothing arrives."""
    open_pipes = dict(pipes)
    timeout: float = 0.2
    while open_pipes:
        readable, _, _ = select.select(list(open_pipes), [], [], timeout)
        if not readable:
            if timeout == 0:
                return
            # The container may have written its last output and exited between the wait above
            # and this check: once it is gone, take what the pipes still hold, without waiting.
            if finished():
                timeout = 0
            continue
        for fd in readable:
            data = os.read(fd, 65536)
            if data:
                open_pipes[fd](data)
            else:
                del open_pipes[fd]


def read_master(master: int) -> bytes:
    """What the pty's master has; b"" once every slave is closed (the kernel says EIO then)."""
    try:
        return os.read(master, 65536)
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return b""


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a pipe or terminal may take it in parts)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
