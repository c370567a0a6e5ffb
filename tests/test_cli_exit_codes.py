"""Exit codes command by command, as docker's client gives them, checked against podman where podman
gives the same.

docker's rules (github docker/cli): ``cmd/docker/docker.go`` exits with a ``StatusError``'s code and
with 1 for any other error; ``cli.FlagErrorFunc`` makes every bad flag a ``StatusError`` of 125;
``runRun``/``runCreate`` return 125 for their own errors (no such image, bad configuration) and the
container's code otherwise (126 cannot invoke, 127 not found); ``RequiresMinArgs`` and an unknown
(sub)command are plain errors, so 1; a management command alone (``docker image``) shows its help
and exits 0. podman 4.3 exits 125 for nearly every error, so it is the oracle only on the rows where
it agrees with docker; on the others the table names docker's own rule.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from test_store_interop import podman

from harness import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.fuse]

__all__ = ["podman"]

Cli = Callable[..., "subprocess.CompletedProcess[str]"]
BASE = "lamina/busybox"


class Case(NamedTuple):
    argv: str          # split as a shell would; {image} is the busybox image in each tool's store
    docker: int        # docker's exit code
    podman_agrees: bool


NOT_PODMAN = False  # podman exits 125 here; docker's rule is named in the module docstring
CASES = [
    # a missing object, outside run/create: docker 1
    Case("rmi nosuch", 1, True),
    Case("rm nosuch", 1, True),
    Case("rmi -f nosuch", 0, True),  # docker/cli: -f reports a missing image and goes on
    Case("rm -f nosuch", 0, True),
    Case("inspect nosuch", 1, NOT_PODMAN),
    Case("image inspect nosuch", 1, NOT_PODMAN),
    Case("container inspect nosuch", 1, NOT_PODMAN),
    Case("tag nosuch x", 1, NOT_PODMAN),
    Case("history nosuch", 1, NOT_PODMAN),
    Case("stop nosuch", 1, NOT_PODMAN),
    Case("kill nosuch", 1, NOT_PODMAN),
    Case("start nosuch", 1, NOT_PODMAN),
    Case("wait nosuch", 1, NOT_PODMAN),
    Case("logs nosuch", 1, NOT_PODMAN),
    Case("exec nosuch true", 1, NOT_PODMAN),
    Case("port nosuch", 1, NOT_PODMAN),
    Case("commit nosuch", 1, NOT_PODMAN),
    Case("load -i /nonexistent.tar", 1, NOT_PODMAN),
    # exec: the command's code; 126 when it cannot start (docker's daemon: the exec's exit code)
    Case("exec running nosuchcommand", 127, True),
    Case("exec running /etc", 126, True),
    Case("exec running sh -c 'exit 4'", 4, True),
    Case("exec -w /nonexistent running true", 126, NOT_PODMAN),  # podman (crun): 127
    Case("exec exited true", 1, NOT_PODMAN),  # "container exited is not running"
    # run and create: 125 for their own errors, else the container's code
    Case("run --rm --pull=never nosuch", 125, True),
    Case("create --pull=never nosuch", 125, True),
    Case("container run --rm --pull=never nosuch", 125, True),
    Case("run --rm --network=none {image} false", 1, True),
    Case("run --rm --network=none {image} sh -c 'exit 3'", 3, True),
    Case("run --rm --network=none {image} nosuchcommand", 127, True),
    Case("run --rm --network=none {image} /etc", 126, True),
    Case("run --rm=true --network=none {image} true", 0, True),
    # bad flags: 125 for every command
    Case("run --bogus {image}", 125, True),
    Case("images --bogus", 125, True),
    Case("pull --bogus x", 125, True),
    Case("version --bogus", 125, True),
    Case("run --rm=maybe {image} true", 125, True),
    # missing arguments and unknown commands: 1 (docker's RequiresMinArgs, "is not a docker command")
    Case("run", 1, NOT_PODMAN),
    Case("rmi", 1, NOT_PODMAN),
    Case("nosuchverb", 1, NOT_PODMAN),
    Case("image nosuchverb", 1, NOT_PODMAN),
    # help, and a group alone
    Case("image --help", 0, True),
    Case("run --help", 0, True),
    Case("image", 0, NOT_PODMAN),
    Case("container prune -f", 0, True),
    Case("image prune -f", 0, True),
]


def _argv(case: Case, image: str) -> list[str]:
    return [word.format(image=image) for word in shlex.split(case.argv)]


@pytest.fixture(scope="module")
def stores(podman: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    """A lamina store and the podman environment, each with the busybox base image."""
    from test_store_interop import run_podman
    root = tmp_path_factory.mktemp("exit-codes") / "root"
    archive = root.parent / "busybox.tar"
    subprocess.run([*_lamina(root), "save", "-o", str(archive), "lamina/busybox"], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    run_podman(podman, "load", "-i", str(archive))
    for name, command in (("running", "sleep 600"), ("exited", "true")):
        argv = ["run", "-d", "--network=none", "--name", name, "{image}", *command.split()]
        subprocess.run([*_lamina(root), *(a.format(image=BASE) for a in argv)], check=True, cwd=REPO_ROOT,
                       capture_output=True)
        run_podman(podman, *(a.format(image=f"localhost/{BASE}") for a in argv))
    yield root, podman
    subprocess.run([*_lamina(root), "rm", "-f", "running", "exited"], cwd=REPO_ROOT, capture_output=True)


def _lamina(root: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "lamina", "--root", str(root)]


@pytest.mark.parametrize("case", CASES, ids=[c.argv for c in CASES])
def test_exit_code_is_dockers(case: Case, stores: tuple[Path, object]) -> None:
    root, env = stores
    ours = subprocess.run([*_lamina(root), *_argv(case, BASE)], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert ours.returncode == case.docker, (case.argv, ours.stderr)
    assert "Traceback" not in ours.stderr
    if case.docker not in (0, 3, 4) and not case.argv.endswith("false"):
        assert ours.stderr.strip(), case.argv  # a failure says why
    theirs = env.run(_argv(case, f"localhost/{BASE}"), check=False, timeout=120)  # type: ignore[attr-defined]
    if case.podman_agrees:
        assert theirs.returncode == case.docker, (case.argv, theirs.stderr)
    else:
        assert theirs.returncode != case.docker, f"podman now agrees with docker on {case.argv}: mark it"
