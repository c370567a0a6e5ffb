"""How a build answers SIGINT and SIGTERM: it stops, as ``docker build`` does on Ctrl-C or a CI cancel.

Wherever the signal lands, the build ends with one line (:class:`BuildInterrupted`, exit 128+N),
nothing is tagged, the store keeps only what it would keep after a failed step (layers of finished
steps, as cache), and the step's temporary directories are removed. How it gets there depends on
what the build is doing when the signal comes:

- Its own Python work (parsing, hashing the context, copying files, pulling): the handler raises
  :class:`Interrupt` at once, as SIGINT's ``KeyboardInterrupt`` would. It is a ``BaseException``,
  so no ``except LaminaError`` on its way mistakes it for a failure to recover from (a pull error
  falls back to the local image, for instance); :func:`builder.build.build` turns it into
  :class:`BuildInterrupted` at the top.
- Inside a :meth:`Interruption.deferred` block (a RUN step's sandbox, the user-namespace helpers,
  writes to the store and the cache, removing temporary directories): an exception raised between
  any two lines of code that forks, pipes and cleans up could leave a process or a half-written
  file behind, so the signal is only noted and :class:`Interrupt` is raised when the block ends. A
  RUN's sandbox is not left to finish meanwhile: while it is set up, the noted signal cancels the
  start (the ``cancel`` check of :func:`runner.sandbox.start_sandbox`: the command never runs), and
  once its command runs, the command is killed (:meth:`Interruption.stopping`). Killed, not sent the
  signal: the command is PID 1 of its PID namespace, and the kernel drops a SIGINT or SIGTERM sent
  to it from outside while it has no handler for it (a shell that has not installed its own yet).
- Recording the image (:meth:`Interruption.commit`): past that point the build has succeeded and a
  signal changes nothing.

A second signal while the first one is being acted on (cleaning up) is noted and nothing more.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lamina.errors import BuildError, LaminaError

if TYPE_CHECKING:
    from runner.sandbox import Sandbox

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt(BaseException):
    """Unwinds the build after a SIGINT or SIGTERM, as KeyboardInterrupt does; see the module docstring."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class BuildInterrupted(BuildError):
    """The build was stopped by a signal; nothing was tagged."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"build interrupted by {signal.Signals(signum).name}{where}; nothing was tagged")
        self.signum = signum
        self.exit_code = 128 + signum


class Interruption:
    """A build's signal state: the signal that came (if any) and what it must stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._raised = False
        self._deferring = 0
        self._committing = False
        self._sandbox: Sandbox | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM in the block (main thread only: elsewhere nothing is installed).

        A signal that was ignored when the build started (``nohup``, a shell's background job for
        SIGINT) stays ignored, as it would for any other program."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for sig in INTERRUPTING_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle(self, signum: int, _frame: object) -> None:
        """The handler of SIGINT and SIGTERM (see the module docstring for what it does when)."""
        if self.signum is None:
            self.signum = signum
        if self._sandbox is not None:
            self._sandbox.send_signal(signal.SIGKILL)
        if not self._deferring and not self._committing:
            self._raise()

    def _raise(self, cause: BaseException | None = None) -> None:
        if self.signum is not None and not self._raised and not self._committing:
            self._raised = True
            raise Interrupt(self.signum) from cause

    def cancel_signal(self) -> int | None:
        """The signal that came, if any: the ``cancel`` check of a RUN's sandbox start."""
        return self.signum

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal in the block is acted on when the block ends. A :class:`LaminaError` the block
        raises after a signal came (a RUN that failed because the signal killed it, a start that it
        cancelled) becomes the :class:`Interrupt`: the signal is why it failed."""
        self._deferring += 1
        failure: LaminaError | None = None
        try:
            yield
        except LaminaError as e:
            # After commit() signals are ignored, so the error is the build's own: never drop it.
            if self.signum is None or self._raised or self._committing:
                raise
            failure = e
        finally:
            self._deferring -= 1
        self._raise(failure)

    @contextmanager
    def stopping(self, sandbox: Sandbox) -> Iterator[None]:
        """In the block, a signal kills ``sandbox``'s command (one that came before it does at once)."""
        self._sandbox = sandbox
        try:
            if self.signum is not None:
                sandbox.send_signal(signal.SIGKILL)
            yield
        finally:
            self._sandbox = None

    def commit(self) -> None:
        """The image is about to be recorded: raise if a signal came, else ignore signals from now on."""
        self._raise()
        self._committing = True
