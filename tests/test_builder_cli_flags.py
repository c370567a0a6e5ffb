"""docker's ``build`` flags that scripts use: ``--iidfile``, ``--output``, ``build -``, ``--network``,
``--progress=quiet``, ``--ulimit``.

References: podman 4.3 on the same base and Dockerfile where it implements the flag (``--output``
local and tar, ``build -`` from a tar), else docker's documented behaviour (``docker build --help``
and the "docker build" reference: ``--iidfile`` writes ``sha256:...``; ``-`` reads a Dockerfile or a
tar context from standard input; ``--network`` sets RUN's network).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import test_builder_fidelity as fidelity
from harness import REPO_ROOT

pytestmark = [pytest.mark.fuse]

builders = fidelity.builders
Builders = fidelity.Builders

TREE = """\
FROM {base}
COPY a.txt /srv/a.txt
RUN mkdir -p /srv/private /srv/empty && echo x > /srv/private/x && chmod 700 /srv/private \\
 && ln -s a.txt /srv/link && chmod 0640 /srv/a.txt && chown 12:34 /srv/a.txt && rm /bin/vi
"""


def lamina(root: Path, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args], capture_output=True,
                            timeout=300, cwd=REPO_ROOT, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"lamina {' '.join(args)} exited {result.returncode}:\n{result.stderr.decode()}")
    return result


def _listing(root: Path) -> dict[str, str]:
    """name -> type, permission bits and symlink target: what two exporters must agree on."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        found[str(path.relative_to(root))] = f"{kind} {stat.S_IMODE(st.st_mode):o}" + (
            f" -> {os.readlink(path)}" if kind == "l" else "")
    return found


def _tar_listing(data: bytes) -> dict[str, str]:
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./").rstrip("/")
            if not name or name == ".":
                continue
            kind = "l" if m.issym() else "d" if m.isdir() else "f" if m.isreg() else "o"
            found[name] = f"{kind} {m.mode:o} {m.uid}:{m.gid}" + (f" -> {m.linkname}" if m.issym() else "")
    return found


@pytest.mark.slow
def test_output_local_and_tar_as_podman(builders: Builders, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a\n")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    builders.build_lamina(ctx, TREE, "out", "-o", str(ours), "--output", f"type=tar,dest={tmp_path / 'ours.tar'}")
    builders.build_podman(ctx, TREE, "out", "-o", str(theirs))
    # podman 4.3 exports what its RUN left as mount points (empty 0700 /etc/hosts, /etc/hostname,
    # /etc/resolv.conf, /run), and a file the RUN deleted, which its image itself lacks.
    assert builders.podman_cmd("run", "--rm", "--network=none", "out", "test", "-e", "/bin/vi", check=False).returncode
    podman_artifacts = {"etc/hostname", "etc/hosts", "etc/resolv.conf", "run", "bin/vi"}
    expected = {k: v for k, v in _listing(theirs).items() if k not in podman_artifacts}
    assert _listing(ours) == expected
    assert (ours / "srv" / "a.txt").read_text() == "a\n" and not (ours / "bin" / "vi").exists()
    # The tar: the same entries, with the owners the image records (podman 4.3's own tar output
    # of a --layers build leaves out the RUN step's changes, so its image is the reference).
    tar_ours = _tar_listing((tmp_path / "ours.tar").read_bytes())
    assert {name: " ".join(v.split(" ")[:2] + v.split(" ")[3:]) for name, v in tar_ours.items()} == expected
    owner = builders.podman_cmd("run", "--rm", "--network=none", "out", "stat", "-c", "%u:%g", "/srv/a.txt").stdout
    assert tar_ours["srv/a.txt"] == f"f 640 {owner.strip()}"


def test_iidfile_progress_quiet_and_output_to_stdout(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo made > /made\n")
    root = tmp_path / "root"
    quiet = lamina(root, "build", "--progress=quiet", "--iidfile", str(tmp_path / "iid"), str(ctx))
    image_id = quiet.stdout.decode().strip()
    assert len(image_id) == 64 and (tmp_path / "iid").read_text() == f"sha256:{image_id}"
    piped = lamina(root, "build", "-o", "-", str(ctx))
    names = _tar_listing(piped.stdout)
    assert names["made"].startswith("f ") and "bin/sh" in names
    assert b"STEP 2/2" in piped.stderr


def test_dockerfile_and_tar_context_from_stdin(tmp_path: Path) -> None:
    root = tmp_path / "root"
    alone = lamina(root, "build", "-t", "stdin-df", "-", input=b"FROM lamina/busybox\nRUN echo alone > /alone\n")
    assert b"STEP 2/2: RUN echo alone" in alone.stdout
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, body in (("Dockerfile", b"FROM lamina/busybox\nCOPY sub/f.txt /f.txt\n"), ("sub/f.txt", b"from tar\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    lamina(root, "build", "-t", "stdin-tar", "-", input=data.getvalue())
    assert lamina(root, "run", "--rm", "stdin-tar", "cat", "/f.txt").stdout == b"from tar\n"
    assert not any((root / "tmp").iterdir())


@pytest.mark.parametrize("member", ["../escape", "/abs/../../escape", "link/escape"])
def test_hostile_stdin_context_is_one_line(tmp_path: Path, member: str) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
        tar.addfile(link)
        info = tarfile.TarInfo(member)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    result = lamina(root, "build", "-", input=data.getvalue(), check=False)
    assert result.returncode == 1  # docker build's errors exit 1
    assert len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
    assert not list((tmp_path / "outside").iterdir()) and not (tmp_path / "escape").exists()
    assert not any((root / "tmp").iterdir())


def test_network_flag_is_runs_default(tmp_path: Path) -> None:
    """``--network none``: RUN steps that name no network see only the loopback interface."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN ls /sys/class/net > /nets\n"
                                    "RUN --network=host ls /sys/class/net > /host-nets\n")
    root = tmp_path / "root"
    lamina(root, "build", "--network", "none", "-t", "net", str(ctx))
    assert lamina(root, "run", "--rm", "--network", "none", "net", "cat", "/nets").stdout == b"lo\n"
    host = lamina(root, "run", "--rm", "--network", "none", "net", "cat", "/host-nets").stdout.split()
    assert sorted(n.decode() for n in host) == sorted(os.listdir("/sys/class/net"))
    again = lamina(root, "build", "-t", "net", str(ctx)).stdout
    assert b"CACHED" not in again.split(b"STEP 3/3")[0]  # another network, another key


ULIMITS = """\
FROM {base}
RUN (ulimit -n; ulimit -Hn; ulimit -u; ulimit -Hu; ulimit -c) > /report
"""


def test_ulimit_applies_to_run_steps_as_podman(builders: Builders, tmp_path: Path) -> None:
    """``build --ulimit``: each RUN step starts with the limits, read from inside with ``ulimit``;
    podman's build (which takes docker's flag) is the reference."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    flags = ("--ulimit", "nofile=100:200", "--ulimit", "nproc=300:400", "--ulimit", "core=0")
    builders.build_lamina(ctx, ULIMITS, "limits", *flags)
    ours = builders.lamina("run", "--rm", "--network", "none", "limits", "cat", "/report").stdout
    builders.build_podman(ctx, ULIMITS, "limits", *flags)
    theirs = builders.podman_cmd("run", "--rm", "--network=none", "limits", "cat", "/report").stdout
    assert ours == theirs == "100\n200\n300\n400\n0\n"
    # Other limits, another key: the step runs again (a command may write what it reads).
    again = builders.build_lamina(ctx, ULIMITS, "limits", "--ulimit", "nofile=150:200").stdout
    assert "CACHED" not in again
    assert builders.lamina("run", "--rm", "--network", "none", "limits", "head", "-1", "/report").stdout == "150\n"


@pytest.mark.parametrize(("value", "message"), [
    ("bogus=1", "invalid ulimit type: bogus"),
    ("nofile", "invalid ulimit argument: nofile"),
    ("nofile=200:100", "soft limit must be less than or equal to hard limit: 200 > 100"),
    ("nofile=ten", "invalid ulimit argument: nofile=ten"),
])
def test_bad_ulimit_is_one_line_and_exit_125(tmp_path: Path, value: str, message: str) -> None:
    """docker refuses a bad --ulimit as a flag error (exit 125), before anything runs."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM lamina/busybox\nRUN touch /ran\n")
    root = tmp_path / "root"
    result = lamina(root, "build", "--ulimit", value, str(ctx), check=False)
    assert result.returncode == 125 and message in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1 and b"STEP" not in result.stdout
