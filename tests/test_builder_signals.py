"""SIGINT and SIGTERM while a build or a foreground ``run`` is under way, wherever they land.

A signal sent from outside lands wherever the process happens to be, so a test that sleeps and then
signals tests a different phase on a fast machine and on a loaded one. Here the signal is raised by
the lamina process itself at a chosen point: a small driver installs a hook (on a debug log message
that marks a phase of the sandbox's set-up, or on a function of the builder) that sends the signal
to its own process the first time it is reached, then runs lamina's command line. The signal is
then handled right there, as an outside one arriving at that moment would be, on any machine.
(tests/test_e2e_docker_flow.py sends real signals from outside, at times that may land anywhere.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.interruption import BuildInterrupted, Interrupt, Interruption
from harness import REPO_ROOT, fuse_mounts_under, make_busybox_rootfs
from lamina.errors import BuildError
from runner.sandbox import SandboxSpec, SignalForwarder, StartInterrupted, start_sandbox

IMAGE = "lamina/busybox"

# Runs lamina's command line (argv[3:]) after arranging for signal argv[2] to be sent to this
# process the first time the trigger argv[1] is reached: "log:LOGGER:MESSAGE" (a log call with
# that format string) or "call:MODULE:QUALNAME" (a call of that function).
DRIVER = r"""
import importlib, logging, os, sys

trigger, signum, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
me = os.getpid()
fired = []


def fire():
    if os.getpid() == me and not fired:  # never in a forked child (the sandbox's keeper logs too)
        fired.append(True)
        print(f"driver: signal {signum} at {trigger}", file=sys.stderr)
        os.kill(me, signum)


kind, _, where = trigger.partition(":")
if kind == "log":
    logger_name, _, message = where.partition(":")

    class Hook(logging.Handler):
        def emit(self, record):
            if record.msg == message:
                fire()

    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(Hook())
else:
    module_name, _, qualname = where.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        fire()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)

from lamina.cli import main

sys.exit(main(argv))
"""

# The phases of a sandbox's start, as runner.sandbox logs them (in the lamina process).
NAMESPACES_MAPPED = "log:runner.sandbox:sandbox: namespaces made and id maps written"
ROOT_PREPARED = "log:runner.sandbox:sandbox: root prepared"
COMMAND_MAY_START = "log:runner.sandbox:sandbox: the command may start"
COMMAND_STARTED = "log:runner.sandbox:sandbox: command started as pid %d"
SETUP_PHASES = [NAMESPACES_MAPPED, ROOT_PREPARED, COMMAND_MAY_START]
SETUP_IDS = ["namespaces-mapped", "root-prepared", "after-go"]


def drive(root: Path, trigger: str, signum: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``lamina --root ROOT ARGS`` with ``signum`` raised at ``trigger``; return it once done."""
    argv = [sys.executable, "-c", DRIVER, trigger, str(int(signum)), "--root", str(root), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL,
                            # As from a terminal: a shell's background job would inherit SIGINT ignored.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "Traceback" not in result.stderr, result.stderr
    assert f"driver: signal {int(signum)} at {trigger}" in result.stderr, "the trigger was never reached"
    return result


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("driver: ")]


def assert_no_process_running(marker: str) -> None:
    """No process's command line holds ``marker`` (one argument: /proc separates them with NULs), so
    the killed RUN or container command is gone."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if marker.encode() in cmdline:
                    left.append(entry.name)
        if not left:
            return
        assert time.monotonic() < deadline, f"still running: pids {left} ({marker})"
        time.sleep(0.1)


# --- pure: the signal state of a build and of a foreground run -------------------------------------


class FakeSandbox:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def test_a_signal_outside_deferred_work_raises_at_once() -> None:
    interruption = Interruption()
    with pytest.raises(Interrupt) as raised:
        interruption.handle(signal.SIGTERM, None)
    assert raised.value.signum == signal.SIGTERM
    interruption.handle(signal.SIGINT, None)  # a second signal while unwinding: noted, nothing more
    assert interruption.signum == signal.SIGTERM


def test_a_deferred_signal_kills_the_sandbox_and_ends_the_block() -> None:
    interruption = Interruption()
    sandbox = FakeSandbox()
    with pytest.raises(Interrupt) as raised, interruption.deferred():
        assert interruption.cancel_signal() is None
        interruption.handle(signal.SIGINT, None)
        assert interruption.cancel_signal() == signal.SIGINT  # a sandbox starting now is not started
        with interruption.stopping(sandbox):
            assert sandbox.signals == [signal.SIGKILL]  # the signal came first: killed at once
            interruption.handle(signal.SIGINT, None)
        interruption.handle(signal.SIGINT, None)  # no sandbox any more
        raise BuildError("the command '...' returned a non-zero code: 137")  # what the killed RUN says
    assert sandbox.signals == [signal.SIGKILL, signal.SIGKILL]
    assert isinstance(raised.value.__cause__, BuildError)


def test_without_a_signal_deferred_work_fails_as_it_would() -> None:
    interruption = Interruption()
    with pytest.raises(BuildError), interruption.deferred():
        raise BuildError("returned a non-zero code: 1")
    with interruption.deferred():
        pass


def test_once_the_image_is_being_recorded_signals_change_nothing() -> None:
    interruption = Interruption()
    interruption.commit()
    interruption.handle(signal.SIGTERM, None)  # would raise Interrupt before the commit
    assert interruption.signum == signal.SIGTERM  # noted, but nothing is stopped
    with interruption.deferred():  # the build's last clean-up ends without an Interrupt
        pass


@pytest.mark.xfail(strict=True, reason="builder.interruption: after commit(), deferred() drops a "
                   "LaminaError raised once a signal came (its _raise(failure) is a no-op then)")
def test_a_failure_after_the_commit_is_not_lost_to_a_signal() -> None:
    interruption = Interruption()
    interruption.commit()
    interruption.handle(signal.SIGTERM, None)
    with pytest.raises(BuildError), interruption.deferred():  # the clean-up's failure stays itself
        raise BuildError("could not remove the build's scratch directory")


def test_interrupted_message_and_exit_code() -> None:
    error = BuildInterrupted(signal.SIGINT, " at step 2/2")
    assert str(error) == "build interrupted by SIGINT at step 2/2; nothing was tagged"
    assert error.exit_code == 130


def test_forwarder_keeps_stop_signals_that_come_before_the_sandbox() -> None:
    forwarder = SignalForwarder()
    forwarder.handle(signal.SIGUSR1, None)
    assert forwarder.stop_signal() is None  # not a stop signal: sent once the command runs
    forwarder.handle(signal.SIGTERM, None)
    forwarder.handle(signal.SIGINT, None)
    assert forwarder.stop_signal() == signal.SIGTERM


# --- runner.sandbox: the start's cancel checks, on a plain root (no FUSE server whose end would
# take the command down anyway) ---------------------------------------------------------------------

CANCEL_CHECKS = 4  # before anything, before mounting, before "go", after the exec


@pytest.mark.root
@pytest.mark.parametrize("init", [False, True], ids=["plain", "init"])
@pytest.mark.parametrize("check", range(CANCEL_CHECKS), ids=["first", "before-mount", "before-go", "after-exec"])
def test_a_cancelled_start_runs_nothing_and_leaves_nothing(tmp_path: Path, check: int, init: bool) -> None:
    rootfs = make_busybox_rootfs(tmp_path / "root")
    asked = 0

    def cancel() -> int | None:  # a SIGTERM came just before check number `check`
        nonlocal asked
        asked += 1
        return signal.SIGTERM if asked > check else None

    marker = f"30.{check}{int(init)}7"  # a sleep length of this case only, to look for in /proc
    with pytest.raises(StartInterrupted) as raised:
        start_sandbox(SandboxSpec(argv=["sh", "-c", f"touch /tmp/ran; exec sleep {marker}"], rootfs=rootfs,
                                  network="none", init=init), cancel=cancel)
    assert raised.value.exit_code == 143
    assert asked == check + 1
    if check < CANCEL_CHECKS - 1:
        assert not (rootfs / "tmp" / "ran").exists()  # cancelled before "go": the command never ran
    assert_no_process_running(marker)  # after the exec: killed, with its --init reaper


# --- lamina build -------------------------------------------------------------------------------------

RUN_MARKER = "20.321"  # the RUN's sleep, to find it in /proc
SLOW_RUN = f"FROM {IMAGE}\nRUN echo started; sleep {RUN_MARKER}; echo finished\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("signals")
    root = base / "root"
    (base / "Dockerfile").write_text(f"FROM {IMAGE}\n")
    built = lamina(root, "build", "-q", str(base))  # the base image is made on first use
    assert built.returncode == 0, built.stderr
    return root


def context(tmp_path: Path, dockerfile: str) -> Path:
    (tmp_path / "Dockerfile").write_text(dockerfile)
    (tmp_path / "file.txt").write_text("copied\n")
    return tmp_path


def assert_build_interrupted(result: subprocess.CompletedProcess[str], root: Path, signum: int,
                             images_before: str) -> None:
    assert result.returncode == 128 + signum, (result.stdout, result.stderr)
    name = signal.Signals(signum).name
    assert error_lines(result.stderr) == [f"lamina: error: build interrupted by {name} at step 2/2; "
                                          "nothing was tagged"], result.stderr
    assert "finished" not in result.stdout.splitlines() and "Successfully tagged" not in result.stdout
    assert lamina(root, "images", "-q").stdout == images_before
    assert "signals/cancelled" not in lamina(root, "images").stdout
    assert list((root / "tmp").iterdir()) == []  # the step's upper, work and mount directories
    assert fuse_mounts_under(root) == []
    assert_no_process_running(RUN_MARKER)


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("trigger", [
    "call:builder.running:run_step",  # the builder's own work: the step's mounts, the spec
    *SETUP_PHASES,
    COMMAND_STARTED,  # the command runs: it is killed
], ids=["before-sandbox", *SETUP_IDS, "command-started"])
def test_a_signal_anywhere_in_a_run_step_stops_the_build(root: Path, tmp_path: Path, trigger: str,
                                                          signum: int) -> None:
    images = lamina(root, "images", "-q").stdout
    started = time.monotonic()
    result = drive(root, trigger, signum, "build", "--no-cache", "-t", "signals/cancelled",
                   str(context(tmp_path, SLOW_RUN)))
    assert time.monotonic() - started < 15  # not after the RUN's 20 s
    assert_build_interrupted(result, root, signum, images)
    if trigger in (*SETUP_PHASES[:2], "call:builder.running:run_step"):
        assert "started" not in result.stdout.splitlines()  # cancelled before "go": the command never ran


@pytest.mark.fuse
@pytest.mark.parametrize(("dockerfile", "trigger"), [
    (f"FROM {IMAGE}\nRUN echo made > /made\n", "call:builder.workspace:Workspace.commit_upper"),
    (f"FROM {IMAGE}\nCOPY file.txt /\n", "call:lamina.store.store:Store.commit_layer"),
    (f"FROM {IMAGE}\nCOPY file.txt /\n", "call:builder.copying:copy_into_layer"),
], ids=["RUN-commit", "COPY-commit", "COPY"])
def test_a_signal_while_a_layer_is_made_stops_the_build_after_it(root: Path, tmp_path: Path, dockerfile: str,
                                                                  trigger: str) -> None:
    images = lamina(root, "images", "-q").stdout
    result = drive(root, trigger, signal.SIGTERM, "build", "--no-cache", "-t", "signals/cancelled",
                   str(context(tmp_path, dockerfile)))
    assert_build_interrupted(result, root, signal.SIGTERM, images)


@pytest.mark.fuse
def test_a_signal_while_the_image_is_recorded_changes_nothing(root: Path, tmp_path: Path) -> None:
    result = drive(root, "call:builder.build:Builder._commit", signal.SIGTERM, "build", "-t", "signals/made",
                   str(context(tmp_path, f"FROM {IMAGE}\nCOPY file.txt /\n")))
    assert result.returncode == 0 and "Successfully tagged signals/made:latest" in result.stdout, result.stderr
    assert list((root / "tmp").iterdir()) == []


# --- lamina run (foreground) --------------------------------------------------------------------------

RUN_SLEEP = "20.123"


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize(("signum", "flags"), [(signal.SIGTERM, ()), (signal.SIGINT, ()),
                                                (signal.SIGTERM, ("--init",))],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-init"])
@pytest.mark.parametrize("trigger", SETUP_PHASES, ids=SETUP_IDS)
def test_a_stop_signal_during_run_setup_is_not_lost(root: Path, trigger: str, signum: int,
                                                    flags: tuple[str, ...]) -> None:
    """The container is not started (or, when the signal came as it exec'd, killed at once; under
    --init its reaper too): lamina exits promptly with 128+N, one line, and --rm leaves nothing."""
    started = time.monotonic()
    result = drive(root, trigger, signum, "run", "--rm", *flags, "--name", "signals-run", IMAGE, "sleep",
                   RUN_SLEEP)
    assert time.monotonic() - started < 15
    assert result.returncode == 128 + signum, (result.stdout, result.stderr)
    name = signal.Signals(signum).name
    assert error_lines(result.stderr) == [f"lamina: error: interrupted by {name} while the container was "
                                          "starting"], result.stderr
    assert "signals-run" not in lamina(root, "ps", "-a").stdout
    assert fuse_mounts_under(root) == []
    assert_no_process_running(RUN_SLEEP)
