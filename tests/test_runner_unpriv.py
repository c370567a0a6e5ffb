"""``lamina run`` and the lifecycle as an unprivileged user, with and without subordinate ids."""

from __future__ import annotations

import os


import pytest

from harness import fuse_mounts_under
from runner_support import free_port, http_get_eventually, on_pty, read_until

pytestmark = [pytest.mark.unprivileged, pytest.mark.fuse, pytest.mark.slow]

IMAGE = "lamina/busybox"


def test_unprivileged_lifecycle(unpriv) -> None:  # type: ignore[no-untyped-def]
    lamina = unpriv.lamina
    r = lamina("run", "--rm", "-e", "X=1", "-w", "/w", IMAGE, "sh", "-c",
               'id -u; echo "$X $PWD"; cat /proc/self/uid_map; exit 3')
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0" and lines[1] == "1 /w"
    assert lines[2].split() == ["0", str(unpriv.uid), "1"]
    assert (len(lines) == 4) == unpriv.has_subids

    r = lamina("run", "--rm", "-u", "nobody", IMAGE, "id", "-u")
    if unpriv.has_subids:
        assert r.returncode == 0 and r.stdout == "65534\n", r.stderr
    else:
        assert r.returncode == 125 and "cannot switch to uid 65534" in r.stderr

    # a container that leaves files owned by other ids (subids) or by root
    owner = "nobody" if unpriv.has_subids else "root"
    r = lamina("run", "--name", "mk", IMAGE, "sh", "-c",
               f"echo d > /made; mkdir -m 700 /home/priv; echo s > /home/priv/s; chown -R {owner} /home/priv; "
               "rm /bin/vi; ls /etc/hosts /etc/hostname /etc/resolv.conf >/dev/null")
    assert r.returncode == 0, r.stderr
    diff = lamina("diff", "mk").stdout.splitlines()
    assert diff == ["C /bin", "D /bin/vi", "C /home", "A /home/priv", "A /home/priv/s", "A /made"]
    r = lamina("commit", "mk", "mine:1")
    assert r.returncode == 0, r.stderr
    r = lamina("run", "--rm", "--network", "none", "mine:1", "sh", "-c",
               "cat /made; stat -c %U /home/priv/s; ls /bin/vi 2>/dev/null || echo gone")
    assert r.stdout.split() == ["d", owner, "gone"], r.stderr
    assert lamina("rm", "mk").returncode == 0
    assert "mk" not in lamina("ps", "-a").stdout

    # detached, exec, stop, published port
    www = unpriv.workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("rootless hello\n")
    unpriv.chown_tree(www)
    port = free_port()
    r = lamina("run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:8000", "-v", f"{www}:/www:ro", IMAGE,
               "httpd", "-f", "-p", "8000", "-h", "/www")
    assert r.returncode == 0, r.stderr
    r = lamina("exec", "web", "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '")
    assert r.stdout.startswith("httpd -f"), r.stderr
    assert http_get_eventually(f"http://127.0.0.1:{port}/") == "rootless hello\n"
    assert lamina("stop", "-t", "1", "web").returncode == 0
    assert "Exited (137)" in lamina("ps", "-a").stdout
    assert lamina("rm", "web").returncode == 0
    assert fuse_mounts_under(unpriv.workdir) == []


def test_unprivileged_escapes_logs_and_tty(unpriv) -> None:  # type: ignore[no-untyped-def]
    lamina = unpriv.lamina
    outside = unpriv.workdir / "outside"
    src = unpriv.workdir / "src"
    for d in (outside, src):
        d.mkdir()
    (src / "secret").write_text("s")
    unpriv.chown_tree(unpriv.workdir)
    r = lamina("run", "--name", "evil", "--network", "none", IMAGE, "sh", "-c",
               f"ln -s ../../../../../../..{outside} /esc; echo made")
    assert r.returncode == 0, r.stderr
    assert lamina("logs", "evil").stdout == "made\n"
    assert lamina("commit", "evil", "evil:1").returncode == 0
    r = lamina("run", "--rm", "--network", "none", "-w", "/esc/wd", "-v", f"{src}:/esc/vol:ro", "evil:1", "sh",
               "-c", f"touch inwd; ls /esc/vol; echo 1 > /proc/sys/kernel/hostname || echo procsys-refused; "
                     f"cat {src}/secret 2>/dev/null || echo no-host-fs")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["secret", "procsys-refused", "no-host-fs"]
    assert list(outside.iterdir()) == []

    with on_pty(["lamina", "run", "-it", "--rm", "--network", "none", IMAGE, "sh"], env=unpriv.env(),
                cwd=unpriv.workdir, user=unpriv.uid, group=unpriv.gid, extra_groups=[]) as (proc, master):
        read_until(master, b"# ", timeout=30)
        os.write(master, b"echo $((40+2)); exit 6\r")
        read_until(master, b"42", timeout=30)
        assert proc.wait(timeout=30) == 6
