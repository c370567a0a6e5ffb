"""Pure parts of the runner: in-root path resolution, docker's config rules, flags, users, diff."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from lamina.errors import ContainerError, UsageError
from runner import imageconfig
from runner.diff import changes
from runner.network import PortMapping, normalize_network, parse_port
from runner.paths import make_dirs_in_root, resolve_in_root
from runner.userdb import resolve_user
from unionfs.core.stack import LayerStack

# --- paths -----------------------------------------------------------------------------------------


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "abs").symlink_to("/etc")  # absolute: means the container's /etc
    (root / "up").symlink_to("../../../..")  # climbs: must stop at the root
    (root / "data" / "hostetc").symlink_to("/../../../etc")
    (root / "loop").symlink_to("loop")
    return root


@pytest.mark.parametrize(("path", "expected"), [
    ("/etc", "etc"),
    ("/abs/passwd", "etc/passwd"),
    ("/up/etc", "etc"),
    ("/../../etc/shadow", "etc/shadow"),
    ("/data/hostetc/x", "etc/x"),
    ("/data/../../..", ""),
    ("/missing/../etc", "etc"),
    ("relative/./x", "relative/x"),
])
def test_resolve_in_root_never_leaves_the_root(hostile_root: Path, path: str, expected: str) -> None:
    resolved = resolve_in_root(str(hostile_root), path)
    assert resolved == os.path.join(str(hostile_root), expected).rstrip("/")
    assert os.path.commonpath([resolved, str(hostile_root)]) == str(hostile_root)


def test_resolve_in_root_symlink_loop(hostile_root: Path) -> None:
    with pytest.raises(OSError) as info:
        resolve_in_root(str(hostile_root), "/loop/x")
    assert info.value.errno == errno.ELOOP


def test_make_dirs_in_root_follows_symlinks_inside(hostile_root: Path, tmp_path: Path) -> None:
    made = make_dirs_in_root(str(hostile_root), "/up/newdir/sub")
    assert made == str(hostile_root / "newdir" / "sub")
    assert (hostile_root / "newdir" / "sub").is_dir()
    assert not (tmp_path / "newdir").exists()
    (hostile_root / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_dirs_in_root(str(hostile_root), "/file/sub")


# --- docker's combination of image config and flags ---------------------------------------------------

CFG = {"Entrypoint": ["/entry", "-x"], "Cmd": ["default", "args"], "Env": ["PATH=/bin", "A=1", "B=image"],
       "WorkingDir": "/app", "User": "app", "StopSignal": "SIGQUIT", "Volumes": {"/data": {}}}


def test_argv_rules() -> None:
    assert imageconfig.container_argv(CFG, [], None) == ["/entry", "-x", "default", "args"]
    assert imageconfig.container_argv(CFG, ["mine"], None) == ["/entry", "-x", "mine"]
    # --entrypoint replaces ENTRYPOINT and drops the image's CMD
    assert imageconfig.container_argv(CFG, [], "/bin/sh") == ["/bin/sh"]
    assert imageconfig.container_argv(CFG, ["-c", "true"], "/bin/sh") == ["/bin/sh", "-c", "true"]
    assert imageconfig.container_argv(CFG, ["ls"], "") == ["ls"]
    assert imageconfig.container_argv({"Cmd": ["sh"]}, [], None) == ["sh"]
    with pytest.raises(UsageError):
        imageconfig.container_argv({}, [], None)


def test_env_rules(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nB=file\nC=from file=with equals\nFROM_HOST\n")
    env = imageconfig.container_env(CFG, [str(env_file)], ["A=flag", "FROM_HOST", "UNSET_ON_HOST", "E="],
                                    host_env={"FROM_HOST": "host value"})
    assert env == {"PATH": "/bin", "A": "flag", "B": "file", "C": "from file=with equals",
                   "FROM_HOST": "host value", "E": ""}
    bad = tmp_path / "bad"
    bad.write_text("GOOD=1\nBAD KEY=2\n")
    with pytest.raises(UsageError, match=r"bad:2"):
        imageconfig.container_env({}, [str(bad)], [])
    bad.write_text("A=x\0y\n")
    with pytest.raises(UsageError, match=r"bad:1: NUL"):
        imageconfig.container_env({}, [str(bad)], [])
    with pytest.raises(UsageError, match="nofile"):
        imageconfig.container_env({}, [str(tmp_path / "nofile")], [])


def test_workdir_user_signal_volumes() -> None:
    assert imageconfig.container_workdir(CFG, None) == "/app"
    assert imageconfig.container_workdir({}, None) == "/"
    assert imageconfig.container_workdir(CFG, "/x") == "/x"
    with pytest.raises(UsageError):
        imageconfig.container_workdir(CFG, "relative")
    assert imageconfig.container_user(CFG, None) == "app"
    assert imageconfig.container_user({}, None) == "0"
    assert imageconfig.container_user(CFG, "1:2") == "1:2"
    assert imageconfig.stop_signal(CFG) == 3
    assert imageconfig.stop_signal({}) == 15
    assert imageconfig.parse_signal("kill") == 9 and imageconfig.parse_signal("10") == 10
    with pytest.raises(UsageError):
        imageconfig.parse_signal("SIGNOPE")
    assert imageconfig.image_volumes(CFG) == ["/data"]


def test_volume_flag(tmp_path: Path) -> None:
    assert imageconfig.parse_volume_flag(f"{tmp_path}:/x:ro") == (str(tmp_path), "/x", True)
    assert imageconfig.parse_volume_flag(f"{tmp_path}:/x") == (str(tmp_path), "/x", False)
    assert imageconfig.parse_volume_flag("/anon") == (None, "/anon", False)
    created = tmp_path / "made" / "by" / "docker"
    imageconfig.parse_volume_flag(f"{created}:/y")
    assert created.is_dir()
    for bad in ("rel:/x", f"{tmp_path}:rel", f"{tmp_path}:/x:rx", "a:b:c:d"):
        with pytest.raises(UsageError):
            imageconfig.parse_volume_flag(bad)


def test_port_flag() -> None:
    assert parse_port("8080:80") == PortMapping("0.0.0.0", 8080, 80, "tcp")
    assert parse_port("127.0.0.1:53:5353/udp") == PortMapping("127.0.0.1", 53, 5353, "udp")
    assert str(parse_port("1:2")) == "0.0.0.0:1->2/tcp"
    # docker: a container port alone publishes it on a random host port (0 until it starts)
    assert parse_port("80") == PortMapping("0.0.0.0", 0, 80, "tcp")
    assert parse_port("127.0.0.1::80/udp") == PortMapping("127.0.0.1", 0, 80, "udp")
    for bad in ("x:80", "70000:80", "1:2/sctp", "0"):
        with pytest.raises(UsageError):
            parse_port(bad)
    assert normalize_network("bridge") == "slirp"
    with pytest.raises(UsageError):
        normalize_network("overlay")


# --- users -------------------------------------------------------------------------------------------


@pytest.fixture
def user_db(tmp_path: Path) -> tuple[str, str]:
    passwd = tmp_path / "passwd"
    group = tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n")
    group.write_text("root:x:0:\napp:x:1001:\nwheel:x:10:app,other\nstaff:x:50:\n")
    return str(passwd), str(group)


def test_resolve_user(user_db: tuple[str, str]) -> None:
    passwd, group = user_db
    assert resolve_user("app", passwd, group) == resolve_user("1000", passwd, group)
    app = resolve_user("app", passwd, group)
    assert (app.uid, app.gid, app.home, app.groups) == (1000, 1001, "/home/app", [10])
    assert resolve_user("app:staff", passwd, group).gid == 50
    assert resolve_user("app:7", passwd, group).gid == 7
    unknown = resolve_user("4242", passwd, group)
    assert (unknown.uid, unknown.gid, unknown.home) == (4242, 0, "/")
    assert resolve_user("0", None, None).uid == 0
    with pytest.raises(ContainerError, match="unable to find user nobody"):
        resolve_user("nobody", passwd, group)
    with pytest.raises(ContainerError, match="unable to find group nogroup"):
        resolve_user("app:nogroup", passwd, group)


# --- diff ---------------------------------------------------------------------------------------------


def test_diff_kinds(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "etc", lower / "bin", upper / "etc", upper / "bin", upper / "new" / "deep"):
        d.mkdir(parents=True)
    (lower / "etc" / "passwd").write_text("a")
    (lower / "bin" / "ls").write_text("a")
    (lower / "bin" / "cat").write_text("a")
    (upper / "etc" / "passwd").write_text("b")
    (upper / "etc" / "added").write_text("b")
    (upper / "new" / "deep" / "f").write_text("b")
    (upper / "bin" / ".wh.cat").write_text("")
    if os.geteuid() == 0:
        os.mknod(upper / "bin" / "ls", stat.S_IFCHR, os.makedev(0, 0))
    result = changes(upper, LayerStack.from_top_down([lower]))
    expected = [("C", "/bin"), ("D", "/bin/cat"), ("C", "/etc"), ("A", "/etc/added"), ("C", "/etc/passwd"),
                ("A", "/new"), ("A", "/new/deep"), ("A", "/new/deep/f")]
    if os.geteuid() == 0:
        expected.insert(2, ("D", "/bin/ls"))
    assert result == expected


@pytest.mark.parametrize(("argv", "forks"), [
    (["run", "--rm", "img", "true"], True),
    (["--root", "/r", "--log-level", "debug", "run", "-it", "img"], True),
    (["run", "-d", "img"], False),
    (["run", "--rm", "-itd", "img"], False),
    (["run", "--detach", "img"], False),
    (["--root", "run", "ps"], False),
    (["ps", "-a"], False),
    (["build", "run"], False),
])
def test_prefork_only_for_foreground_run(monkeypatch: pytest.MonkeyPatch, argv: list[str], forks: bool) -> None:
    from runner import unionserver

    calls: list[bool] = []
    monkeypatch.setattr(unionserver, "prefork", lambda: calls.append(True))
    unionserver.maybe_prefork(argv)
    assert bool(calls) == forks


UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not UNISTD_64.exists(), reason="linux-libc-dev headers not installed")
def test_seccomp_syscall_numbers_match_the_kernel_headers() -> None:
    from runner import seccomp

    numbers = {}
    for line in UNISTD_64.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_"):
            numbers[parts[1][5:]] = int(parts[2])
    for table in (seccomp.X86_64_DENY, seccomp.X86_64_NS_ARG0, seccomp.X86_64_ENOSYS):
        for name, nr in table.items():
            assert numbers[name] == nr, name


def test_seccomp_filter_assembles() -> None:
    from runner import seccomp

    program = seccomp.build_filter()
    assert len(program) % 8 == 0 and 40 < len(program) // 8 < 255
