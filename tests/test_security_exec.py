"""What a container can see of the processes that set it up, and of the host's descriptors.

Attacks from inside a container (issue 13 item 3, and the classes of CVE-2019-5736 and
CVE-2024-21626):

- a process in the container watches ``/proc/*/environ`` and ``/proc/*/exe`` while ``lamina exec``
  prepares its command: it must never read the caller's environment nor reach the host's
  interpreter binary. The exec helper's window is made long on purpose with a ``PATH`` of thousands
  of missing directories (the search runs in the helper, after it joined the container, before the
  command's exec), so the watcher sees the helper every time instead of by luck;
- a directory descriptor inherited from lamina's caller must not reach the container: not as one of
  its open descriptors, nor through ``-w /proc/self/fd/N`` / ``WORKDIR /proc/self/fd/N`` (runc's
  CVE-2024-21626 was a leaked descriptor of the host's cgroup directory used that way).

Each runs as root and as an unprivileged user (with and without subordinate ids).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO_ROOT

pytestmark = [pytest.mark.fuse]

IMAGE = "lamina/busybox"
SECRET = "HOST_SECRET"
SECRET_VALUE = "hunter2-do-not-leak"

# Inside the container: for every process whose command line mentions python (lamina's helpers;
# the pattern is written so that the watcher's own command line does not match it),
# note that it was seen, and whether its environment holds the secret, its executable resolves to
# a file that is not the container's, or opens for writing.
WATCHER = r"""
while :; do
  for p in /proc/[0-9]*; do
    case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in *pytho[n]*) ;; *) continue ;; esac
    echo "$p" >> /tmp/seen
    grep -q -a HOST_SECRET $p/environ 2>/dev/null && echo "environ $p" >> /tmp/found
    t=$(readlink $p/exe 2>/dev/null) && [ ! -e "$t" ] && echo "exe $p $t" >> /tmp/found
    ( exec 3>>$p/exe ) 2>/dev/null && echo "opened for writing $p/exe" >> /tmp/found
  done
done
"""


class Cli:
    """lamina's command line as root (a store under tmp_path) or as an unprivileged user; ``pass_fds``
    hands descriptors over as a user's shell redirect (``lamina ... 7</some/dir``) would."""

    def __init__(self, root: Path, user: object | None = None) -> None:
        self.root = root
        self.user = user
        # where to put files the CLI's user must read (a build context)
        self.scratch: Path = user.workdir if user is not None else root.parent  # type: ignore[attr-defined]

    def build_context(self, name: str, dockerfile: str) -> Path:
        context = self.scratch / name
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile)
        if self.user is not None:
            self.user.chown_tree(context)  # type: ignore[attr-defined]
        return context

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        if self.user is None:
            argv = [sys.executable, "-m", "lamina", "--root", str(self.root), *args]
            full_env = {**os.environ, **(env or {})}
            extra: dict[str, object] = {"cwd": REPO_ROOT}
        else:
            argv = ["lamina", *args]
            full_env = self.user.env(env)  # type: ignore[attr-defined]
            extra = {"cwd": self.user.workdir, "user": self.user.uid,  # type: ignore[attr-defined]
                     "group": self.user.gid, "extra_groups": []}  # type: ignore[attr-defined]
        return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, pass_fds=pass_fds, **extra)  # type: ignore[call-overload]


@pytest.fixture(params=["root", "unpriv_subids", "unpriv_nosubids"])
def lamina(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    """The CLI as root, or as an unprivileged user (with and without subordinate ids)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to create the unprivileged user too)")
    user = request.getfixturevalue(request.param) if request.param != "root" else None
    run = Cli(tmp_path / "root", user)
    yield run
    ids = run("ps", "-aq").stdout.split()
    if ids:
        run("rm", "-f", *ids)


def test_exec_shows_the_container_no_host_environment_or_binary(lamina: Cli) -> None:
    host_env = {SECRET: SECRET_VALUE}
    r = lamina("run", "-d", "--name", "watcher", IMAGE, "sh", "-c", WATCHER, env=host_env)
    assert r.returncode == 0, r.stderr
    slow_path = ":".join(["/x"] * 30000) + ":/bin"  # 90 kB: under the kernel's 128 kB a string
    for _ in range(3):
        r = lamina("exec", "-e", f"PATH={slow_path}", "watcher", "true", env=host_env)
        assert r.returncode == 0, r.stderr
    seen = lamina("exec", "watcher", "cat", "/tmp/seen").stdout
    found = lamina("exec", "watcher", "sh", "-c", "cat /tmp/found 2>/dev/null || true").stdout
    assert seen, "the watcher never saw the exec helper: the test proves nothing"
    assert found == "", found


def test_an_init_process_shows_no_host_environment_or_binary(lamina: Cli) -> None:
    r = lamina("run", "--rm", "--init", IMAGE, "sh", "-c",
               "tr '\\0' '\\n' < /proc/1/environ; readlink /proc/1/exe; ( exec 3>>/proc/1/exe ) && echo opened",
               env={SECRET: SECRET_VALUE})
    assert SECRET not in r.stdout and "python" not in r.stdout and "opened" not in r.stdout, r.stdout


def _inherited_directory(directory: Path, request: pytest.FixtureRequest) -> int:
    """Open ``directory`` for the test's duration; lamina gets it under the same number."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    request.addfinalizer(lambda: os.close(fd))
    return fd


@pytest.fixture
def host_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "host-dir"
    directory.mkdir()
    (directory / "HOSTFILE").write_text("host\n")
    return directory


# The shell's own descriptors, listed by a child while the shell only waits: in a pipeline the shell
# holds the pipes' ends while it starts the commands (a listing would race them), and a last simple
# command is exec'd in place of the shell (the listing would show ls's own directory descriptor).
LIST_FDS = "ls /proc/$$/fd; true"


def _fd_numbers(listing: str) -> str:
    return " ".join(sorted(listing.split(), key=int)) + " "


def test_no_host_descriptor_reaches_run_exec_or_build(lamina: Cli, host_directory: Path,
        request: pytest.FixtureRequest) -> None:
    fd = _inherited_directory(host_directory, request)
    r = lamina("run", "--rm", IMAGE, "sh", "-c", LIST_FDS, pass_fds=(fd,))
    assert (r.returncode, _fd_numbers(r.stdout)) == (0, "0 1 2 "), r.stderr
    r = lamina("run", "-d", "--name", "target", IMAGE, "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = lamina("exec", "target", "sh", "-c", LIST_FDS, pass_fds=(fd,))
    assert (r.returncode, _fd_numbers(r.stdout)) == (0, "0 1 2 "), r.stderr

    context = lamina.build_context("fds", f"FROM {IMAGE}\nRUN ({LIST_FDS}) > /fds; true\n")
    r = lamina("build", "-q", "-t", "fds", str(context), pass_fds=(fd,))
    assert r.returncode == 0, r.stderr
    r = lamina("run", "--rm", "fds", "cat", "/fds")
    assert _fd_numbers(r.stdout) == "0 1 2 ", r.stderr


def test_a_workdir_through_a_descriptor_cannot_reach_the_host(lamina: Cli, host_directory: Path,
        request: pytest.FixtureRequest) -> None:
    fd = _inherited_directory(host_directory, request)
    workdir = f"/proc/self/fd/{fd}"
    r = lamina("run", "-d", "--name", "target", IMAGE, "sleep", "60")
    assert r.returncode == 0, r.stderr
    for args in (("exec", "-w", workdir, "target"), ("run", "--rm", "-w", workdir, IMAGE)):
        r = lamina(*args, "sh", "-c", "ls; pwd", pass_fds=(fd,))
        assert "HOSTFILE" not in r.stdout, (args, r.stdout)
        # docker: run's start failure is 125, an exec that cannot start is 126 (its daemon's exit code)
        code = 126 if args[0] == "exec" else 125
        assert r.returncode == code and "working directory" in r.stderr, (args, r.returncode, r.stderr)

    context = lamina.build_context("wd", f"FROM {IMAGE}\nWORKDIR {workdir}\nRUN ls\n")
    r = lamina("build", "--progress", "plain", "-t", "wd", str(context), pass_fds=(fd,))
    assert "HOSTFILE" not in r.stdout + r.stderr


def test_the_sealed_interpreter_cannot_be_written() -> None:
    """The copy helpers run from is sealed: a container that reaches it cannot change it."""
    code = ("import os; from runner import sealed; fd = sealed.sealed_interpreter(); "
            "path = f'/proc/self/fd/{fd}'; "
            "w = os.open(path, os.O_WRONLY)\n"
            "try:\n    os.write(w, b'x')\nexcept PermissionError:\n    print('sealed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.stdout == "sealed\n", r.stderr


def _image_that_runs_the_host_interpreter(lamina: Cli) -> str:
    """An image with what the host's Python needs to start from the container's files (its ELF
    interpreter, shared libraries and the few modules it loads at start), as an attacker's image
    would have: executing ``/proc/self/exe`` in it then runs whatever binary the process that
    exec'd the command was running (CVE-2019-5736)."""
    interpreter = os.path.realpath(sys.executable)
    ldd = subprocess.run(["ldd", interpreter], capture_output=True, text=True)
    if ldd.returncode != 0:
        pytest.skip(f"cannot list the shared libraries of {interpreter}: {ldd.stderr.strip()}")
    files = [word for line in ldd.stdout.splitlines() for word in line.split() if word.startswith("/")]
    stdlib = Path(os.__file__).parent
    files += [str(stdlib / "os.py")] + [str(stdlib / "encodings" / f"{name}.py")
                                        for name in ("__init__", "aliases", "utf_8")]
    context = lamina.build_context("hostpy", f"FROM {IMAGE}\nCOPY root/ /\n")
    for name in files:
        target = context / "root" / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(name, target)  # with its mode: the ELF interpreter must be executable
    if lamina.user is not None:
        lamina.user.chown_tree(context)  # type: ignore[attr-defined]
    r = lamina("build", "-q", "-t", "hostpy", str(context))
    assert r.returncode == 0, r.stderr
    return "hostpy"


def test_executing_proc_self_exe_never_runs_a_host_binary(lamina: Cli) -> None:
    image = _image_that_runs_the_host_interpreter(lamina)
    show_exe = "import os; print(os.readlink('/proc/self/exe'))"
    r = lamina("run", "--rm", image, "/proc/self/exe", "-S", "-c", show_exe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/memfd:"), f"the container ran the host's {r.stdout.strip()}"
    r = lamina("run", "-d", "--name", "target", image, "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = lamina("exec", "target", "/proc/self/exe", "-S", "-c", show_exe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/memfd:"), f"the container ran the host's {r.stdout.strip()}"
