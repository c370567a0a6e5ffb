"""kill -9 of lamina's unionfs server in the middle of writes.

What must hold afterwards (issue 3, "Proof"): the dead mount goes away with ``fusermount3 -u -z``;
the same upper mounts again, with lamina and with the kernel's overlayfs, and both show the same
tree; everything that was fsynced before the kill is there, intact; a copy-up cut short never
shows a half-copied file (copy-up is built in the workdir and renamed into place); and the workdir
is emptied of the dead server's leftovers at the next mount.

The kernel's view is taken in a private mount namespace (``unshare -m``), so that other users'
rootless podman processes cannot copy and pin the overlay mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fsops
from harness import MountedUnion, force_unmount, is_mounted, start_union, union_argv

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MIB = 1 << 20
BIG = 24 * MIB  # large enough that its copy-up is still running when the server dies


def pattern(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (4096 // 32)
    return (block * (size // len(block) + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    return digest(path.read_bytes())


def make_lower(lower: Path) -> None:
    (lower / "dir").mkdir(parents=True)
    for i in range(4):
        (lower / f"big{i}").write_bytes(pattern(i, BIG))
    for name in ("f1", "f2", "f3"):
        (lower / "dir" / name).write_bytes(pattern(hash(name) & 0xFF, 100_000))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, offset: int | None = None, append: bool = False) -> None:
    flags = os.O_WRONLY | (os.O_APPEND if append else 0) | (os.O_CREAT if offset is None and not append else 0)
    fd = os.open(path, flags, 0o644)
    try:
        if offset is not None:
            os.pwrite(fd, data, offset)
        else:
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def synced_changes(mnt: Path, lower: Path) -> dict[str, str | None]:
    """Changes made and fsynced (files and their directories) before the kill: path -> digest (None: gone)."""
    expected: dict[str, str | None] = {}
    (mnt / "new").mkdir()
    new_data = pattern(100, 3 * MIB)
    write_synced(mnt / "new" / "a", new_data)
    fsync_path(mnt / "new")
    fsync_path(mnt)
    expected["new/a"] = digest(new_data)

    tail = pattern(101, MIB)
    write_synced(mnt / "big0", tail, append=True)  # copy-up of a 24 MiB lower file, then data
    expected["big0"] = digest(pattern(0, BIG) + tail)

    f1 = bytearray((lower / "dir" / "f1").read_bytes())
    f1[5000:5010] = b"0123456789"
    write_synced(mnt / "dir" / "f1", b"0123456789", offset=5000)
    expected["dir/f1"] = digest(bytes(f1))

    os.rename(mnt / "dir" / "f2", mnt / "dir" / "f2r")
    os.unlink(mnt / "dir" / "f3")
    fsync_path(mnt / "dir")
    expected["dir/f2r"] = file_digest(lower / "dir" / "f2")
    expected["dir/f2"] = None
    expected["dir/f3"] = None
    return expected


def churn(mnt: Path, stop: threading.Event, progress: list[str]) -> None:
    """Unsynced writes until the filesystem goes away: new files, and copy-ups of big lower files."""
    (mnt / "churn").mkdir(exist_ok=True)
    i = 0
    try:
        while not stop.is_set():
            with open(mnt / "churn" / f"n{i}", "wb") as f:
                f.write(pattern(i, 200_000))
            progress.append(f"n{i}")
            if i in (2, 4):
                # Appending one byte copies up 24 MiB first: the kill lands in or near it.
                with open(mnt / f"big{i // 2}", "ab") as f:
                    f.write(b"!")
                progress.append(f"big{i // 2}")
            i += 1
    except OSError:
        pass  # ENOTCONN / ECONNABORTED once the server is dead: expected


def kernel_snapshot(lowers: list[Path], upper: Path, work: Path, mnt: Path) -> dict[str, Any]:
    """The kernel overlayfs view of these directories, as fsops.snapshot values (JSON-decoded)."""
    mnt.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    code = (
        "import json, subprocess, sys; sys.path.insert(0, sys.argv[1]); import fsops\n"
        "subprocess.run(['mount', '-t', 'overlay', 'overlay', '-o', sys.argv[2], sys.argv[3]], check=True)\n"
        "tree, _, _ = fsops.snapshot(sys.argv[3], 0)\n"
        "print(json.dumps(tree))\n"
    )
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    # (Already in a private namespace when called from a scenario; a nested one costs nothing.)
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", code,
                           str(Path(__file__).parent), opts, str(mnt)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the kernel cannot mount the upper: {proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def lamina_snapshot(mnt: Path) -> dict[str, Any]:
    tree, _, problems = fsops.snapshot(str(mnt), 0)
    assert not problems, problems
    # Same encoding as the kernel side (tuples become lists).
    decoded: dict[str, Any] = json.loads(json.dumps(tree))
    return decoded


def wait_for_copyup_in_workdir(work: Path, deadline_s: float = 20.0) -> bool:
    """True once a large temporary file (a copy-up in progress) shows in the workdir."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for dirpath, _dirs, files in os.walk(work):
            for name in files:
                try:
                    if os.lstat(os.path.join(dirpath, name)).st_size > MIB:
                        return True
                except OSError:
                    pass
        time.sleep(0.002)
    return False


def in_private_namespace(scenario: str, tmp_path: Path, timeout: float = 300) -> None:
    """Run ``scenario(tmp_path)`` of this module in a child process in a private mount namespace.

    Why: rootless podman processes of other users copy new mounts into their namespaces, and a FUSE
    server then does not exit after ``fusermount3 -u`` here; a private namespace keeps our mounts ours.
    """
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t.{scenario}(__import__('pathlib').Path(sys.argv[1]))")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", code, str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        pytest.fail(f"{scenario} failed:\n{proc.stderr[-6000:]}", pytrace=False)


@pytest.mark.slow
def test_kill9_during_writes(tmp_path: Path) -> None:
    in_private_namespace("kill9_during_writes", tmp_path)


def test_workdir_leftovers_are_removed_at_mount(tmp_path: Path) -> None:
    """A crash mid-copy-up leaves a temporary file in the workdir; the next mount removes it."""
    in_private_namespace("workdir_leftovers_are_removed_at_mount", tmp_path)


def kill9_during_writes(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    make_lower(lower)
    upper.mkdir()
    work.mkdir()
    argv = union_argv([lower], upper, work, mnt)
    first = start_union(argv, mnt, tmp_path / "first.log")
    stop = threading.Event()
    progress: list[str] = []
    writer = threading.Thread(target=churn, args=(mnt, stop, progress), daemon=True)
    try:
        expected = synced_changes(mnt, lower)
        writer.start()
        # Kill while a copy-up is under way if we can see one, else after some churn.
        saw_copyup = wait_for_copyup_in_workdir(work)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        stop.set()
        writer.join(timeout=30)
        assert not writer.is_alive(), "a writer hangs on the dead mount"
    finally:
        stop.set()
        cleanup(first)
    assert saw_copyup, "never saw a copy-up in progress in the workdir (the kill came at a random point)"
    assert progress, "the writer did nothing before the kill"
    leftovers = workdir_entries(work)
    print("leftovers:", leftovers, file=sys.stderr)

    # The dead mount is gone after a lazy unmount.
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
    assert not is_mounted(mnt)

    # lamina mounts the same upper again: fsynced data intact, no half copy-up, workdir cleaned.
    second = start_union(argv, mnt, tmp_path / "second.log")
    try:
        for rel, want in expected.items():
            if want is None:
                assert not os.path.lexists(mnt / rel), f"{rel} came back"
            else:
                assert file_digest(mnt / rel) == want, f"{rel}: fsynced data lost or damaged"
        for i in range(1, 4):
            data = (mnt / f"big{i}").read_bytes()
            assert data[:BIG] == pattern(i, BIG) and len(data) in (BIG, BIG + 1), f"big{i}: half copied up"
        # (work/whiteout, the shared whiteout device, is made anew by every mount)
        stale = set(workdir_entries(work)) & set(leftovers) - {"work/whiteout"}
        assert not stale, f"the workdir still holds the dead server's {sorted(stale)} (had {leftovers})"
        lamina_view = lamina_snapshot(mnt)
    finally:
        assert second.unmount() == 0, second.stderr()

    # The kernel reads the same upper and shows the same tree.
    kernel_view = kernel_snapshot([lower], upper, tmp_path / "kwork", tmp_path / "kmnt")
    assert fsops.diff_trees(kernel_view, lamina_view, "kernel", "lamina") == []


def workdir_entries(work: Path) -> list[str]:
    """Everything in the workdir but the fixed directories the server recreates (like the kernel's
    ``work/work``)."""
    found = []
    for dirpath, dirs, files in os.walk(work):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), work)
            if rel not in FIXED_WORKDIR_ENTRIES and not rel.startswith(PERSISTENT_PREFIXES):
                found.append(rel)
    return sorted(found)


# work/work is scratch (emptied at mount); lamina-index is lamina's persistent hardlink index (like
# the kernel's work/index with index=on), which must survive.
FIXED_WORKDIR_ENTRIES = {"work", "index", "lamina-index"}
PERSISTENT_PREFIXES = ("lamina-index/", "index/")


def cleanup(mounted: MountedUnion) -> None:
    if mounted.process.poll() is None:
        mounted.process.kill()
        mounted.process.wait(timeout=10)
    force_unmount(mounted.mountpoint)


def workdir_leftovers_are_removed_at_mount(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    make_lower(lower)
    upper.mkdir()
    work.mkdir()
    # What a killed server leaves in its scratch directory (lamina, like the kernel, works in
    # work/work): a half-written temporary copy, a temporary directory with content, a whiteout.
    scratch = work / "work"
    scratch.mkdir()
    (scratch / "#dead.1").write_bytes(b"half a copy")
    (scratch / "#dead.2").mkdir()
    (scratch / "#dead.2" / "x").write_bytes(b"")
    os.mknod(scratch / "#dead.3", 0o20000, os.makedev(0, 0))
    mounted = start_union(union_argv([lower], upper, work, mnt), mnt, tmp_path / "u.log")
    try:
        assert sorted(os.listdir(mnt)) == ["big0", "big1", "big2", "big3", "dir"]
        # only the shared whiteout device the new mount made for itself
        assert workdir_entries(work) in ([], ["work/whiteout"]), workdir_entries(work)
    finally:
        assert mounted.unmount() == 0, mounted.stderr()


# --- the same as an unprivileged user (the rootless path: fusermount3, no namespaces) -----------

USER_WRITER = r"""
import hashlib, os, sys
mnt = sys.argv[1]
def synced(path, data, flags):
    fd = os.open(path, flags, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
synced(f"{mnt}/new", b"n" * 3_000_000, os.O_WRONLY | os.O_CREAT)
synced(f"{mnt}/big0", b"t" * 1_000_000, os.O_WRONLY | os.O_APPEND)
dfd = os.open(mnt, os.O_RDONLY)
os.fsync(dfd)
print("synced", flush=True)
i = 0
try:
    while True:
        with open(f"{mnt}/churn{i}", "wb") as f:
            f.write(b"c" * 200_000)
        if i in (2, 4):
            with open(f"{mnt}/big{i // 2}", "ab") as f:
                f.write(b"!")
        i += 1
except OSError as e:
    print("stopped", e.errno, flush=True)
"""

USER_DIGESTS = r"""
import hashlib, json, sys
print(json.dumps({name: hashlib.sha256(open(f"{sys.argv[1]}/{name}", "rb").read()).hexdigest()
                  for name in sys.argv[2:]}))
"""


@pytest.mark.unprivileged
@pytest.mark.slow
def test_kill9_unprivileged(unpriv_nosubids: Any) -> None:
    user = unpriv_nosubids
    base = user.workdir / "crash"
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    make_lower(lower)
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    user.chown_tree(base)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    server = subprocess.Popen(["lamina-unionfs", "-f", "-o", opts, str(mnt)], env=user.env(), user=user.uid,
                              group=user.gid, extra_groups=[], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 15
        while not is_mounted(mnt):
            assert server.poll() is None and time.monotonic() < deadline, "the unprivileged mount failed"
            time.sleep(0.02)
        writer = subprocess.Popen(["/usr/bin/python3", "-c", USER_WRITER, str(mnt)], env=user.env(), user=user.uid,
                                  group=user.gid, extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "synced", writer.stderr.read() if writer.stderr else ""
        saw_copyup = wait_for_copyup_in_workdir(work)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        out, err = writer.communicate(timeout=30)
        assert "stopped" in out, err
    finally:
        for proc in (server, writer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        user.run(["fusermount3", "-u", "-z", str(mnt)])
    assert saw_copyup, "never saw a copy-up in progress in the workdir"
    assert not is_mounted(mnt)
    leftovers = workdir_entries(work)

    mounted = user.run(["lamina-unionfs", "-o", opts, str(mnt)])  # daemon: returns once mounted
    assert mounted.returncode == 0, mounted.stderr
    try:
        got = user.run(["/usr/bin/python3", "-c", USER_DIGESTS, str(mnt), "new", "big0", "big1", "big2"],
                       check=True)
        digests = json.loads(got.stdout)
        assert digests["new"] == digest(b"n" * 3_000_000)
        assert digests["big0"] == digest(pattern(0, BIG) + b"t" * 1_000_000)
        for i in (1, 2):  # cut short or done: the lower data, maybe with its one appended byte
            assert digests[f"big{i}"] in (digest(pattern(i, BIG)), digest(pattern(i, BIG) + b"!")), f"big{i}"
        # (work/whiteout, the shared whiteout device, is made anew by every mount)
        stale = set(workdir_entries(work)) & set(leftovers) - {"work/whiteout"}
        assert not stale, f"the workdir still holds the dead server's {sorted(stale)} (had {leftovers})"
    finally:
        user.run(["fusermount3", "-u", str(mnt)])
        if is_mounted(mnt):
            user.run(["fusermount3", "-u", "-z", str(mnt)])
