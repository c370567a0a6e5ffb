"""runner.sandbox on a plain busybox root: isolation, exit codes, mounts, escapes, signals.

These run as root (the sandbox still makes a user namespace: identity map); the unprivileged
variants drive the same code through a small script run as the test user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness import make_busybox_rootfs
from lamina.errors import CommandNotFound, CommandNotInvokable, ContainerError
from runner.linux import DOCKER_DEFAULT_CAPS, cap_mask
from runner.sandbox import Mount, SandboxSpec, run_sandboxed, start_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def template_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs(tmp_path_factory.mktemp("bb") / "root")


@pytest.fixture
def rootfs(template_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    shutil.copytree(template_root, root, symlinks=True)
    return root


def run(rootfs: Path, script: str, tmp_path: Path, **kwargs: object) -> tuple[int, str]:
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        spec = SandboxSpec(argv=["/bin/sh", "-c", script], rootfs=rootfs, stdout=f.fileno(), stderr=f.fileno(),
                           network=str(kwargs.pop("network", "none")), **kwargs)  # type: ignore[arg-type]
        code = run_sandboxed(spec)
    return code, out.read_text()


def test_exit_code_env_cwd_user(rootfs: Path, tmp_path: Path) -> None:
    code, out = run(rootfs, 'echo "$FOO|$HOME|$PATH"; pwd; id -u; id -g; exit 7', tmp_path,
                    env={"FOO": "bar"}, cwd="/work/dir", user="nobody")
    assert code == 7
    lines = out.splitlines()
    assert lines[0] == "bar|/nonexistent|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[1:] == ["/work/dir", "65534", "65534"]


def test_killed_by_signal_is_128_plus(rootfs: Path, tmp_path: Path) -> None:
    # Under --init the command is not PID 1, so its own SIGKILL is not ignored by the kernel.
    code, _ = run(rootfs, "kill -9 $$", tmp_path, init=True)
    assert code == 137


def test_command_not_found_and_not_executable(rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound, match="executable file not found"):
        run_sandboxed(SandboxSpec(argv=["nosuchcmd"], rootfs=rootfs, network="none"))
    with pytest.raises(CommandNotFound, match="no such file"):
        run_sandboxed(SandboxSpec(argv=["/bin/nosuch"], rootfs=rootfs, network="none"))
    (rootfs / "notexec").write_text("#!/bin/sh\n")
    with pytest.raises(CommandNotInvokable, match="permission denied"):
        run_sandboxed(SandboxSpec(argv=["/notexec"], rootfs=rootfs, network="none"))
    with pytest.raises(ContainerError, match="unable to find user ghost"):
        run_sandboxed(SandboxSpec(argv=["true"], rootfs=rootfs, network="none", user="ghost"))


def test_isolation(rootfs: Path, tmp_path: Path) -> None:
    script = textwrap.dedent("""\
        echo "pid=$$"
        hostname
        grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
        echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo procsys-writable || echo procsys-ro
        touch /sys/x 2>/dev/null && echo sys-writable || echo sys-ro
        ls /dev | tr '\\n' ' '; echo
        cat /etc/hosts
        ls /proc | grep -c '^[0-9]'
    """)
    code, out = run(rootfs, script, tmp_path, hostname="boxy")
    assert code == 0, out
    assert "pid=1" in out and "boxy" in out.splitlines()
    mask = f"{cap_mask(DOCKER_DEFAULT_CAPS):016x}"
    assert f"CapEff:\t{mask}" in out and f"CapBnd:\t{mask}" in out
    assert "NoNewPrivs:\t1" in out
    assert "procsys-ro" in out and "sys-ro" in out
    dev_line = next(line for line in out.splitlines() if "urandom" in line).split()
    assert sorted(dev_line) == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                                       "stdout", "tty", "urandom", "zero"])
    assert "127.0.0.1\tlocalhost" in out and "boxy" in out
    # only the container's own processes are visible: sh and ls/grep
    assert int(out.strip().splitlines()[-1]) <= 4
    # the /etc files were provided by bind mounts, the root's own /etc untouched except mount points
    assert (rootfs / "etc" / "hostname").read_text() == ""


def test_network_none_only_loopback(rootfs: Path, tmp_path: Path) -> None:
    code, out = run(rootfs, "ip -o link | cut -d: -f2; ip route; nc -w 2 10.0.2.2 80 </dev/null || echo unreachable",
                    tmp_path, network="none")
    assert code == 0
    assert out.split() == ["lo", "unreachable"] or out.split()[:1] == ["lo"] and "unreachable" in out
    assert "tap0" not in out and "default" not in out


def test_slirp_network_has_tap(rootfs: Path, tmp_path: Path) -> None:
    code, out = run(rootfs, "ip -o -4 addr show tap0; ip route; cat /etc/resolv.conf", tmp_path, network="slirp")
    assert code == 0, out
    assert "10.0.2.100/24" in out and "default via 10.0.2.2" in out and "nameserver 10.0.2.3" in out


def test_bind_mounts_ro_rw_and_tmpfs(rootfs: Path, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "f").write_text("read me")
    script = "echo hi > /mnt/rw/new; cat /mnt/ro/f; echo; echo x > /mnt/ro/g || echo ro-refused; " \
             "echo t > /scratch/t && grep -c scratch /proc/mounts"
    code, out = run(rootfs, script, tmp_path, mounts=[
        Mount(target="/mnt/rw", source=rw), Mount(target="/mnt/ro", source=ro, readonly=True),
        Mount(target="/scratch", kind="tmpfs")])
    assert code == 0, out
    assert (rw / "new").read_text() == "hi\n"
    assert "read me" in out and "ro-refused" in out
    assert not (ro / "g").exists()
    assert not (rootfs / "scratch" / "t").exists()


def test_mount_targets_and_workdir_cannot_escape(rootfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # symlinks in the image that point "outside": absolute with .., relative climbing
    (rootfs / "esc_abs").symlink_to(f"/../../../../..{outside}")
    (rootfs / "esc_rel").symlink_to("../../../../../../../../../../..")
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("m")
    code, out = run(rootfs, "pwd; touch here; ls /esc_abs/sub", tmp_path, cwd=f"/esc_rel{outside}/wd",
                    mounts=[Mount(target="/esc_abs/sub", source=src)])
    assert code == 0, out
    assert out.splitlines()[0] == f"{outside}/wd"
    assert "marker" in out
    # everything landed inside the root, nothing outside it
    assert list(outside.iterdir()) == []
    assert (rootfs / str(outside).lstrip("/") / "wd" / "here").exists()
    assert (rootfs / str(outside).lstrip("/") / "sub").is_dir()


def test_no_host_filesystem_reachable(rootfs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    script = f"cat {secret} 2>&1; ls /proc/1/root{secret} 2>&1; cat /proc/1/cwd/../../{secret.name} 2>&1; " \
             "mount -t proc proc /mnt 2>&1 || echo no-mount; ls -d /old_root /.pivot_root* 2>&1"
    code, out = run(rootfs, script, tmp_path)
    assert "host secret" not in out
    assert "no-mount" in out or "Operation not permitted" in out or "Permission denied" in out


def test_read_only_root(rootfs: Path, tmp_path: Path) -> None:
    code, out = run(rootfs, "touch /x 2>&1 || echo refused; echo ok > /dev/null && echo devok", tmp_path,
                    readonly_rootfs=True)
    assert "refused" in out and "devok" in out
    assert not (rootfs / "x").exists()


def test_seccomp_refuses_new_namespaces(rootfs: Path, tmp_path: Path) -> None:
    script = "unshare -U true 2>&1 || echo refused-user; unshare -m true 2>&1 || echo refused-mnt; " \
             "(sleep 0.1 &) ; wait; grep -c '^Seccomp:[[:space:]]2' /proc/self/status"
    code, out = run(rootfs, script, tmp_path)
    assert "refused-user" in out and "refused-mnt" in out and out.split()[-1] == "1", out
    code, out = run(rootfs, "unshare -U true && echo nested-ok", tmp_path, seccomp=False)
    assert "nested-ok" in out, out


def test_init_reaper_forwards_signals(rootfs: Path, tmp_path: Path) -> None:
    out_r, out_w = os.pipe()
    script = 'echo "me=$$"; trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    sandbox = start_sandbox(SandboxSpec(argv=["/bin/sh", "-c", script], rootfs=rootfs, network="none",
                                        init=True, stdout=out_w))
    os.close(out_w)
    with os.fdopen(out_r) as out:
        first = out.readline().strip()
        assert out.readline().strip() == "ready"
        sandbox.send_signal(signal.SIGTERM)
        code = sandbox.wait()
        rest = out.read()
    assert first != "me=1"  # the reaper is PID 1, the command its child
    assert code == 42 and "got-term" in rest


UNPRIV_SCRIPT = """
import json, os, sys
from pathlib import Path
from runner.sandbox import SandboxSpec, run_sandboxed, start_sandbox
from lamina.errors import LaminaError
root = Path(sys.argv[1])
out = root.parent / "out.txt"
results = {}
for name, user in (("root", "0"), ("nobody", "nobody")):
    with open(out, "wb") as f:
        try:
            code = run_sandboxed(SandboxSpec(argv=["/bin/sh", "-c", "id -u; cat /proc/self/uid_map; touch /tmp/t$(id -u) && echo wrote"],
                                             rootfs=root, network=sys.argv[2], user=user, stdout=f.fileno(), stderr=f.fileno()))
        except LaminaError as e:
            code = -e.exit_code
            out.write_text(str(e))
    results[name] = [code, out.read_text()]
print(json.dumps(results))
"""


@pytest.mark.unprivileged
@pytest.mark.parametrize("network", ["none", "slirp"])
def test_unprivileged_sandbox(unpriv, network: str) -> None:  # type: ignore[no-untyped-def]
    root = make_busybox_rootfs(unpriv.workdir / "rootfs")
    subprocess.run(["chown", "-R", f"{unpriv.uid}:{unpriv.gid}", str(unpriv.workdir)], check=True)
    script = unpriv.workdir / "probe.py"
    script.write_text(UNPRIV_SCRIPT)
    result = unpriv.run(["lamina-python", str(script), str(root), network], timeout=60)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    code, out = results["root"]
    assert code == 0, out
    lines = out.split("\n")
    assert lines[0] == "0"
    assert lines[1].split() == ["0", str(unpriv.uid), "1"]
    assert "wrote" in out
    code, out = results["nobody"]
    if unpriv.has_subids:
        assert code == 0, out
        assert out.split("\n")[0] == "65534"
    else:
        # uid 65534 is outside a single-id map: a clear error, not a crash
        assert code == -125 and "cannot switch to uid 65534" in out
