"""Volumes and the run flags as an unprivileged user, with and without subordinate ids."""

from __future__ import annotations

import json
import stat

import pytest

from harness import fuse_mounts_under

pytestmark = [pytest.mark.unprivileged, pytest.mark.fuse, pytest.mark.slow]

IMAGE = "lamina/busybox"


def test_unprivileged_named_volumes_and_mounts(unpriv) -> None:  # type: ignore[no-untyped-def]
    lamina = unpriv.lamina
    assert lamina("volume", "create", "data").stdout == "data\n"
    owner = "nobody" if unpriv.has_subids else "root"
    r = lamina("run", "--rm", "-v", "data:/etc", IMAGE, "sh", "-c",
               f"head -1 /etc/passwd; mkdir -m 700 /etc/priv; echo s > /etc/priv/s; chown -R {owner} /etc/priv")
    assert r.returncode == 0 and r.stdout.startswith("root:x:0:0"), r.stderr
    r = lamina("run", "--rm", "--mount", "type=volume,source=data,target=/d,readonly",
               "--mount", "type=tmpfs,target=/t,tmpfs-size=1m", IMAGE, "sh", "-c",
               "stat -c %U /d/priv/s; touch /d/x 2>/dev/null || echo ro; df -k /t | tail -1 | awk '{print $2}'")
    assert r.returncode == 0 and r.stdout.split() == [owner, "ro", "1024"], r.stderr
    info = json.loads(lamina("volume", "inspect", "data").stdout)[0]
    volume_dir = unpriv.workdir / "root" / "volumes" / "data"
    assert info["Mountpoint"] == str(volume_dir / "_data")
    assert stat.S_IMODE(volume_dir.stat().st_mode) == 0o700 and volume_dir.stat().st_uid == unpriv.uid
    # a volume holding files of other ids (subordinate ones) is removed all the same
    assert lamina("run", "--name", "user", "-v", "data:/d", "-v", "/anon", IMAGE, "true").returncode == 0
    r = lamina("volume", "rm", "data")
    assert r.returncode == 1 and "volume is in use" in r.stderr
    assert lamina("rm", "-v", "user").returncode == 0
    assert lamina("volume", "rm", "data").returncode == 0
    assert not volume_dir.exists()
    assert lamina("volume", "ls", "-q").stdout == ""
    assert fuse_mounts_under(unpriv.workdir) == []


def test_unprivileged_flags_seen_from_inside(unpriv) -> None:  # type: ignore[no-untyped-def]
    lamina = unpriv.lamina
    r = lamina("run", "--rm", "--add-host", "foo:1.2.3.4", "--dns", "9.9.9.9", "--cap-drop", "ALL",
               "--cap-add", "NET_RAW", "--security-opt", "no-new-privileges", "--ulimit", "nofile=100:200",
               "--shm-size", "2m", IMAGE, "sh", "-c",
               "grep foo /etc/hosts; grep nameserver /etc/resolv.conf; grep -E '^(CapEff|NoNewPrivs)' "
               "/proc/self/status; ulimit -n; df -k /dev/shm | tail -1 | awk '{print $2}'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == ["1.2.3.4\tfoo", "nameserver 9.9.9.9", "CapEff:\t0000000000002000",
                                         "NoNewPrivs:\t1", "100", "2048"]
    # a hard limit above the user's own is refused in one line, as the kernel refuses it
    r = lamina("run", "--rm", "--ulimit", "nofile=1048576:1048577", IMAGE, "true")
    assert r.returncode == 125 and "--ulimit nofile" in r.stderr and r.stderr.count("\n") == 1
    assert lamina("ps", "-aq").stdout == ""


def test_unprivileged_pid_host_and_network_of_a_container(unpriv) -> None:  # type: ignore[no-untyped-def]
    lamina = unpriv.lamina
    r = lamina("run", "--rm", "--pid", "host", IMAGE, "sh", "-c", "echo $$; grep -c . /proc/1/comm")
    assert r.returncode == 0 and r.stdout.split()[0] != "1", r.stderr
    assert lamina("run", "-d", "--name", "owner", "--network", "none", IMAGE, "sh", "-c",
                  "hostname > /tmp/h; nc -l -p 7000 -e cat /tmp/h").returncode == 0
    r = lamina("run", "--rm", "--network", "container:owner", IMAGE, "sh", "-c",
               "for i in 1 2 3 4 5 6 7 8 9 10; do nc 127.0.0.1 7000 </dev/null && break; sleep 0.3; done")
    assert r.returncode == 0 and len(r.stdout.strip()) == 12, (r.stdout, r.stderr)
    assert lamina("rm", "-f", "owner").returncode == 0
