"""``lamina cp`` and ``lamina export``: docker's path rules checked against podman on the same cases,
stopped and running containers, archive mode, tar streams, and hostile symlinks in the container."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import fuse_mounts_under
from test_runner_cli import lamina, module_root
from test_store_interop import podman, run_podman

pytestmark = [pytest.mark.root, pytest.mark.fuse]

__all__ = ["lamina", "module_root", "podman"]  # fixtures shared with other modules

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
IMAGE = "lamina/busybox"
SETUP = ("mkdir -p /d/sub /d/empty; echo hi > /d/f; echo s > /d/sub/s; ln -s /etc /d/abs; "
         "ln -s ../../../.. /d/rel; ln -s /etc/passwd /d/pw; ln -s sub /d/subl; ln /d/f /d/hardf")


def tree(root: Path) -> list[str]:
    """Every entry under ``root``: path, type, and content or link target."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root)
            if path.is_symlink():
                entries.append(f"{rel} -> {os.readlink(path)}")
            elif path.is_dir():
                entries.append(f"{rel}/")
            else:
                entries.append(f"{rel} = {path.read_bytes()!r}")
    return sorted(entries)


def host_files(base: Path) -> tuple[Path, Path]:
    (base / "hd").mkdir(parents=True)
    (base / "hd" / "x").write_text("x\n")
    (base / "hf").write_text("host\n")
    return base / "hf", base / "hd"


# Each case: (cp arguments with {c} for the container and {h} for the host directory, whether docker's
# rules and podman agree on it). The container side starts as SETUP left it.
CASES = [
    ("{c}:/d {h}/out/", True),  # a directory into an existing directory
    ("{c}:/d/. {h}/out2", True),  # a directory's contents to a new directory
    ("{c}:/d/. {h}/out/", True),  # ... into an existing one
    ("{c}:/d/f {h}/out/newname", True),  # a file to a new name
    ("{c}:/d/f {h}/hf", True),  # a file onto a file
    ("{c}:/d/sub {h}/out3", True),  # a directory to a new name
    ("{c}:/nope {h}/out", True),  # missing source
    ("{c}:/d/f {h}/nodir/x", True),  # missing parent
    ("{c}:/d {h}/hf", True),  # a directory onto a file
    ("{h}/hf {c}:/d/abs/", True),  # a file into a directory through an absolute symlink
    ("{h}/hd {c}:/d/rel/newdir", True),  # a directory through a ../ symlink
    ("{h}/hd/. {c}:/d/sub", True),  # a directory's contents
    ("{h}/hf {c}:/nodir/x", True),  # missing parent in the container
    ("{h}/hf {c}:/d/newd/", True),  # a file to a directory that does not exist
    ("{h}/hd {c}:/d/f", True),  # a directory onto a file
    ("{c}:/d/subl/ {h}/out4", True),  # a symlink to a directory, with a trailing slash: followed
]


def run_cases(cp: Callable[[list[str]], int], container: str, host: Path) -> list[str]:
    results = []
    for case, _agree in CASES:
        args = case.format(c=container, h=host).split()
        results.append(f"{case}: {'ok' if cp(args) == 0 else 'error'}")
    return results


def test_cp_cases_match_podman(lamina: Lamina, podman: object, tmp_path: Path, module_root: Path) -> None:
    archive = tmp_path / "busybox.tar"
    lamina("save", IMAGE, "-o", str(archive), check=True)
    run_podman(podman, "load", "-i", str(archive))
    run_podman(podman, "run", "--network=none", "--name", "pc", IMAGE, "sh", "-c", SETUP)
    assert lamina("run", "--name", "lc", IMAGE, "sh", "-c", SETUP).returncode == 0

    hosts = {}
    outcomes = {}
    for tool in ("lamina", "podman"):
        host = tmp_path / tool
        host_files(host)
        (host / "out").mkdir()
        if tool == "lamina":
            outcomes[tool] = run_cases(lambda a: lamina("cp", *a).returncode, "lc", host)
        else:
            outcomes[tool] = run_cases(lambda a: run_podman(podman, "cp", *a, check=False).returncode, "pc", host)
        for name in ("d", "out4"):  # what went into each container comes back out
            if tool == "lamina":
                lamina("cp", f"lc:/{name if name == 'd' else 'nodir'}", str(host / f"back-{name}"))
            else:
                run_podman(podman, "cp", f"pc:/{name if name == 'd' else 'nodir'}", str(host / f"back-{name}"),
                           check=False)
        hosts[tool] = tree(host)
    assert outcomes["lamina"] == outcomes["podman"]
    assert hosts["lamina"] == hosts["podman"]
    # the hard link stays one inode on the way out
    out = tmp_path / "lamina" / "out" / "d"
    assert os.stat(out / "f").st_ino == os.stat(out / "hardf").st_ino


def test_cp_symlink_source_is_copied_as_a_link_unless_follow(lamina: Lamina, tmp_path: Path) -> None:
    """docker copies a symlink as a link, -L copies its target (podman 4.3 follows it always and
    has no -L: this is docker's documented behaviour, not podman's)."""
    assert lamina("run", "--name", "links", IMAGE, "sh", "-c", SETUP).returncode == 0
    assert lamina("cp", "links:/d/pw", str(tmp_path / "link")).returncode == 0
    assert os.readlink(tmp_path / "link") == "/etc/passwd"
    assert lamina("cp", "-L", "links:/d/pw", str(tmp_path / "target")).returncode == 0
    assert (tmp_path / "target").read_text().startswith("root:x:0:0:")


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_cp_hostile_symlinks_stay_in_the_container(lamina: Lamina, tmp_path: Path, running: bool) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    script = (f"ln -s / /up; ln -s ../../../../../../.. /rel; ln -s {secret} /abs; ln -s {victim} /vict; "
              f"mkdir -p {victim}; echo container > {secret}")
    if running:
        assert lamina("run", "-d", "--name", "evil", IMAGE, "sh", "-c", script + "; sleep 60").returncode == 0
        assert lamina("exec", "evil", "sh", "-c", f"while ! test -e {secret}; do sleep 0.05; done").returncode == 0
    else:
        assert lamina("run", "--name", "evil", IMAGE, "sh", "-c", script).returncode == 0
    for source in (f"/up{secret}", f"/rel{secret}", "/abs"):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        r = lamina("cp", "-L", f"evil:{source}", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_text() == "container\n"  # the container's file of that name, never the host's
    hf = tmp_path / "hf"
    hf.write_text("payload\n")
    for dest in ("/vict/", f"/rel{victim}/", f"/up{victim}/"):
        lamina("cp", str(hf), f"evil:{dest}")
    assert list(victim.iterdir()) == []
    assert secret.read_text() == "host secret\n"
    back = tmp_path / "back"
    assert lamina("cp", f"evil:{victim}", str(back)).returncode == 0
    assert (back / "hf").read_text() == "payload\n"  # it landed inside the container


def test_cp_running_archive_mode_and_streams(lamina: Lamina, tmp_path: Path, module_root: Path) -> None:
    argv = [sys.executable, "-m", "lamina", "--root", str(module_root)]
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "in-volume").write_text("v\n")
    assert lamina("run", "-d", "--name", "live", "-v", f"{volume}:/vol", IMAGE, "sleep", "60").returncode == 0
    hf, hd = host_files(tmp_path / "h")
    os.chown(hd / "x", 1234, 567)
    assert lamina("cp", str(hd), "live:/plain").returncode == 0
    assert lamina("cp", "-a", str(hd), "live:/kept").returncode == 0
    r = lamina("exec", "live", "stat", "-c", "%u:%g", "/plain/x", "/kept/x")
    assert r.stdout.split() == ["0:0", "1234:567"], r.stderr
    # tar streams both ways
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("streamed/file")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    r = subprocess.run([*argv, "cp", "-", "live:/tmp"], input=data.getvalue(),
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*argv, "cp", "live:/tmp/streamed", "-"], capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        assert sorted(tar.getnames()) == ["streamed", "streamed/file"]
    r = subprocess.run([*argv, "cp", "-", "live:/tmp/streamed/file"], input=data.getvalue(),
                       capture_output=True)
    assert r.returncode == 1 and b"must be a directory" in r.stderr
    # a volume's content is copied too; the result is seen by the container at once
    assert lamina("cp", "live:/vol", str(tmp_path / "vol-out")).returncode == 0
    assert (tmp_path / "vol-out" / "in-volume").read_text() == "v\n"
    assert lamina("cp", str(hf), "live:/vol/").returncode == 0
    assert (volume / "hf").read_text() == "host\n"
    assert lamina("exec", "live", "cat", "/plain/x").stdout == "x\n"


def test_cp_stream_follows_symlinked_directories_inside_the_container(lamina: Lamina, tmp_path: Path,
                                                                      module_root: Path) -> None:
    """A merged-/usr image's /lib -> usr/lib: an archive's lib/x lands in /usr/lib/x, as with docker."""
    assert lamina("run", "--name", "merged", IMAGE, "sh", "-c",
                  "mkdir -p /usr/lib2; ln -s usr/lib2 /lib2; ln -s / /rootlink").returncode == 0
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("lib2/x", "rootlink/rootlink/y"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"z"))
    argv = [sys.executable, "-m", "lamina", "--root", str(module_root)]
    r = subprocess.run([*argv, "cp", "-", "merged:/"], input=data.getvalue(), capture_output=True)
    assert r.returncode == 0, r.stderr
    assert lamina("cp", "merged:/usr/lib2/x", str(tmp_path / "x")).returncode == 0
    assert lamina("cp", "merged:/y", str(tmp_path / "y")).returncode == 0  # / of the container's
    assert (tmp_path / "x").read_text() == (tmp_path / "y").read_text() == "z"


def test_cp_usage_errors(lamina: Lamina, tmp_path: Path) -> None:
    assert lamina("create", "--name", "idle", IMAGE, "true").returncode == 0
    for args, message in ((["a", "b"], "must specify at least one container source"),
                          (["idle:/a", "idle:/b"], "copying between containers is not supported"),
                          (["idle:", str(tmp_path)], "source can not be empty")):
        r = lamina("cp", *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    r = lamina("cp", "nosuch:/etc/passwd", str(tmp_path))
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    # a created container was never started: its image's files are there
    assert lamina("cp", "idle:/etc/passwd", str(tmp_path / "pw")).returncode == 0


def test_export_lists_what_podman_exports(lamina: Lamina, podman: object, tmp_path: Path) -> None:
    archive = tmp_path / "busybox.tar"
    lamina("save", IMAGE, "-o", str(archive), check=True)
    run_podman(podman, "load", "-i", str(archive))
    script = "mkdir -p /made/sub; echo x > /made/sub/f; rm /bin/vi"
    run_podman(podman, "run", "--network=none", "--name", "pe", IMAGE, "sh", "-c", script)
    run_podman(podman, "export", "-o", str(tmp_path / "podman.tar"), "pe")
    assert lamina("run", "--name", "le", IMAGE, "sh", "-c", script).returncode == 0
    r = lamina("export", "-o", str(tmp_path / "lamina.tar"), "le")
    assert r.returncode == 0, r.stderr

    def names(path: Path) -> set[str]:
        with tarfile.open(path) as tar:
            return {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()} - {"", "."}

    ours, theirs = names(tmp_path / "lamina.tar"), names(tmp_path / "podman.tar")
    assert "made/sub/f" in ours and "bin/vi" not in ours
    # podman adds its own files: /run/.containerenv, an /etc/mtab link, a resolv.conf
    assert ours ^ theirs <= {"run", "run/.containerenv", "etc/mtab", "etc/hostname", "etc/hosts", "etc/resolv.conf"}, \
        sorted(ours ^ theirs)


@pytest.mark.unprivileged
@pytest.mark.slow
def test_cp_unprivileged(unpriv) -> None:  # type: ignore[no-untyped-def]
    """As a user with only /dev/fuse: stopped containers go through a sandbox of the user's own,
    running ones through their namespaces; files the container owns under other ids come out
    owned by the user."""
    lamina = unpriv.lamina
    owner = "nobody" if unpriv.has_subids else "root"
    r = lamina("run", "--name", "st", IMAGE, "sh", "-c",
               f"mkdir -m 700 /priv; echo s > /priv/s; chown -R {owner} /priv; ln -s / /up")
    assert r.returncode == 0, r.stderr
    out = unpriv.workdir / "out"
    r = lamina("cp", "st:/up/priv", str(out))  # the symlink of the directory part resolves inside
    assert r.returncode == 0, r.stderr
    assert (out / "s").read_text() == "s\n" and out.stat().st_uid == unpriv.uid
    host = unpriv.workdir / "h"
    host.mkdir()
    (host / "f").write_text("from host\n")
    unpriv.chown_tree(host)
    assert lamina("cp", str(host / "f"), "st:/priv/").returncode == 0
    assert lamina("run", "-d", "--name", "live", "--network", "none", IMAGE, "sleep", "60").returncode == 0
    assert lamina("cp", str(host), "live:/h").returncode == 0
    r = lamina("exec", "live", "stat", "-c", "%u:%g %n", "/h/f")
    assert r.stdout.split() == ["0:0", "/h/f"], r.stderr
    assert lamina("cp", "live:/h/f", str(unpriv.workdir / "back")).returncode == 0
    assert (unpriv.workdir / "back").read_text() == "from host\n"
    r = lamina("start", "-a", "st")  # runs again (and fails: its files exist), then stops
    assert "File exists" in r.stderr
    back = unpriv.workdir / "back2"
    assert lamina("cp", "st:/priv/f", str(back)).returncode == 0
    assert back.read_text() == "from host\n"
    r = lamina("export", "-o", str(unpriv.workdir / "st.tar"), "st")
    assert r.returncode == 0, r.stderr
    with tarfile.open(unpriv.workdir / "st.tar") as tar:
        assert {"priv/s", "priv/f", "bin/busybox"} <= set(tar.getnames())
    assert lamina("rm", "-f", "st", "live").returncode == 0
    assert fuse_mounts_under(unpriv.workdir) == []
