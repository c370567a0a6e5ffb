"""The container's last output is never lost: it may be written, and the container gone, between
the relay's wait for data and its check that the container has exited (seen in CI as an empty
``run --rm`` output under load). Each test makes that happen on purpose, inside ``finished()``."""

from __future__ import annotations

import os
import pty

from runner import tty


def test_copy_output_takes_what_was_written_just_before_the_exit() -> None:
    r, w = os.pipe()
    other_holder = os.dup(w)  # something outside the container still holds a write end: no EOF
    got: list[bytes] = []

    def finished() -> bool:
        if not got:
            os.write(w, b"last words\n")
        return True

    try:
        tty.copy_output({r: got.append}, finished)
    finally:
        for fd in (r, w, other_holder):
            os.close(fd)
    assert b"".join(got) == b"last words\n"


def test_relay_takes_what_the_pty_holds_when_the_container_is_gone() -> None:
    master, slave = pty.openpty()
    out_r, out_w = os.pipe()
    written = False

    def finished() -> bool:
        nonlocal written
        if not written:
            os.write(slave, b"bye\n")
            written = True
        return True

    try:
        tty.relay(master, None, out_w, finished)
        os.close(out_w)
        shown = os.read(out_r, 4096)
    finally:
        for fd in (master, slave, out_r):
            os.close(fd)
    assert shown.replace(b"\r", b"") == b"bye\n"
