"""The pure parsers behind run's flags (runner.runflags, runner.mountflags) and the cgroup v2
delegation logic (runner.cgroups) on a hand-made tree; each expectation is docker's documented
behaviour or its CLI's source (docker/cli opts/mount.go, opts/hosts.go, moby oci/caps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.errors import UsageError
from runner import cgroups, linux, mountflags, runflags


def test_volume_flag_forms() -> None:
    named = mountflags.parse_volume("data:/srv/:ro")
    assert (named.kind, named.volume, named.target, named.readonly) == ("volume", "data", "/srv", True)
    assert mountflags.parse_volume("data:/srv:nocopy").copy is False
    anonymous = mountflags.parse_volume("/cache")
    assert (anonymous.kind, anonymous.volume) == ("volume", None)
    bind = mountflags.parse_volume("/tmp:/t:rw")
    assert (bind.kind, bind.source, bind.readonly) == ("bind", "/tmp", False)
    relative = mountflags.parse_volume("./:/t")  # docker 23: a path relative to the working directory
    assert (relative.kind, relative.source) == ("bind", os.getcwd())
    for bad, message in (("a/b:/x", "invalid characters for a local volume name"),
                         ("data:rel", "mount path must be absolute"), ("data:/x:rx", "invalid mode: rx"),
                         ("/", "destination can't be '/'"), (":/x", "invalid volume specification")):
        with pytest.raises(UsageError, match=message):
            mountflags.parse_volume(bad)


def test_mount_flag_defaults_and_errors() -> None:
    plan = mountflags.parse_mount("target=/x")  # docker's default type is volume
    assert (plan.kind, plan.volume, plan.readonly) == ("volume", None, False)
    plan = mountflags.parse_mount("type=volume,src=vv,dst=/x,ro=true,volume-nocopy,volume-label=a=b")
    assert (plan.volume, plan.readonly, plan.copy, plan.labels) == ("vv", True, False, {"a": "b"})
    plan = mountflags.parse_mount("type=tmpfs,destination=/t,tmpfs-size=64m,tmpfs-mode=0700,readonly=false")
    assert (plan.kind, plan.options, plan.readonly) == ("tmpfs", "size=67108864,mode=700", False)
    assert mountflags.parse_mount("type=bind,source=/tmp,target=/t,readonly").readonly
    with pytest.raises(UsageError, match="invalid field 'junk' must be a key=value pair"):
        mountflags.parse_mount("type=bind,junk,target=/t")
    with pytest.raises(UsageError, match="cannot mix 'volume-\\*' options with mount type 'tmpfs'"):
        mountflags.parse_mount("type=tmpfs,target=/t,volume-nocopy")
    with pytest.raises(UsageError, match="only the local volume driver"):
        mountflags.parse_mount("type=volume,target=/t,volume-driver=nfs")


def test_duplicates_volumes_from_and_image_volumes() -> None:
    plans = [mountflags.parse_volume("/data"), mountflags.parse_tmpfs("/run:size=1m")]
    with pytest.raises(UsageError, match="^Duplicate mount point: /data$"):
        mountflags.check_duplicates([*plans, mountflags.parse_mount("type=tmpfs,target=/data/")])
    mountflags.check_duplicates(plans)
    merged = mountflags.add_image_volumes(plans, ["/data", "/logs", "relative", "/"])
    assert [(p.target, p.kind) for p in merged] == [("/data", "volume"), ("/run", "tmpfs"), ("/logs", "volume")]
    source = [{"target": "/b", "kind": "bind", "source": "/h", "readonly": True},
              {"target": "/v", "kind": "volume", "source": "/s/_data", "volume": "v", "copy": True},
              {"target": "/t", "kind": "tmpfs", "source": None}]
    name, borrowed = mountflags.volumes_from("src:rw", source)
    assert name == "src" and [(p.target, p.readonly) for p in borrowed] == [("/b", False), ("/v", False)]
    assert all(p.readonly for p in mountflags.volumes_from("src:ro", source)[1])
    assert [p.readonly for p in mountflags.volumes_from("src", source)[1]] == [True, False]


def test_sizes_as_docker_reads_them() -> None:
    assert mountflags.parse_bytes("--shm-size", "64m") == 64 << 20
    assert mountflags.parse_bytes("--shm-size", "1g") == 1 << 30
    assert mountflags.parse_bytes("--shm-size", "512kb") == 512 << 10
    assert mountflags.parse_bytes("--shm-size", "1048576") == 1 << 20
    assert mountflags.parse_bytes("--memory", "1.5g") == int(1.5 * (1 << 30))
    for bad in ("", "m", "-1m", "12x", "lots"):
        with pytest.raises(UsageError, match="invalid size"):
            mountflags.parse_bytes("--shm-size", bad)


def test_capabilities_as_moby_tweaks_them() -> None:
    default = list(linux.DOCKER_DEFAULT_CAPS)
    assert set(runflags.capabilities([], [], False)) == set(default)
    caps = runflags.capabilities(["sys_admin", "CAP_NET_ADMIN"], ["chown"], False)
    assert "CAP_SYS_ADMIN" in caps and "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps
    assert runflags.capabilities(["NET_RAW"], ["ALL"], False) == ["CAP_NET_RAW"]
    assert runflags.capabilities([], ["ALL"], False) == []
    assert runflags.capabilities(["ALL"], [], False) == list(linux.CAPABILITIES)
    assert runflags.capabilities([], ["ALL"], True) == list(linux.CAPABILITIES)
    assert linux.cap_mask(default) == 0xA80425FB  # docker's and podman's CapEff


def test_security_opts_hosts_dns_labels_ulimits(tmp_path: Path) -> None:
    assert runflags.parse_security_opts([]) == {"seccomp": True, "no_new_privileges": False, "unmask_proc": False}
    opts = runflags.parse_security_opts(["no-new-privileges:true", "seccomp:unconfined", "label=disable",
                                         "apparmor=unconfined", "systempaths=unconfined"])
    assert opts == {"seccomp": False, "no_new_privileges": True, "unmask_proc": True}
    assert not runflags.parse_security_opts(["no-new-privileges=false"])["no_new_privileges"]
    with pytest.raises(UsageError, match="only seccomp=unconfined"):
        runflags.parse_security_opts(["seccomp=/etc/profile.json"])
    assert runflags.parse_add_host("db:10.0.0.1") == ("db", "10.0.0.1")
    assert runflags.parse_add_host("v6:::1") == ("v6", "::1")
    assert runflags.parse_add_host("v6=[2001:db8::1]") == ("v6", "2001:db8::1")
    assert runflags.parse_add_host("gw:host-gateway") == ("gw", runflags.SLIRP_GATEWAY)
    assert runflags.parse_dns("9.9.9.9") == "9.9.9.9"
    labels = tmp_path / "labels"
    labels.write_text("a=1\n# no\n\nflag\n")
    assert runflags.read_labels(["a=2", "b="], [str(labels)]) == {"a": "2", "flag": "", "b": ""}
    assert runflags.parse_ulimit("nofile=1024") == {"Name": "nofile", "Soft": 1024, "Hard": 1024}
    assert runflags.parse_ulimit("core=-1:-1") == {"Name": "core", "Soft": -1, "Hard": -1}
    assert runflags.rlimits([{"Name": "nofile", "Soft": 1, "Hard": 2}]) == [(7, 1, 2)]


def test_restart_policy_decisions() -> None:
    on_failure = runflags.parse_restart("on-failure:2")
    assert on_failure == {"Name": "on-failure", "MaximumRetryCount": 2}
    assert runflags.should_restart(on_failure, 1, 0, False)
    assert runflags.should_restart(on_failure, 1, 1, False)
    assert not runflags.should_restart(on_failure, 1, 2, False)
    assert not runflags.should_restart(on_failure, 0, 0, False)
    assert runflags.should_restart(runflags.parse_restart("on-failure"), 3, 100, False)
    always = runflags.parse_restart("always")
    assert runflags.should_restart(always, 0, 5, False)
    assert not runflags.should_restart(always, 0, 5, True)  # stopped by the user
    assert not runflags.should_restart(runflags.parse_restart("no"), 1, 0, False)
    with pytest.raises(UsageError, match="maximum retry count must be an integer"):
        runflags.parse_restart("on-failure:x")


def test_log_opts_and_platform() -> None:
    assert runflags.parse_log_opts(["max-size=10m", "max-file=3"], None) == {"max-size": "10m", "max-file": "3"}
    assert runflags.parse_log_opts([], "json-file") == {}
    with pytest.raises(UsageError, match="max-file cannot be set without max-size"):
        runflags.parse_log_opts(["max-file=3"], None)
    with pytest.raises(UsageError, match="invalid log opt format"):
        runflags.parse_log_opts(["max-size"], None)
    from lamina.store.platforms import host_platform

    host = host_platform()
    assert runflags.parse_platform(f"linux/{host.architecture}") == str(host)
    other = "arm64" if host.architecture != "arm64" else "amd64"
    with pytest.raises(UsageError, match=f"--platform linux/{other}: only the host's platform"):
        runflags.parse_platform(f"linux/{other}")
    with pytest.raises(UsageError):
        runflags.parse_platform("windows/amd64")


def _tree(root: Path, own: str, owner: int, delegated_from: str) -> None:
    """A cgroup2-like tree: ``root/own`` exists; from ``root/delegated_from`` down, owned by ``owner``."""
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    path = root
    for part in own.strip("/").split("/"):
        path = path / part
        path.mkdir()
        (path / "cgroup.procs").write_text("")
    for directory in [root / delegated_from, *(root / delegated_from).rglob("*")]:
        if directory.is_dir():
            os.chown(directory, owner, owner)
            os.chown(directory / "cgroup.procs", owner, owner)


@pytest.mark.root
def test_cgroup_delegation_is_found_and_limits_written(tmp_path: Path) -> None:
    own = "user.slice/user-4242.slice/user@4242.service/app.slice/term.scope"
    _tree(tmp_path, own, 4242, "user.slice/user-4242.slice/user@4242.service")
    delegated = tmp_path / "user.slice/user-4242.slice/user@4242.service"
    found = cgroups.find_delegation(tmp_path, f"12:pids:/x\n0::/{own}\n", uid=4242)
    assert found == delegated
    assert cgroups.find_delegation(tmp_path, f"0::/{own}\n", uid=4343) is None  # owns nothing
    assert cgroups.find_delegation(tmp_path, "4:memory:/x\n", uid=4242) is None  # cgroup v1 only
    assert cgroups.find_delegation(tmp_path / "nothing", f"0::/{own}\n", uid=4242) is None
    resources = {"Memory": 64 << 20, "NanoCpus": 1_500_000_000, "PidsLimit": 10}
    assert cgroups.plan_limits(resources, None) == cgroups.WARNING
    (delegated / "cgroup.subtree_control").write_text("memory pids\n")
    problem = cgroups.plan_limits(resources, delegated)
    assert problem is not None and "cpu" in problem and "memory" not in problem.split("controllers")[1][:8]
    (delegated / "cgroup.subtree_control").write_text("cpu memory pids\n")
    assert cgroups.plan_limits(resources, delegated) is None
    assert cgroups.plan_limits({}, None) is None
    limits = cgroups.make_cgroup(delegated, "lamina-abc", resources)
    written = {p.name: p.read_text() for p in limits.directory.iterdir()}
    assert written == {"memory.max": str(64 << 20), "memory.swap.max": str(64 << 20), "cpu.max": "150000 100000",
                       "pids.max": "10"}
    assert cgroups.limit_files({"PidsLimit": -1}) == {"pids.max": "max"}


def test_log_rotation_keeps_max_file_files_and_reads_across_them(tmp_path: Path) -> None:
    """docker's json-file max-size/max-file: LOG, LOG.1 ... LOG.(max-file - 1), oldest dropped;
    ``logs`` reads the kept files oldest first, and a follower moves on to the new file."""
    import contextlib

    from runner.containerlog import STDOUT, LogReader, LogWriter, rotated_path

    path = tmp_path / "container-json.log"
    follower = LogReader(path)
    with contextlib.closing(LogWriter(path, max_size=400, max_files=3)) as writer:
        for number in range(40):
            writer.write(STDOUT, f"line {number:02d}\n".encode())
            if number == 2:
                assert [r.data for r in follower.read()] == [b"line 00\n", b"line 01\n", b"line 02\n"]
    kept = [path, rotated_path(path, 1), rotated_path(path, 2)]
    assert all(p.exists() and p.stat().st_size <= 400 for p in kept)
    assert not rotated_path(path, 3).exists()
    with contextlib.closing(LogReader(path)) as reader:
        lines = [r.data for records in reader.read_all() for r in records]
    assert lines == [f"line {n:02d}\n".encode() for n in range(40 - len(lines), 40)]
    assert 10 < len(lines) < 40
    followed = [r.data for records in follower.read_all() for r in records]
    assert followed[-1] == b"line 39\n"  # lines rotated away before it looked are lost, as in docker
    follower.close()
    one = tmp_path / "one.log"
    with contextlib.closing(LogWriter(one, max_size=200, max_files=1)) as writer:
        for number in range(20):
            writer.write(STDOUT, f"n{number}\n".encode())
    assert one.stat().st_size <= 200 and not rotated_path(one, 1).exists()
    with contextlib.closing(LogReader(one)) as reader:
        assert [r.data for records in reader.read_all() for r in records][-1] == b"n19\n"
