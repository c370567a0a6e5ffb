"""Named and anonymous volumes, ``--mount``, ``--volumes-from`` and the ``volume`` verbs, checked
from inside the container and against docker's documented behaviour (docs.docker.com: "Volumes",
``docker volume``, ``docker run --mount``) and, where podman gives docker's answer, podman."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner_support import Lamina, lamina_on_root

pytestmark = [pytest.mark.root, pytest.mark.fuse]

IMAGE = "lamina/busybox"


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner-volumes") / "root"


@pytest.fixture
def lamina(lamina_cmd: Lamina, module_root: Path) -> Iterator[Lamina]:
    yield from lamina_on_root(lamina_cmd, module_root, remove_volumes=True)


def test_named_volume_is_filled_from_the_image_once_and_outlives_containers(lamina: Lamina,
                                                                            module_root: Path) -> None:
    r = lamina("volume", "create", "--label", "team=a", "data")
    assert r.returncode == 0 and r.stdout == "data\n", r.stderr
    assert lamina("volume", "create", "data").stdout == "data\n"  # docker: the existing one
    # A new, empty volume on a non-empty image directory starts as a copy of it (docker's rule).
    r = lamina("run", "--rm", "-v", "data:/etc", IMAGE, "sh", "-c", "cat /etc/passwd | head -1; echo new > /etc/mine")
    assert r.returncode == 0 and r.stdout == "root:x:0:0:root:/root:/bin/sh\n", r.stderr
    # Not empty any more: mounted elsewhere it shows its own content, not the image's.
    r = lamina("run", "--rm", "--mount", "type=volume,source=data,target=/bin2", IMAGE, "cat", "/bin2/mine")
    assert r.stdout == "new\n", r.stderr
    info = json.loads(lamina("volume", "inspect", "data").stdout)
    assert len(info) == 1
    entry = info[0]
    assert entry["Name"] == "data" and entry["Driver"] == "local" and entry["Scope"] == "local"
    assert entry["Labels"] == {"team": "a"}
    mountpoint = Path(entry["Mountpoint"])
    assert (mountpoint / "mine").read_text() == "new\n"
    assert stat.S_IMODE(mountpoint.parent.stat().st_mode) == 0o700  # private, as the rest of the store
    assert lamina("volume", "inspect", "--format", "{{.Name}} {{.Driver}}", "data").stdout == "data local\n"
    assert lamina("volume", "ls", "-q").stdout.split() == ["data"]
    assert lamina("volume", "ls", "--filter", "label=team=b", "-q").stdout == ""
    # nocopy: an empty volume stays empty
    r = lamina("run", "--rm", "--mount", "type=volume,source=empty,target=/etc,volume-nocopy", IMAGE,
               "ls", "-A", "/etc")
    assert r.returncode == 0 and r.stdout == "", r.stderr


def test_volume_in_use_and_missing_are_refused_as_docker(lamina: Lamina) -> None:
    assert lamina("create", "--name", "holder", "-v", "busy:/data", IMAGE, "true").returncode == 0
    r = lamina("volume", "rm", "busy")
    cid = lamina("ps", "-aq", "--no-trunc").stdout.split()[0]
    # docker: "Error response from daemon: remove busy: volume is in use - [ID]", exit 1
    assert r.returncode == 1 and f"remove busy: volume is in use - [{cid}]" in r.stderr
    assert lamina("volume", "ls", "-q", "--filter", "dangling=false").stdout.split() == ["busy"]
    r = lamina("volume", "prune", "-a", "-f")
    assert r.returncode == 0 and "busy" not in r.stdout
    assert lamina("rm", "holder").returncode == 0
    assert lamina("volume", "ls", "-q", "--filter", "dangling=true").stdout.split() == ["busy"]
    assert lamina("volume", "rm", "busy").stdout == "busy\n"
    r = lamina("volume", "rm", "nosuch")
    assert r.returncode == 1 and "get nosuch: no such volume" in r.stderr
    assert lamina("volume", "rm", "-f", "nosuch").returncode == 0
    r = lamina("volume", "create", "bad/name")
    assert r.returncode == 1 and "invalid characters for a local volume name" in r.stderr
    assert r.stderr.count("\n") == 1
    r = lamina("run", "--rm", "-v", "xv:/data", "-v", "/tmp:/data", IMAGE, "true")
    assert r.returncode == 125 and "Duplicate mount point: /data" in r.stderr
    assert lamina("volume", "ls", "-q").stdout == ""  # the refused run made no volume


def test_anonymous_volumes_follow_docker_rm_and_prune(lamina: Lamina, module_root: Path) -> None:
    assert lamina("run", "--name", "anon", "-v", "/scratch", IMAGE, "sh", "-c", "echo a > /scratch/a").returncode == 0
    names = lamina("volume", "ls", "-q").stdout.split()
    assert len(names) == 1 and len(names[0]) == 64
    assert lamina("rm", "anon").returncode == 0
    assert lamina("volume", "ls", "-q").stdout.split() == names  # docker rm keeps it (rm -v would not)
    assert lamina("volume", "create", "keepme").returncode == 0
    r = lamina("volume", "prune", "-f")  # docker 23: anonymous volumes only
    assert r.returncode == 0 and names[0] in r.stdout and "keepme" not in r.stdout
    assert lamina("volume", "ls", "-q").stdout.split() == ["keepme"]
    assert lamina("run", "--rm", "-v", "/scratch", IMAGE, "true").returncode == 0  # --rm removes its own
    assert lamina("volume", "ls", "-q").stdout.split() == ["keepme"]


def test_mount_flag_bind_volume_tmpfs_and_errors(lamina: Lamina, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "in").write_text("from host\n")
    r = lamina("run", "--rm", "--mount", f"type=bind,source={host},target=/h,readonly",
               "--mount", "type=tmpfs,destination=/t,tmpfs-size=1m,tmpfs-mode=1700",
               "--mount", "type=volume,src=mv,dst=/v", IMAGE, "sh", "-c",
               "cat /h/in; touch /h/x 2>/dev/null || echo ro; df -k /t | tail -1 | awk '{print $2}'; "
               "stat -c %a /t; echo kept > /v/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["from host", "ro", "1024", "1700"]
    assert lamina("run", "--rm", "-v", "mv:/again:ro", IMAGE, "cat", "/again/f").stdout == "kept\n"
    bad = {
        "type=bind,target=/x": "--mount type=bind,target=/x: invalid mount config for type \"bind\"",
        f"type=bind,source={tmp_path}/nope,target=/x": "bind source path does not exist",
        "type=tmpfs,source=x,target=/x": "field Source must not be specified",
        "type=nfs,target=/x": "invalid mount type 'nfs'",
        "type=volume,source=v": "target is required",
        "type=volume,target=/x,bogus=1": "unexpected key 'bogus'",
        "type=bind,source=/tmp,target=/x,tmpfs-size=1m": "cannot mix 'tmpfs-*' options with mount type 'bind'",
        "type=volume,target=relative": "mount path must be absolute",
        "type=volume,target=/x,readonly=maybe": "invalid value for readonly: maybe",
    }
    for flag, message in bad.items():
        r = lamina("run", "--rm", "--mount", flag, IMAGE, "true")
        assert r.returncode == 125 and message in r.stderr and r.stderr.count("\n") == 1, (flag, r.stderr)
    assert lamina("volume", "ls", "-q").stdout.split() == ["mv"]


def test_volumes_from_and_image_volume_skipped_when_covered(lamina: Lamina, tmp_path: Path) -> None:
    host = tmp_path / "shared"
    host.mkdir()
    assert lamina("create", "--name", "src", "-v", f"{host}:/b", "-v", "named:/n", "-v", "/anon", IMAGE,
                  "true").returncode == 0
    r = lamina("run", "--rm", "--volumes-from", "src", IMAGE, "sh", "-c",
               "echo b > /b/f; echo n > /n/f; echo a > /anon/f; cat /b/f /n/f /anon/f")
    assert r.returncode == 0 and r.stdout.split() == ["b", "n", "a"], r.stderr
    assert (host / "f").read_text() == "b\n"
    r = lamina("run", "--rm", "--volumes-from", "src:ro", IMAGE, "sh", "-c", "echo x > /n/g || echo refused")
    assert "refused" in r.stdout
    # the source's anonymous volume is not removed by the --rm of the one that borrowed it
    assert len(lamina("volume", "ls", "-q").stdout.split()) == 2
    r = lamina("run", "--rm", "--volumes-from", "src", "-v", "/tmp:/b", IMAGE, "true")
    assert r.returncode == 125 and "Duplicate mount point: /b" in r.stderr
    r = lamina("run", "--rm", "--volumes-from", "nosuch", IMAGE, "true")
    assert r.returncode == 125 and "nosuch" in r.stderr
    assert lamina("rm", "-v", "src").returncode == 0
    assert lamina("volume", "ls", "-q").stdout.split() == ["named"]  # rm -v: anonymous ones only


def test_volume_with_foreign_owners_is_removed(lamina: Lamina, module_root: Path) -> None:
    """Files a container made as another user: removing the volume still leaves nothing."""
    r = lamina("run", "--rm", "-v", "owned:/o", IMAGE, "sh", "-c",
               "mkdir -m 700 /o/d && echo s > /o/d/s && chown -R nobody /o/d")
    assert r.returncode == 0, r.stderr
    assert lamina("volume", "rm", "owned").returncode == 0
    assert not (module_root / "volumes" / "owned").exists()
    assert sorted(os.listdir(module_root / "volumes")) in ([], [".lock"])
