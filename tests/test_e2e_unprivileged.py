"""End to end as an unprivileged user, with and without subordinate ids: the docker user's flow.

The same steps a docker user takes (build, run with flags, exit codes, volumes, detached containers,
diff / commit, save / rmi / load) run as a plain account that has only /dev/fuse and fusermount3.
Ownership set inside the image (chown to a non-root uid) must survive build, commit, save and load
in both variants: with subordinate ids it is real, without them unionfs keeps it in an xattr.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import UnprivilegedUser, docker_error_code, fuse_mounts_under

pytestmark = [pytest.mark.unprivileged, pytest.mark.fuse]


def dockerfile(has_subids: bool) -> str:
    """The docker user's Dockerfile. Without subordinate ids only the user's own uid is mapped, so
    (as with podman) RUN cannot chown to another id and no process can run as one: COPY --chown still
    records the owner, which the image keeps; the container shows it as root."""
    return f"""\
FROM lamina/busybox
WORKDIR /app
COPY hello.sh ./
COPY --chown=1234:1234 owned/ /app/owned/
ENV GREETING=hello NAME=world
RUN chmod 755 hello.sh && mkdir /d && for i in 1 2 3 4 5 6; do echo $i > /d/f$i; done \\
    && echo 'app:x:1234:1234::/app:/bin/sh' >> /etc/passwd && echo 'app:x:1234:' >> /etc/group \\
    && mkdir /app/chowned && {"chown 1234:1234 /app/chowned" if has_subids else "true"}
RUN rm -rf /d && mkdir /d && echo y > /d/y
{"USER app" if has_subids else ""}
ENTRYPOINT ["/app/hello.sh"]
CMD ["default-arg"]
"""


HELLO = '#!/bin/sh\necho "$GREETING $NAME|$*|$(pwd)|$(id -u)"\n'


def lamina(user: UnprivilegedUser, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = user.lamina(*args, check=check)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def build(user: UnprivilegedUser, tag: str = "e2e/app") -> None:
    context = user.workdir / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile(user.has_subids))
    (context / "hello.sh").write_text(HELLO)
    (context / "owned").mkdir()
    (context / "owned" / "file").write_text("mine\n")
    user.chown_tree(context)
    lamina(user, "build", "-t", tag, str(context), check=True)


def owners_in_layer_tars(archive: Path, member: str) -> set[tuple[int, int]]:
    """(uid, gid) of ``member`` in every layer of a docker-archive that contains it."""
    found = set()
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in manifest[0]["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(name)) as layer:
                for info in layer.getmembers():
                    if info.name.rstrip("/") == member:
                        found.add((info.uid, info.gid))
    return found


@pytest.fixture
def user(unpriv: UnprivilegedUser) -> Iterator[UnprivilegedUser]:
    yield unpriv
    ids = unpriv.lamina("ps", "-aq").stdout.split()
    if ids:
        unpriv.lamina("rm", "-f", *ids)
    assert fuse_mounts_under(unpriv.workdir) == []


@pytest.mark.slow
def test_build_and_run_like_docker(user: UnprivilegedUser) -> None:
    build(user)
    uid = "1234" if user.has_subids else "0"
    assert lamina(user, "run", "--rm", "e2e/app", check=True).stdout == f"hello world|default-arg|/app|{uid}\n"
    if not user.has_subids:
        r = lamina(user, "run", "--rm", "-u", "app", "e2e/app")
        assert r.returncode == 125 and r.stderr.count("\n") == 1 and "1234" in r.stderr, r.stderr
    r = lamina(user, "run", "--rm", "-e", "NAME=you", "-w", "/tmp", "-u", "0", "e2e/app", "x", check=True)
    assert r.stdout == "hello you|x|/tmp|0\n"
    # rm -rf + mkdir over a lower directory full of files: only the new file is seen. Owners set by
    # COPY --chown and RUN chown: real with subids; shown as root without (podman's
    # ignore_chown_errors), the image keeping the intended owner (see the save below).
    r = lamina(user, "run", "--rm", "--entrypoint", "sh", "e2e/app", "-c",
               "ls -A /d && stat -c '%u:%g %n' /app/owned /app/owned/file /app/chowned /app/hello.sh", check=True)
    owner = "1234:1234" if user.has_subids else "0:0"
    assert r.stdout.splitlines() == ["y", f"{owner} /app/owned", f"{owner} /app/owned/file",
                                     f"{owner} /app/chowned", "0:0 /app/hello.sh"]
    if user.has_subids:
        # The image's user may write to what it owns, not to what root owns.
        r = lamina(user, "run", "--rm", "--entrypoint", "sh", "e2e/app", "-c",
                   "echo more >> /app/owned/file && cat /app/owned/file; echo x > /app/hello.sh")
        assert r.returncode == 1 and r.stdout == "mine\nmore\n" and "Permission denied" in r.stderr
    assert lamina(user, "run", "--rm", "--entrypoint", "nope", "e2e/app").returncode == 127

    # A volume read-write and one read-only; the container's root writes as the user on the host.
    shared, frozen = user.workdir / "shared", user.workdir / "frozen"
    for path in (shared, frozen):
        path.mkdir()
        (path / "in").write_text("from host\n")
        user.chown_tree(path)
    r = lamina(user, "run", "--rm", "-u", "0", "-v", f"{shared}:/data", "-v", f"{frozen}:/ro:ro",
               "--entrypoint", "sh", "e2e/app", "-c", "cat /data/in; echo back > /data/out; echo no > /ro/in; exit 3")
    assert r.returncode == 3 and r.stdout == "from host\n" and "Read-only file system" in r.stderr
    assert (shared / "out").read_text() == "back\n" and (frozen / "in").read_text() == "from host\n"
    assert (shared / "out").stat().st_uid == user.uid
    assert lamina(user, "ps", "-aq").stdout == ""


@pytest.mark.slow
def test_lifecycle_commit_save_load(user: UnprivilegedUser) -> None:
    build(user)
    script = 'echo started; trap "echo stopping; exit 7" TERM; while :; do sleep 0.1; done'
    lamina(user, "run", "-d", "--name", "bg", "-u", "0", "--entrypoint", "sh", "e2e/app", "-c", script, check=True)
    deadline = time.monotonic() + 30
    while "started" not in lamina(user, "logs", "bg").stdout:
        assert time.monotonic() < deadline, "the detached container never logged"
        time.sleep(0.2)
    lamina(user, "stop", "bg", check=True)
    assert lamina(user, "logs", "bg", check=True).stdout == "started\nstopping\n"
    assert "Exited (7)" in lamina(user, "ps", "-a", check=True).stdout
    lamina(user, "rm", "bg", check=True)

    # A container changes a file owned by 1234, renames its lower directory, adds a file, empties /usr;
    # diff and commit keep the owners.
    chown = "chown 1234:1234 /app/new" if user.has_subids else "true"
    lamina(user, "run", "--name", "changer", "-u", "0", "--entrypoint", "sh", "e2e/app", "-c",
           f"echo new > /app/new && {chown} && echo v2 >> /app/owned/file && mv /app/owned /app/moved && rm /d/y"
           " && rm -rf /usr && mkdir /usr && echo only > /usr/only", check=True)
    diff = lamina(user, "diff", "changer", check=True).stdout.splitlines()
    assert {"A /app/new", "D /app/owned", "A /app/moved/file", "D /d/y"} <= set(diff)
    lamina(user, "commit", "changer", "e2e/committed", check=True)
    lamina(user, "rm", "changer", check=True)
    check_committed = ("--entrypoint", "sh", "e2e/committed", "-c",
                       "stat -c '%u %n' /app/new /app/moved/file; cat /app/moved/file; ls -A /d /usr; id -u")
    uid = "1234" if user.has_subids else "0"
    # the committed user is the container's -u 0, as docker records it
    expected = f"{uid} /app/new\n{uid} /app/moved/file\nmine\nv2\n/d:\n\n/usr:\nonly\n0\n"
    assert lamina(user, "run", "--rm", *check_committed, check=True).stdout == expected

    archive = user.workdir / "committed.tar"
    lamina(user, "save", "-o", str(archive), "e2e/committed", check=True)
    # The owners inside the archive are the container's, not the unprivileged user's.
    assert owners_in_layer_tars(archive, "app/new") == ({(1234, 1234)} if user.has_subids else {(0, 0)})
    # Without subordinate ids too: the copied-up, renamed file keeps the owner COPY --chown gave it.
    assert owners_in_layer_tars(archive, "app/moved/file") == {(1234, 1234)}
    image_id = lamina(user, "images", "-q", "e2e/committed", check=True).stdout
    lamina(user, "rmi", "e2e/committed", "e2e/app", check=True)
    lamina(user, "system", "prune", "-f", check=True)
    lamina(user, "load", "-i", str(archive), check=True)
    assert lamina(user, "images", "-q", "e2e/committed", check=True).stdout == image_id
    assert lamina(user, "run", "--rm", *check_committed, check=True).stdout == expected
    assert lamina(user, "system", "check", check=True).returncode == 0
    # Everything the user's store holds stays removable by that user (no subordinate-id leftovers).
    lamina(user, "rmi", "e2e/committed", check=True)
    lamina(user, "system", "prune", "-a", "-f", check=True)
    root = user.workdir / "root"
    assert not list((root / "layers").iterdir()) and not list((root / "blobs" / "sha256").iterdir())


def store_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under a store, build cache and lock files aside, with size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "build-cache"]
        for name in dirnames + filenames:
            if name not in ("lock", "tags.lock"):
                st = os.lstat(os.path.join(dirpath, name))
                found[os.path.relpath(os.path.join(dirpath, name), root)] = (
                    st.st_size if name in filenames else 0, st.st_mtime_ns if name in filenames else 0)
    return found


def test_bad_input_leaves_the_users_store(user: UnprivilegedUser) -> None:
    lamina(user, "run", "--name", "keeper", "lamina/busybox", "true", check=True)
    bad = user.workdir / "bad"
    bad.mkdir()
    (bad / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo partial > /p\nRUN exit 4\nFROBNICATE\n")
    (bad / "garbage.tar").write_bytes(b"not a tar\n" * 100)
    buffer = bad / "hostile.tar"
    with tarfile.open(buffer, "w") as tar:
        link = tarfile.TarInfo("lnk")
        link.type, link.linkname = tarfile.SYMTYPE, str(user.home)
        tar.addfile(link)
        info = tarfile.TarInfo("lnk/escaped")
        tar.addfile(info)
    user.chown_tree(bad)
    root = user.workdir / "root"
    state = (lamina(user, "images", "-q").stdout, lamina(user, "ps", "-aq").stdout)
    files = store_files(root)
    for argv, expect in [
        (("build", "-t", "bad/x", str(bad)), "Dockerfile:4:"),  # a parse error stops before any step
        (("load", "-i", str(bad / "garbage.tar")), "garbage.tar"),
        (("import", str(buffer), "evil/x"), "symlink"),
        (("rmi", "lamina/busybox"), "in use"),
        (("run", "--rm", "-v", "not/a-name:/x", "lamina/busybox", "true"), "invalid characters"),
        (("commit", "nosuch", "x/y"), "nosuch"),
    ]:
        r = lamina(user, *argv)
        assert r.returncode == docker_error_code(argv), (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("lamina: error: ") and expect in r.stderr, r.stderr
    assert not (user.home / "escaped").exists()
    # A failing RUN leaves nothing (the layers of steps that succeeded before it would stay as cache,
    # as docker keeps them).
    (bad / "Dockerfile").write_text("FROM lamina/busybox\nRUN echo partial > /p && echo shown && exit 4\n")
    r = lamina(user, "build", "-t", "bad/x", str(bad))
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("lamina: error: Dockerfile:2:")
    assert "shown" in r.stdout + r.stderr
    assert (lamina(user, "images", "-q").stdout, lamina(user, "ps", "-aq").stdout) == state
    after = store_files(root)
    assert {k: v for k, v in after.items() if files.get(k) != v} == {}, "files appeared or changed in the store"
    assert files.keys() <= after.keys(), "files vanished from the store"
    assert lamina(user, "system", "check").returncode == 0
