"""Fixtures shared by every test: mounts, an unprivileged user, a busybox root, the CLI, log checks."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from harness import (
    REPO_ROOT,
    SESSION_MOUNTS,
    MountedUnion,
    UnprivilegedRuntime,
    UnprivilegedUser,
    force_unmount,
    fuse_mounts_under,
    make_busybox_rootfs,
    make_unprivileged_user,
    start_union,
    union_argv,
)

IS_ROOT = os.geteuid() == 0
HAVE_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
NETWORK_TESTS = os.environ.get("LAMINA_NETWORK_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_network = pytest.mark.skip(reason="network test: opt in with LAMINA_NETWORK_TESTS=1")
    skip_fuse = pytest.mark.skip(reason="needs /dev/fuse and fusermount3")
    skip_root = pytest.mark.skip(reason="needs root")
    for item in items:
        if "network" in item.keywords and not NETWORK_TESTS:
            item.add_marker(skip_network)
        if "fuse" in item.keywords and not HAVE_FUSE:
            item.add_marker(skip_fuse)
        if ("root" in item.keywords or "unprivileged" in item.keywords) and not IS_ROOT:
            item.add_marker(skip_root)


# --- log check -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fail_on_unexpected_log(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test that logs a WARNING or worse it did not declare with ``@pytest.mark.allow_log``."""
    caplog.set_level(logging.DEBUG)
    yield
    allowed = [re.compile(m.args[0]) for m in request.node.iter_markers("allow_log")]
    unexpected = [
        record for when in ("setup", "call") for record in caplog.get_records(when)
        if record.levelno >= logging.WARNING
        and not any(p.search(record.getMessage()) for p in allowed)
    ]
    if unexpected:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(f"unexpected log records:\n{lines}", pytrace=False)


# --- union mounts --------------------------------------------------------------------------------

MountFactory = Callable[..., MountedUnion]


@pytest.fixture
def union_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """Factory: ``union_mount(lowers=[top, ...], upper=None, work=None, mountpoint=None, options=[])``.

    Serves ``python -m unionfs -f`` from a separate process, waits until the mount is ready, and
    always unmounts at the end of the test, whether it passed or not.
    """
    mounted: list[MountedUnion] = []
    counter = iter(range(1000))

    def factory(lowers: Sequence[Path], upper: Path | None = None, work: Path | None = None,
                mountpoint: Path | None = None, options: Sequence[str] = (),
                extra_args: Sequence[str] = ()) -> MountedUnion:
        n = next(counter)
        mnt = mountpoint or tmp_path / f"mnt{n}"
        argv = union_argv(lowers, upper, work, mnt, options, extra_args)
        handle = start_union(argv, mnt, tmp_path / f"unionfs{n}.log")
        mounted.append(handle)
        return handle

    yield factory
    for handle in reversed(mounted):
        handle.unmount()


@pytest.fixture(scope="session", autouse=True)
def sweep_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the run, unmount what this session's tests left mounted: under its temp
    directory and wherever a fixture recorded a mount (harness.SESSION_MOUNTS); never others'."""
    SESSION_MOUNTS.record(tmp_path_factory.getbasetemp())
    yield
    SESSION_MOUNTS.sweep()


# --- an unprivileged user ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def unprivileged_runtime() -> Iterator[UnprivilegedRuntime]:
    if not IS_ROOT:
        pytest.skip("creating a test user needs root")
    runtime = UnprivilegedRuntime.create()
    yield runtime
    for mountpoint in fuse_mounts_under(runtime.base):
        force_unmount(mountpoint)
    shutil.rmtree(runtime.base, ignore_errors=True)


def _user_fixture(runtime: UnprivilegedRuntime, with_subids: bool, tmp_path: Path) -> UnprivilegedUser:
    workdir = runtime.base / "work" / f"{tmp_path.name}-{'sub' if with_subids else 'nosub'}"
    user = make_unprivileged_user(runtime, with_subids, workdir)
    probe = user.lamina("--version")
    if probe.returncode != 0:
        pytest.fail(f"the unprivileged user cannot run lamina: {probe.stderr.strip()}")
    return user


@pytest.fixture(params=[True, False], ids=["subids", "nosubids"])
def unpriv(request: pytest.FixtureRequest, unprivileged_runtime: UnprivilegedRuntime,
           tmp_path: Path) -> UnprivilegedUser:
    """An unprivileged user, with and without subordinate id ranges (the test runs once for each)."""
    return _user_fixture(unprivileged_runtime, request.param, tmp_path)


@pytest.fixture
def unpriv_subids(unprivileged_runtime: UnprivilegedRuntime, tmp_path: Path) -> UnprivilegedUser:
    return _user_fixture(unprivileged_runtime, True, tmp_path)


@pytest.fixture
def unpriv_nosubids(unprivileged_runtime: UnprivilegedRuntime, tmp_path: Path) -> UnprivilegedUser:
    return _user_fixture(unprivileged_runtime, False, tmp_path)


# --- images and the CLI --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def lamina_cmd(tmp_path: Path) -> CliRunner:
    """Run ``python -m lamina --root ROOT ARGS...`` as a subprocess; ``check=True`` by default."""
    default_root = tmp_path / "lamina-root"

    def run(*args: str, root: Path | None = None, input: str | None = None, check: bool = True,
            timeout: float = 300, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "lamina", "--root", str(root or default_root), *args]
        full_env = {**os.environ, **(env or {})}
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                cwd=cwd or REPO_ROOT, env=full_env,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    return run
