"""Differential testing of a union filesystem against the kernel's overlayfs.

The kernel's overlayfs is the oracle: the same seeded random operation sequence runs on a kernel
overlay mount and on a candidate (lamina's unionfs, or fuse-overlayfs as a reference), each over its
own copy of the same generated lower layers, and every result, errno and merged tree is compared.

Why the pieces look the way they do:

* Lower layers are generated in the kernel's format (whiteouts as char 0/0, opaque directories by
  ``trusted.overlay.opaque``) because the kernel reads nothing else. The candidate may get a copy in
  which some whiteouts and opaque markers are rewritten in the OCI format (``.wh.NAME``,
  ``.wh..wh..opq``): the same layers, so the kernel remains a valid oracle for them.
* The sequence is chosen by looking at the *kernel's* tree before each step (so most operations hit
  existing names), never at the candidate's: the candidate cannot steer its own test.
* Times cannot be compared exactly (both runs happen at different moments), so every time is
  classified: a time before the run started must be preserved exactly (copy-up keeps it, utime sets
  it), a later one only has to be later on both sides.
* One kernel time is undone instead of compared, for ``lamina-userns`` only: the stamp ext4 leaves
  on the source's parent of a refused rename where only the oracle's redirect made the kernel try
  it (``ENOTEMPTY_STAMP_NOTE``).
* Mounts happen in a private mount namespace (``unshare -m``, see ``run_isolated``): other users'
  rootless podman processes copy mounts in the initial namespace and would pin our FUSE servers.
* The oracle runs with ``redirect_dir=on`` (lower directories rename) and ``index=on`` (a lower
  hardlink stays one inode through copy-up, as lamina promises); ``LAMINA_DIFF_KERNEL_OPTS`` changes
  the latter. Candidate ``lamina-userns`` serves and uses lamina from inside a user + mount namespace
  (as the builder and runner do); its oracle is the same kernel mount used by root of such a
  namespace, and its upper is checked with ``-o userxattr``.
* Some operations are there for what the kernel keeps between calls: an append right after a
  listing with nothing between (without writeback cache the kernel starts an O_APPEND write at the
  size it holds, so whatever a listing told it shows), appends while another thread lists the
  parent (dropping the kernel's cached listing each time, so the filesystem answers),
  ``open(O_RDONLY|O_TRUNC)``, and fallocate in every mode -- the last only when the candidate
  supports fallocate(2) at all (probed on a scratch mount; ``LAMINA_DIFF_FALLOCATE=on|off``
  decides instead), so that a missing call is one finding, not a divergence at every seed.
* After the sequence: the merged trees, then both remounted (inode numbers must not change), then
  the candidate's upper mounted by the kernel must show the candidate's tree. A failing seed shrinks
  (``--shrink``) to a minimal operation list over the same lowers (``--replay``); bugs found that way
  become hand-written ``CASES``.

Run from the command line (as root)::

    unshare -m --propagation private .venv/bin/python tests/fsops.py --candidate lamina --seed 1 --ops 200
    ... --candidate lamina-userns --seed 7 --shrink          # minimal repro of a divergence
    ... --candidate lamina --case rename-dir-with-deleted-file
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO_ROOT, MountedUnion, force_unmount, start_union

# The harness itself opens, writes and truncates paths as root through both mounts, and those calls
# follow symlinks like any program's. An absolute target must therefore never name a real host file
# (an earlier "/etc/passwd" here rewrote the host's copy): this directory does not exist, and
# ensure_dangling_target_absent() refuses to run if someone creates it.
ABSOLUTE_DANGLING_TARGET = "/nonexistent-lamina-fsops/target"


def ensure_dangling_target_absent() -> None:
    if os.path.lexists(os.path.dirname(ABSOLUTE_DANGLING_TARGET)):
        raise RuntimeError(f"{os.path.dirname(ABSOLUTE_DANGLING_TARGET)} exists: fsops would write through it")


NAMES = ["a", "b", "c", "d"]
NEW_NAMES = ["n", "m", "a", "b", "c", "d"]
OWNERS = [0, 1000, 1001]
PAST = 1_500_000_000  # every generated time lies between PAST and PAST + 10^8 (before any run)
PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "security.")
# index=on (lamina's design, issue 3 item 7: files hardlinked in a lower layer are one inode while
# mounted): after copy-up of one name, every name shows the copy, as with the kernel's index dir.
# LAMINA_DIFF_KERNEL_OPTS=index=off compares with link-breaking copy-up (this kernel's default,
# fuse-overlayfs) instead.
KERNEL_ORACLE_OPTIONS = [o for o in os.environ.get("LAMINA_DIFF_KERNEL_OPTS", "index=on").split(",") if o]
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

Result = tuple[Any, ...]


# --- generated lower layers ----------------------------------------------------------------------


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def merged_kinds(layers_top_first: list[Path]) -> dict[str, str]:
    """What the kernel would show for these lower layers: relative path -> "dir"/"other".

    A small model of overlayfs lookup, used only to decide where the generator puts whiteouts and
    opaque directories so that they hide something.
    """
    result: dict[str, str] = {}

    def visit(rel: str, stack: list[Path]) -> None:
        decided: dict[str, tuple[int, os.stat_result]] = {}
        for i, layer in enumerate(stack):
            for name in os.listdir(layer / rel if rel else layer):
                if name not in decided:
                    decided[name] = (i, os.lstat(layer / rel / name))
        for name, (i, st) in sorted(decided.items()):
            if _is_whiteout(st):
                continue
            child = f"{rel}/{name}" if rel else name
            if not stat.S_ISDIR(st.st_mode):
                result[child] = "other"
                continue
            result[child] = "dir"
            sub: list[Path] = []
            for layer in stack[i:]:
                try:
                    lst = os.lstat(layer / child)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(lst.st_mode):
                    break
                sub.append(layer)
                if _get_xattr(layer / child, "trusted.overlay.opaque") == b"y":
                    break
            visit(child, sub)

    visit("", layers_top_first)
    return result


def _get_xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def generate_lowers(rng: random.Random, base: Path, nlayers: int, entries: int = 22) -> list[Path]:
    """Create ``nlayers`` kernel-format lower layers under ``base``; returns them top first."""
    layers: list[Path] = []  # bottom first while building
    for index in range(nlayers):
        layer = base / f"layer{index}"
        layer.mkdir(parents=True)
        below = merged_kinds(list(reversed(layers))) if layers else {}
        for _ in range(entries):
            _generate_entry(rng, layer, below, index)
        _randomize_times(rng, layer)
        layers.append(layer)
    return list(reversed(layers))


def _random_rel(rng: random.Random, below: dict[str, str]) -> str:
    if below and rng.random() < 0.5:
        return rng.choice(sorted(below))
    return "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 3)))


def _ensure_parents(rng: random.Random, layer: Path, rel: str) -> bool:
    parent = layer
    for part in rel.split("/")[:-1]:
        parent = parent / part
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            os.mkdir(parent)
            os.chmod(parent, rng.choice([0o755, 0o755, 0o2775, 0o1777, 0o700]))
            os.lchown(parent, rng.choice(OWNERS), rng.choice(OWNERS))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _generate_entry(rng: random.Random, layer: Path, below: dict[str, str], index: int) -> None:
    rel = _random_rel(rng, below)
    path = layer / rel
    if not _ensure_parents(rng, layer, rel) or os.path.lexists(path):
        return
    kinds = ["file"] * 6 + ["dir"] * 3 + ["symlink", "fifo", "hardlink", "suid"] * 1
    if index > 0:
        kinds += ["whiteout"] * 3 + ["opaque"] * 2
    kind = rng.choice(kinds)
    owner = (rng.choice(OWNERS), rng.choice(OWNERS))
    if kind == "whiteout":
        # Only over something: the kernel lists a whiteout in a directory that merges with nothing
        # (readdir shows it, lookup says ENOENT), a quirk no other overlay needs to copy; the same
        # inside an opaque directory of the same layer, where a whiteout is pointless anyway.
        ancestors = [layer.joinpath(*rel.split("/")[:k]) for k in range(1, rel.count("/") + 1)]
        if rel in below and not any(_get_xattr(a, "trusted.overlay.opaque") for a in ancestors):
            _whiteout(path)
        return
    if kind in ("dir", "opaque"):
        os.mkdir(path)
        os.chmod(path, rng.choice([0o755, 0o2775, 0o1777, 0o750]))
        if kind == "opaque":
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        for name in rng.sample(NAMES, rng.randint(0, 2)):
            (path / name).write_bytes(rng.randbytes(rng.randint(0, 300)))
    elif kind in ("file", "suid"):
        path.write_bytes(rng.randbytes(rng.choice([0, 10, 1000, 70000])))
        mode = rng.choice([0o4755, 0o2755, 0o6755]) if kind == "suid" else rng.choice([0o644, 0o600, 0o755, 0o444])
        os.lchown(path, *owner)
        os.chmod(path, mode)  # after chown, which clears setuid bits
        if rng.random() < 0.3:
            os.setxattr(path, "user.gen", rng.randbytes(8))
        return
    elif kind == "symlink":
        os.symlink(rng.choice(["a", "../b", ABSOLUTE_DANGLING_TARGET, "nowhere/x"]), path)
    elif kind == "fifo":
        os.mkfifo(path, 0o640)
    elif kind == "hardlink":
        files = [p for p in layer.rglob("*") if p.is_file() and not p.is_symlink() and p != path]
        if not files:
            return
        os.link(rng.choice(sorted(files)), path)
        return
    os.lchown(path, *owner)


def _randomize_times(rng: random.Random, layer: Path) -> None:
    # Deepest first, so setting a child's time does not change its parent's afterwards.
    paths = sorted(layer.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [layer]
    for p in paths:
        t = PAST + rng.randint(0, 10**8)
        os.utime(p, ns=(t * 10**9, t * 10**9 + rng.randint(0, 10**9 - 1)), follow_symlinks=False)


def convert_to_oci_format(rng: random.Random, layers: list[Path], fraction: float = 0.5) -> int:
    """Rewrite some kernel-format markers as ``.wh.`` files (what layer tars carry). Returns how many."""
    converted = 0
    for layer in layers:
        for dirpath, dirnames, filenames in os.walk(layer):
            d = Path(dirpath)
            dst = os.lstat(d)  # restored at the end: the conversion must not touch the layer's times
            for name in filenames:
                if _is_whiteout(os.lstat(d / name)) and rng.random() < fraction:
                    os.unlink(d / name)
                    (d / f".wh.{name}").touch()
                    converted += 1
            for name in dirnames:
                sub = d / name
                if _get_xattr(sub, "trusted.overlay.opaque") == b"y" and rng.random() < fraction:
                    sst = os.lstat(sub)
                    os.removexattr(sub, "trusted.overlay.opaque")
                    (sub / ".wh..wh..opq").touch()
                    os.utime(sub, ns=(sst.st_atime_ns, sst.st_mtime_ns))
                    converted += 1
            os.utime(d, ns=(dst.st_atime_ns, dst.st_mtime_ns))
    return converted


def convert_to_user_xattrs(layers: list[Path]) -> None:
    """trusted.overlay.opaque -> user.overlay.opaque (what a user namespace can read and the kernel
    reads with -o userxattr)."""
    for layer in layers:
        for dirpath, dirnames, _ in os.walk(layer):
            for name in dirnames:
                sub = Path(dirpath) / name
                if _get_xattr(sub, "trusted.overlay.opaque") == b"y":
                    sst = os.lstat(sub)
                    os.removexattr(sub, "trusted.overlay.opaque")
                    os.setxattr(sub, "user.overlay.opaque", b"y")
                    os.utime(sub, ns=(sst.st_atime_ns, sst.st_mtime_ns))


def copy_layers(layers: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    out = []
    for layer in layers:
        target = dest / layer.name
        # cp -a keeps hardlinks, owners, modes, times, and (as root) trusted.* xattrs.
        subprocess.run(["cp", "-a", str(layer), str(target)], check=True)
        out.append(target)
    return out


# --- mounts --------------------------------------------------------------------------------------


@dataclass
class Union:
    """One mounted union (kernel or FUSE) over given directories."""

    kind: str  # "kernel", "lamina" or "fuse-overlayfs"
    lowers: list[Path]
    upper: Path
    work: Path
    mountpoint: Path
    log: Path
    extra: list[str] = field(default_factory=list)
    t0_ns: int = 0
    in_userns: bool = False
    handle: MountedUnion | None = None
    worker: subprocess.Popen[str] | None = None

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.upper},workdir={self.work}"
        if self.kind == "kernel":
            # userxattr mounts refuse redirect_dir=on (the kernel never follows user.overlay.redirect).
            if "userxattr" not in self.extra:
                opts += ",redirect_dir=on"
            opts += "".join("," + o for o in self.extra)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.mountpoint)],
                           check=True, capture_output=True)
            if self.in_userns:
                # The oracle for a candidate used from a user namespace: the same kernel mount, used
                # by root of such a namespace (setuid/setgid clearing, for one, depends on the caller).
                self._start_worker([])
            return
        if self.extra:
            opts += "," + ",".join(self.extra)
        argv = (["fuse-overlayfs", "-f"] if self.kind == "fuse-overlayfs"
                else [sys.executable, "-m", "unionfs", "-f"]) + ["-o", opts, str(self.mountpoint)]
        if self.kind == "lamina-userns":
            # Served and used from inside a user namespace (uids 0..65535 mapped to themselves) with
            # its own mount namespace, as lamina's builder and runner mount it; a worker process in
            # there runs the operations (the mount is not reachable from outside).
            self._start_worker(argv)
            return
        self.handle = start_union(argv, self.mountpoint, self.log)

    def _start_worker(self, server_argv: list[str]) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(server_argv), str(self.mountpoint), str(self.log),
             str(self.t0_ns)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        if self._call({"cmd": "ping"}) != "ready":
            raise RuntimeError("the user-namespace worker did not start")

    def unmount(self) -> None:
        if self.kind == "kernel":
            self._stop_worker()
            subprocess.run(["umount", str(self.mountpoint)], check=False, capture_output=True)
            return
        self._stop_worker()
        if self.handle is not None:
            self.handle.unmount()
            self.handle = None
        force_unmount(self.mountpoint)

    def _stop_worker(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._call({"cmd": "quit"})
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
            self.worker = None

    def _call(self, request: dict[str, Any]) -> Any:
        assert self.worker is not None and self.worker.stdin is not None and self.worker.stdout is not None
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the user-namespace worker died (exit {self.worker.poll()})")
        return json.loads(line)

    def apply(self, op: list[Any]) -> Any:
        if self.worker is not None:
            return self._call({"cmd": "op", "op": op})
        return normalized(apply_op(str(self.mountpoint), op, self.t0_ns))

    def snap(self) -> tuple[dict[str, Any], dict[str, int], list[str]]:
        if self.worker is not None:
            tree, inos, problems = self._call({"cmd": "snapshot"})
            return tree, inos, problems
        tree, inos, problems = snapshot(str(self.mountpoint), self.t0_ns)
        return normalized(tree), inos, problems


def normalized(value: Any) -> Any:
    """The JSON form (tuples become lists), so local and worker results compare equal."""
    return json.loads(json.dumps(value))


CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def worker_main(argv_json: str, mountpoint: str, log: str, t0_ns: int) -> int:
    """Serve operations on a lamina mount made inside a new user + mount namespace.

    Reads one JSON request per line on stdin, answers one JSON line on stdout. The parent (root in
    the initial namespace) writes the child's uid/gid maps, as newuidmap would.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            os._exit(90)
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os._exit(_serve(json.loads(argv_json), Path(mountpoint), Path(log), t0_ns))
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 65536\n")
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _serve(argv: list[str], mountpoint: Path, log: Path, t0_ns: int) -> int:
    handle = start_union(argv, mountpoint, log) if argv else None
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["cmd"] == "ping":
                answer: Any = "ready"
            elif request["cmd"] == "op":
                answer = apply_op(str(mountpoint), request["op"], t0_ns)
            elif request["cmd"] == "snapshot":
                answer = snapshot(str(mountpoint), t0_ns)
            else:
                break
            print(json.dumps(answer), flush=True)
    finally:
        if handle is not None:
            handle.unmount()
    print(json.dumps("bye"), flush=True)
    return 0


# --- operations ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc_fallocate = _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def classify_time(ns: int, t0_ns: int) -> int | str:
    return ns if ns < t0_ns else "recent"


def describe(path: str, t0_ns: int) -> Result:
    """lstat of a path, reduced to what two faithful overlays must agree on."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return (oct(st.st_mode), st.st_uid, st.st_gid, size, nlink, classify_time(st.st_mtime_ns, t0_ns),
            kind)


def _content(path: str) -> str:
    # O_NONBLOCK: the sequence may well read a FIFO, which must not hang the run.
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def visible_xattrs(path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        if name.startswith(PRIVATE_XATTRS):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False).hex()))
        except OSError as e:
            out.append((name, "E" + errno.errorcode.get(e.errno or 0, "?")))
    return tuple(out)


def _ino_stable(fn: Callable[[], Any], path: str) -> Any:
    """Run ``fn``; report whether ``path``'s inode number stayed the same (copy-up must keep it)."""
    before = os.lstat(path).st_ino if os.path.lexists(path) else None
    value = fn()
    after = os.lstat(path).st_ino if os.path.lexists(path) else None
    return (value, before is None or after is None or before == after)


INO_CHECKED_OPS = ("write", "append", "truncate", "chmod", "chown", "utime", "setxattr")


def _strip_stable(res: Any) -> Any:
    return [res[0], res[1][0]] if res[0] == "ok" else res


def _stable(res: Result) -> bool:
    return res[0] != "ok" or bool(res[1][1])


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08
FALLOC_FL_ZERO_RANGE, FALLOC_FL_INSERT_RANGE = 0x10, 0x20
# The kernel's FUSE module refuses collapse and insert range for every FUSE filesystem
# (fuse_file_fallocate: EOPNOTSUPP before any request), so only a kernel candidate gets those.
FUSE_FALLOCATE_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
KERNEL_FALLOCATE_MODES = (*FUSE_FALLOCATE_MODES, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE)
# "on" or "off" forces the fallocate operations in or out; unset: in when the candidate supports
# fallocate(2) at all (probed on a scratch mount, see fallocate_supported).
FALLOCATE_SWITCH = "LAMINA_DIFF_FALLOCATE"


def _fallocate(path: str, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        if _libc_fallocate(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _append(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _append_after_listing(path: str, data: bytes) -> int:
    """List the parent, then append with nothing between that would make the kernel ask for the
    file's attributes: the write lands where the listing told the kernel the file ends."""
    with contextlib.suppress(OSError):
        os.listdir(os.path.dirname(path))
    return _append(path, data)


def _list_uncached(directory: str) -> None:
    """List ``directory`` after dropping the listing the kernel may keep in its page cache, so
    that the filesystem answers it (with whatever attributes it sends along)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.listdir(fd)
        finally:
            os.close(fd)


def _append_while_listing(root: str, path: str, data: bytes) -> str | None:
    """Append ``data`` in four opens after a listing of the parent and while another thread
    lists it without pause; the file's content after, when it lies inside ``root`` (a symlink
    such as "../b" leads out of the mount, to one file both sides write)."""
    stop = threading.Event()
    _list_uncached(os.path.dirname(path))

    def list_repeatedly() -> None:
        while not stop.is_set():
            _list_uncached(os.path.dirname(path))

    lister = threading.Thread(target=list_repeatedly)
    lister.start()
    try:
        quarter = max(1, len(data) // 4)
        for start in range(0, max(len(data), 1), quarter):
            _append(path, data[start:start + quarter])
    finally:
        stop.set()
        lister.join()
    inside = os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    return _content(path) if inside else None


def _open_rdonly_trunc(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_TRUNC)
    try:
        return os.read(fd, 64).hex()
    finally:
        os.close(fd)


def apply_op(root: str, op: list[Any], t0_ns: int) -> Result:
    """Run one operation under ``root``; returns ("ok", value) or ("err", ERRNO_NAME)."""
    name, args = op[0], op[1:]

    def p(rel: str) -> str:
        return os.path.join(root, rel) if rel else root

    try:
        value: Any = None
        if name in ("create", "create_excl"):
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CREAT | (os.O_EXCL if name == "create_excl" else os.O_TRUNC)
            fd = os.open(p(args[0]), flags, args[1])
            try:
                value = os.write(fd, bytes.fromhex(args[2]))
            finally:
                os.close(fd)
        elif name in ("write", "append"):
            def do_write() -> int:
                flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if name == "append" else 0)
                fd = os.open(p(args[0]), flags)
                try:
                    data = bytes.fromhex(args[-1])
                    return os.write(fd, data) if name == "append" else os.pwrite(fd, data, args[1])
                finally:
                    os.close(fd)
            value = _ino_stable(do_write, p(args[0]))
        elif name == "truncate":
            value = _ino_stable(lambda: os.truncate(p(args[0]), args[1]), p(args[0]))
        elif name == "read":
            value = _content(p(args[0]))
        elif name == "unlink":
            os.unlink(p(args[0]))
        elif name == "rmdir":
            os.rmdir(p(args[0]))
        elif name == "mkdir":
            os.mkdir(p(args[0]), args[1])
        elif name == "rename":
            os.rename(p(args[0]), p(args[1]))
        elif name == "rename_noreplace":
            renameat2(p(args[0]), p(args[1]), RENAME_NOREPLACE)
        elif name == "rename_exchange":
            renameat2(p(args[0]), p(args[1]), RENAME_EXCHANGE)
        elif name == "symlink":
            os.symlink(args[0], p(args[1]))
        elif name == "link":
            os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        elif name == "chmod":
            value = _ino_stable(lambda: os.chmod(p(args[0]), args[1]), p(args[0]))
        elif name == "chown":
            value = _ino_stable(lambda: os.lchown(p(args[0]), args[1], args[2]), p(args[0]))
        elif name == "utime":
            value = _ino_stable(lambda: os.utime(p(args[0]), ns=(args[1], args[2]), follow_symlinks=False),
                                p(args[0]))
        elif name == "setxattr":
            value = _ino_stable(lambda: os.setxattr(p(args[0]), args[1], bytes.fromhex(args[2]),
                                                    follow_symlinks=False), p(args[0]))
        elif name == "removexattr":
            os.removexattr(p(args[0]), args[1], follow_symlinks=False)
        elif name == "getxattr":
            value = os.getxattr(p(args[0]), args[1], follow_symlinks=False).hex()
        elif name == "listxattr":
            value = visible_xattrs(p(args[0]))
        elif name == "mkfifo":
            os.mkfifo(p(args[0]), args[1])
        elif name == "rmtree_mkdir":
            # `rm -rf d; mkdir d`: the results of both halves, as a shell would see them.
            try:
                if stat.S_ISFIFO(os.lstat(p(args[0])).st_mode):
                    # What rmtree says of any non-directory, without its open(), which would wait
                    # for a writer forever (Python 3.11 opens without O_NONBLOCK).
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory")
                shutil.rmtree(p(args[0]))
                first: Result = ("ok",)
            except OSError as e:
                first = ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))
            os.mkdir(p(args[0]), 0o755)
            value = first
        elif name == "unlinked_open":
            # An open file outlives its name: still readable and writable, fstat's nlink drops.
            fd = os.open(p(args[0]), os.O_RDWR | os.O_NONBLOCK)
            try:
                os.unlink(p(args[0]))
                os.pwrite(fd, b"after unlink", 3)
                st = os.fstat(fd)
                value = (st.st_nlink, st.st_size, os.pread(fd, 64, 0).hex())
            finally:
                os.close(fd)
        elif name == "replaced_open":
            # rename over a file that is open: the open descriptor keeps the old file's data. (Not
            # its link count: the kernel reports a lower file's own count, 1, where 0 is right.)
            fd = os.open(p(args[1]), os.O_RDONLY | os.O_NONBLOCK)
            try:
                os.rename(p(args[0]), p(args[1]))
                value = (stat.S_IFMT(os.fstat(fd).st_mode), os.pread(fd, 64, 0).hex())
            finally:
                os.close(fd)
        elif name == "mknod":
            os.mknod(p(args[0]), stat.S_IFCHR | 0o640, os.makedev(1, 3))
        elif name == "while_held":
            # Other operations while a descriptor (O_PATH: no open request reaches the filesystem)
            # keeps the kernel's node of a path alive, so its FORGET comes only after them: the
            # filesystem sees the name removed while the node lives on, whatever the timing.
            fd = os.open(p(args[0]), os.O_PATH | os.O_NOFOLLOW)
            try:
                value = [apply_op(root, sub, t0_ns) for sub in args[1]]
            finally:
                os.close(fd)
        elif name == "stat":
            value = describe(p(args[0]), t0_ns)
        elif name == "readdir":
            value = sorted(os.listdir(p(args[0])))
        elif name == "readlink":
            value = os.readlink(p(args[0]))
        elif name == "open_rdonly":
            fd = os.open(p(args[0]), os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        elif name == "open_rdonly_trunc":
            value = _open_rdonly_trunc(p(args[0]))
        elif name == "append_after_listing":
            value = _append_after_listing(p(args[0]), bytes.fromhex(args[1]))
        elif name == "append_while_listing":
            value = _append_while_listing(root, p(args[0]), bytes.fromhex(args[1]))
        elif name == "fallocate":
            _fallocate(p(args[0]), args[1], args[2], args[3])
        else:
            raise ValueError(f"unknown operation {name}")
        return ("ok", value)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


def list_tree(root: str) -> tuple[list[str], list[str]]:
    """All paths under root (relative) and the directories among them, sorted."""
    paths: list[str] = []
    dirs: list[str] = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        for n in dirnames + filenames:
            paths.append(os.path.join(rel, n) if rel else n)
        for n in dirnames:
            dirs.append(os.path.join(rel, n) if rel else n)
    return sorted(paths), sorted(dirs)


def generate_op(rng: random.Random, oracle_root: str, userns: bool = False,
                fallocate_modes: tuple[int, ...] = ()) -> list[Any]:
    """Choose the next operation from the oracle's current tree.

    ``userns``: the candidate runs in a user namespace, where trusted.* xattrs are out of reach for
    everybody (the kernel oracle, as real root, would allow them). ``fallocate_modes``: the
    fallocate(2) modes to try (none: no fallocate operations).
    """
    paths, dirs = list_tree(oracle_root)
    everything = [""] + paths

    non_dirs = sorted(set(paths) - set(dirs))

    def existing() -> str:
        return rng.choice(paths) if paths else rng.choice(NEW_NAMES)

    def existing_file() -> str:
        # Mostly non-directories, so that file operations mostly do something.
        return rng.choice(non_dirs) if non_dirs and rng.random() < 0.85 else existing()

    def fresh() -> str:
        parent = rng.choice(dirs)
        name = rng.choice(NEW_NAMES)
        return f"{parent}/{name}" if parent else name

    def any_path() -> str:
        return existing() if rng.random() < 0.7 else fresh()

    def data() -> str:
        return rng.randbytes(rng.choice([0, 1, 100, 3000, 9000])).hex()

    weights = {
        "create": 7, "create_excl": 2, "write": 6, "append": 5, "truncate": 5, "read": 5,
        "unlink": 6, "rmdir": 4, "mkdir": 6, "rename": 12, "rename_noreplace": 2,
        "rename_exchange": 2, "symlink": 3, "link": 4, "chmod": 4, "chown": 3, "utime": 3,
        "setxattr": 4, "removexattr": 2, "getxattr": 1, "listxattr": 2, "mkfifo": 2,
        "rmtree_mkdir": 3, "stat": 5, "readdir": 5, "readlink": 1, "open_rdonly": 2,
        "unlinked_open": 2, "replaced_open": 2, "mknod": 0 if userns else 1,
        "open_rdonly_trunc": 2, "append_after_listing": 4, "append_while_listing": 2,
        "fallocate": 4 if fallocate_modes else 0,
    }
    name = rng.choices(list(weights), weights=list(weights.values()))[0]
    if name in ("create", "create_excl"):
        return [name, existing_file() if rng.random() < 0.3 else fresh(), rng.choice([0o644, 0o600, 0o4755]),
                data()]
    if name == "write":
        return [name, existing_file(), rng.choice([0, 5, 4096, 70000]), data()]
    if name in ("append", "append_after_listing", "append_while_listing"):
        return [name, existing_file(), data()]
    if name == "open_rdonly_trunc":
        return [name, existing_file()]
    if name == "fallocate":
        # Collapse and insert need block-aligned ranges (EINVAL otherwise, on both sides alike).
        return [name, existing_file(), rng.choice(fallocate_modes), rng.choice([0, 100, 4096, 8192]),
                rng.choice([1, 4096, 10000, 8192])]
    if name == "truncate":
        target = existing_file()
        try:
            same = os.lstat(os.path.join(oracle_root, target)).st_size
        except OSError:
            same = 0
        return [name, target, rng.choice([0, 7, 5000, 100000, same, same])]
    if name == "replaced_open":
        return [name, existing_file(), existing_file()]
    if name == "mknod":
        return [name, any_path()]
    if name in ("read", "unlink", "readlink", "open_rdonly", "unlinked_open"):
        return [name, existing_file()]
    if name in ("rmdir", "stat", "listxattr"):
        return [name, existing()]
    if name == "readdir":
        return [name, rng.choice(dirs)]
    if name == "mkdir":
        return [name, any_path(), rng.choice([0o755, 0o700, 0o2775, 0o1777])]
    if name in ("rename", "rename_noreplace"):
        src = rng.choice(dirs[1:]) if len(dirs) > 1 and rng.random() < 0.35 else existing()
        return [name, src, any_path()]
    if name == "rename_exchange":
        return [name, existing(), existing()]
    if name == "symlink":
        return [name, rng.choice(["a", "../b", ABSOLUTE_DANGLING_TARGET, "x/y/z", "n"]), any_path()]
    if name == "link":
        return [name, existing_file(), any_path()]
    if name == "chmod":
        return [name, rng.choice(everything), rng.choice([0o644, 0o755, 0o4755, 0o2755, 0o6711, 0o1777, 0o000])]
    if name == "chown":
        return [name, rng.choice(everything), rng.choice(OWNERS + [-1]), rng.choice(OWNERS + [-1])]
    if name == "utime":
        t = PAST + rng.randint(0, 10**8)
        return [name, existing(), t * 10**9, t * 10**9 + rng.randint(0, 10**9 - 1)]
    if name in ("setxattr", "removexattr", "getxattr"):
        xname = rng.choice(["user.a", "user.b", "user.gen"] + ([] if userns else ["trusted.t"]))
        if name == "setxattr":
            return [name, rng.choice(everything), xname, rng.randbytes(rng.randint(0, 20)).hex()]
        return [name, existing(), xname]
    if name == "mkfifo":
        return [name, any_path(), 0o644]
    if name == "rmtree_mkdir":
        return [name, rng.choice(dirs[1:]) if len(dirs) > 1 else fresh()]
    raise AssertionError(name)


# --- whole-tree comparison -----------------------------------------------------------------------


def snapshot(root: str, t0_ns: int) -> tuple[dict[str, Result], dict[str, int], list[str]]:
    """The merged tree as comparable values; also each path's st_ino and invariant violations.

    Invariants checked on one side only: readdir's d_ino equals lstat's st_ino, and two paths with
    one inode number are one file (same attributes and content).
    """
    tree: dict[str, Result] = {}
    inos: dict[str, int] = {}
    problems: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            d = describe(full, t0_ns)
            st = os.lstat(full)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = _content(full)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            xattrs = visible_xattrs(full)
            tree[rel or "."] = (*d, extra, xattrs)
            inos[rel or "."] = st.st_ino
        except OSError as e:
            tree[rel or "."] = ("err", errno.errorcode.get(e.errno or 0, "?"))
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(full) as it:
                    entries = list(it)
            except OSError as e:
                tree[(rel or ".") + "/<readdir>"] = ("err", errno.errorcode.get(e.errno or 0, "?"))
                continue
            for entry in entries:
                child = os.path.join(rel, entry.name) if rel else entry.name
                try:
                    if entry.inode() != os.lstat(entry.path).st_ino:
                        problems.append(f"{child}: readdir d_ino {entry.inode()} != st_ino "
                                        f"{os.lstat(entry.path).st_ino}")
                except OSError as e:
                    problems.append(f"{child}: listed by readdir but lstat fails: {e}")
                stack.append(child)
    by_ino: dict[int, list[str]] = {}
    for rel, ino in inos.items():
        by_ino.setdefault(ino, []).append(rel)
    for ino, rels in by_ino.items():
        if len(rels) > 1 and len({tree[r] for r in rels}) > 1:
            problems.append(f"inode {ino} shared by different files: {sorted(rels)}")
    return tree, inos, problems


def diff_trees(a: dict[str, Result], b: dict[str, Result], a_name: str, b_name: str,
               limit: int = 6) -> list[str]:
    out = []
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            out.append(f"{rel}: {a_name}={a.get(rel)} {b_name}={b.get(rel)}")
            if len(out) >= limit:
                out.append("...")
                break
    return out


# --- the differential run ------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    candidate: str
    ops_run: int = 0
    oci_markers: int = 0
    divergences: list[str] = field(default_factory=list)
    ops: list[list[Any]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)  # "op:ok" / "op:ERRNO" -> count
    server_log: list[str] = field(default_factory=list)  # the candidate's ERROR lines and tracebacks


def _error_lines(log: Path, limit: int = 30) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    start = next((i for i, line in enumerate(lines) if "ERROR" in line or "Traceback" in line), None)
    return [] if start is None else lines[start:start + limit]


# --- hand-written cases (regressions found by the random runs, kept small and explicit) ------------


def _lowers_setgid_dir(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "sg").mkdir(parents=True)
    os.chown(bottom / "sg", 1000, 1000)
    os.chmod(bottom / "sg", 0o2775)
    (bottom / "sg" / "old").mkdir()
    (top / "plain").mkdir(parents=True)
    (top / "plain" / "f").write_bytes(b"x")
    return [top, bottom]


def _lowers_one_file(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d" / "f").write_bytes(b"lower data")
    os.utime(bottom / "d" / "f", (PAST, PAST))
    top.mkdir()
    (top / "g").write_bytes(b"top")
    return [top, bottom]


def _lowers_hardlinks(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    for d in ("p", "q"):
        (bottom / d).mkdir(parents=True)
    (bottom / "p" / "f").write_bytes(b"0123456789")
    os.link(bottom / "p" / "f", bottom / "q" / "g")
    for p in (bottom / "p", bottom / "q"):
        os.utime(p, (PAST, PAST))
    top.mkdir()
    return [top, bottom]


def _lowers_dirs(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "a" / "b" / "c").mkdir(parents=True)
    (bottom / "a" / "b" / "c" / "f").write_bytes(b"f")
    (bottom / "a" / "b" / "c" / "g").write_bytes(b"g")
    os.mkfifo(bottom / "a" / "fifo", 0o644)
    (bottom / "a" / "file").write_bytes(b"data")
    for p in (bottom / "a" / "b" / "c", bottom / "a" / "b", bottom / "a"):
        os.utime(p, (PAST, PAST))
    top.mkdir()
    (top / "a").mkdir()
    os.utime(top / "a", (PAST + 5, PAST + 5))
    return [top, bottom]


def _lowers_dir_over_file(base: Path) -> list[Path]:
    top, bottom = base / "l0", base / "l1"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d" / "x").write_bytes(b"a file in the lower layer")
    (top / "d" / "x").mkdir(parents=True)
    (top / "d" / "x" / "f").write_bytes(b"f")
    for p in (top / "d" / "x", top / "d", bottom / "d"):
        os.utime(p, (PAST, PAST))
    return [top, bottom]


def _lowers_whited_out_parent(base: Path) -> list[Path]:
    top, middle, bottom = base / "l0", base / "l1", base / "l2"
    for rel in ("a/d/kept", "a/b/f", "c/old"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(rel.encode())
    (top / "n").mkdir()
    middle.mkdir()
    _whiteout(middle / "a")
    (bottom / "a" / "d").mkdir(parents=True)
    (bottom / "a" / "d" / "hidden").write_bytes(b"hidden by the middle layer")
    (bottom / "a" / "x").write_bytes(b"x")
    for p in (top / "a" / "d", top / "a" / "b", top / "a", top / "c", top / "n", bottom / "a" / "d",
              bottom / "a"):
        os.utime(p, (PAST, PAST))
    return [top, middle, bottom]


CASES: dict[str, tuple[Callable[[Path], list[Path]], list[list[Any]]]] = {
    # mkdir inside a (copied-up) setgid directory inherits S_ISGID and the group, as on any fs.
    "setgid-mkdir": (_lowers_setgid_dir, [["mkdir", "sg/new", 0o755], ["stat", "sg/new"],
                                          ["chmod", "", 0o2755], ["mkdir", "n", 0o755], ["stat", "n"],
                                          ["rmtree_mkdir", "sg/old"], ["stat", "sg/old"]]),
    # The mount's root directory takes user xattrs like any directory.
    "root-xattr": (_lowers_one_file, [["setxattr", "", "user.a", "6869"], ["getxattr", "", "user.a"],
                                      ["listxattr", ""], ["removexattr", "", "user.a"]]),
    # Files hardlinked in a lower layer through copy-up: nlink, data, xattrs of each name, and the
    # times of their parents, exactly as the kernel (index=on by default: the link holds).
    "hardlink-copyup": (_lowers_hardlinks, [["write", "p/f", 2, "4142"], ["stat", "p/f"], ["stat", "q/g"],
                                            ["read", "q/g"], ["setxattr", "q/g", "user.x", "31"],
                                            ["listxattr", "p/f"], ["stat", "p"], ["stat", "q"],
                                            ["link", "q/g", "q/h"], ["stat", "p/f"], ["unlink", "q/g"],
                                            ["stat", "p/f"]]),
    # The same when the other name was never looked up before the write (no tree walk in between).
    "hardlink-copyup-cold": (_lowers_hardlinks, [["write", "p/f", 2, "4142"], ["read", "q/g"], ["stat", "q/g"],
                                                 ["stat", "p/f"]]),
    # Removing or renaming one name of a lower hardlink changes the other names' link count.
    "hardlink-unlink": (_lowers_hardlinks, [["unlink", "q/g"], ["stat", "p/f"], ["link", "p/f", "q/h"],
                                            ["stat", "p/f"], ["rename", "q/h", "p/h"], ["stat", "p/f"],
                                            ["stat", "p/h"]]),
    # Renaming a lower directory away updates its old parent's times; its whiteouts stay meaningful
    # (or, when it is copied up whole, are dropped: an opaque copy has nothing below to hide).
    "rename-lower-dir": (_lowers_dirs, [["unlink", "a/b/c/f"], ["rename", "a/b/c", "a/n"], ["stat", "a/b"],
                                        ["readdir", "a/n"], ["stat", "a"], ["rename", "a/n", "m"],
                                        ["readdir", "m"], ["stat", "a"]]),
    # The same for a directory of the top lower over a file of the one below (whiteout needed).
    "rename-dir-over-lower-file": (_lowers_dir_over_file, [["rename", "d/x", "y"], ["stat", "d"],
                                                            ["readdir", "d"], ["readdir", "y"]]),
    # A file deleted inside a lower directory stays deleted when the directory is renamed (in a user
    # namespace the directory is copied up whole: the copy must be of the merged view).
    "rename-dir-with-deleted-file": (_lowers_dirs, [["unlink", "a/b/c/f"], ["rename", "a/b", "n"],
                                                     ["readdir", "n/c"], ["stat", "n/c/f"], ["stat", "n/c"]]),
    # The same with the deleted file's directory given an old time: dropping its whiteout when the
    # directory is copied up whole (user namespace) is no change anybody made, and keeps its mtime.
    "rename-dir-with-deleted-file-times": (_lowers_dirs, [
        ["unlink", "a/b/c/f"], ["utime", "a/b/c", (PAST + 7) * 10**9, (PAST + 7) * 10**9 + 5], ["rename", "a/b", "n"],
        ["stat", "n/c"], ["rename_exchange", "n", "a"], ["stat", "a/c"]]),
    # An open FIFO whose name is renamed over still answers fstat.
    "fifo-replaced-open": (_lowers_dirs, [["replaced_open", "a/file", "a/fifo"], ["stat", "a/fifo"]]),
    # A name removed while the kernel still holds its node (FORGET not yet sent): the backing
    # filesystem must not give its inode number to a new file meanwhile (ext4 reuses a freed number
    # at once), or the new file's number would collide with the live node's and change at remount.
    "removed-while-held": (_lowers_hardlinks, [
        ["create", "n", 0o644, "6e"], ["while_held", "n", [["unlink", "n"], ["create", "m", 0o644, ""],
                                                        ["create", "a", 0o644, ""]]],
        ["mkdir", "d", 0o755], ["while_held", "d", [["rmdir", "d"], ["mkdir", "e", 0o755],
                                                    ["mkfifo", "b", 0o644]]],
        ["create", "x", 0o644, "78"], ["create", "y", 0o644, "79"],
        ["while_held", "y", [["rename", "x", "y"], ["symlink", "n", "c"], ["mkdir", "f", 0o700]]],
        ["mkdir", "g", 0o755], ["create", "g/h", 0o644, ""], ["link", "g/h", "i"],
        ["while_held", "g/h", [["unlink", "g/h"], ["stat", "i"], ["create", "g/j", 0o644, ""]]],
        ["while_held", "p/f", [["unlink", "p/f"], ["stat", "q/g"], ["create", "p/k", 0o644, ""]]]]),
    # The same for a lower hardlink whose other name the kernel has not seen yet: that name is the
    # removed node itself (one file), not a new one.
    "removed-while-held-cold": (_lowers_hardlinks, [
        ["while_held", "p/f", [["unlink", "p/f"], ["stat", "q/g"], ["create", "p/k", 0o644, ""]]],
        ["read", "q/g"]]),
    # A lower directory renamed away keeps hidden what a middle layer whited out above it (its
    # redirect is walked per layer), also after a remount; and a redirect into an opaque directory
    # still reaches the lowers.
    "rename-dir-under-whited-out-parent": (_lowers_whited_out_parent, [
        ["rename", "a/d", "n/m"], ["readdir", "n/m"], ["rmtree_mkdir", "c"], ["rename", "a", "c/a"],
        ["readdir", "c/a"], ["stat", "c/a/b"]]),
    # fstat of a file open after unlink counts the names it still has (the kernel asks the upper
    # inode, or for an indexed lower hardlink the merged count): another name of a lower hardlink
    # (never looked up before: a cold case, no tree walks in between), the last name of it, an upper
    # hardlink.
    "unlinked-open-hardlink-cold": (_lowers_hardlinks, [
        ["unlinked_open", "p/f"], ["stat", "q/g"], ["unlinked_open", "q/g"], ["create", "n", 0o644, "6e"],
        ["link", "n", "m"], ["unlinked_open", "n"], ["stat", "m"], ["unlinked_open", "m"]]),
    # A rename of a lower directory over a non-empty upper-only one fails, but the kernel got as far
    # as the upper rename (with RENAME_WHITEOUT), and ext4 stamps the source's parent on the way.
    # Over a merged target the kernel refuses before touching anything.
    "rename-over-nonempty-upper-dir": (_lowers_dirs, [
        ["mkdir", "n", 0o755], ["create", "n/f", 0o644, ""], ["rename", "a/b", "n"], ["stat", "a"],
        ["rename", "a/b/c", "a"], ["stat", "a/b"], ["rename", "n", "a/b"], ["stat", ""]]),
    # The same refusal below a renamed lower directory (found by seed 22 in a user namespace): the
    # kernel reaches the source's lower through its redirect, so it tries RENAME_WHITEOUT and ext4
    # stamps the source's parent; where lamina copied the directory up whole instead (user
    # namespace), nothing below shows that name and the kernel itself would leave the time alone
    # (see ENOTEMPTY_STAMP_NOTE).
    "rename-refused-below-renamed-lower-dir": (_lowers_dirs, [
        ["rename", "a", "n"], ["mkdir", "m", 0o755], ["create", "m/f", 0o644, ""], ["stat", "n/b"],
        ["rename", "n/b/c", "m"], ["stat", "n/b"], ["readdir", "n/b"], ["stat", "n"]]),
    # An append right after a listing, with no stat between, on a fresh mount: the kernel starts
    # an O_APPEND write at the size it holds, so a listing must not have told it a wrong one (a
    # lower file, then one the first append copied up; then an upper file made through the mount).
    "append-after-listing-cold": (_lowers_one_file, [
        ["append_after_listing", "d/f", "6d6f640a"], ["append_after_listing", "d/f", "6d6f640a"],
        ["append_after_listing", "g", "6d6f640a"], ["create", "d/n", 0o644, "6e6577"],
        ["append_after_listing", "d/n", "6d6f640a"], ["read", "d/f"], ["read", "g"], ["read", "d/n"]]),
    # The same while another thread lists the directory all the time.
    "append-while-listing-cold": (_lowers_one_file, [
        ["append_while_listing", "d/f", "61626364656667"], ["append_while_listing", "g", "6162636465666768"]]),
    # open(O_RDONLY | O_TRUNC) truncates (Linux does, whatever the access mode), lower or upper.
    "open-rdonly-trunc": (_lowers_one_file, [
        ["open_rdonly_trunc", "d/f"], ["stat", "d/f"], ["create", "n", 0o644, "6e6577"],
        ["open_rdonly_trunc", "n"], ["stat", "n"], ["symlink", "g", "s"], ["open_rdonly_trunc", "s"],
        ["stat", "g"]]),
    # A copied-up file keeps its inode number, also after a remount.
    "copyup-ino-remount": (_lowers_one_file, [["write", "d/f", 2, "4142"], ["chmod", "g", 0o600],
                                              ["read", "d/f"]]),
}


# ENOTEMPTY_STAMP_NOTE. A rename of a directory over a non-empty pure upper one is refused by the
# upper filesystem, not by overlayfs: the kernel tries the upper rename first, with RENAME_WHITEOUT
# when a lower shows the source's name (ovl_lower_positive), and ext4, undoing that half-done
# rename, rewrites the source's entry and so stamps the source's parent with the current time
# (tmpfs refuses before touching anything). lamina makes the same call on its own upper, so it gets
# whatever that filesystem does (core/ops.py, _refuse_nonempty_target). In a user namespace the
# question itself differs: a userxattr upper cannot hold redirects, so lamina copies a renamed lower
# directory up whole and opaque, and below that copy no lower shows the source's name, while the
# oracle's redirect still reaches one. Given the candidate's upper (mounted with -o userxattr), the
# kernel too leaves the parent's time alone (seed 22, checked by hand). That stamp is an artefact of
# the oracle's on-disk format and of ext4's error path, not a change anybody made, so it is undone
# on the oracle, and only where the candidate keeps a full copy that the oracle keeps as a redirect.
REFUSED_RENAME_OPS = ("rename", "replaced_open")  # operations whose rename(2) of op[1] can fail so


def _upper_dir(upper: Path, rel: str) -> Path | None:
    """``rel`` in an upper layer when it and every directory above it are real directories there.

    Walked one component at a time with lstat: the harness runs as root and must not be led out of
    the layer by a symlink.
    """
    path = upper
    for part in rel.split("/") if rel else []:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except OSError:
            return None
    return path


def _copied_whole_where_oracle_redirects(oracle_upper: Path, cand_upper: Path, rel: str) -> bool:
    """Whether ``rel`` or a directory above it is a redirect in the oracle's upper and an opaque
    full copy in the candidate's (a lower directory renamed in a user namespace)."""
    parts = rel.split("/") if rel else []
    for depth in range(len(parts), 0, -1):
        sub = "/".join(parts[:depth])
        k_dir, c_dir = _upper_dir(oracle_upper, sub), _upper_dir(cand_upper, sub)
        if k_dir is not None and c_dir is not None and _get_xattr(k_dir, "trusted.overlay.redirect") \
                and _get_xattr(c_dir, "user.overlay.opaque") == b"y":
            return True
    return False


def _undo_refused_rename_stamp(kernel: Union, cand: Union, parent: str, before: Any) -> bool:
    """After a rename both refused with ENOTEMPTY: set the oracle's ``parent`` back to the time it had
    before, where only the oracle's on-disk format made ext4 stamp it (ENOTEMPTY_STAMP_NOTE).

    ``before``: the oracle's stat of ``parent`` just before the rename. Returns whether it undid one.
    """
    if before[0] != "ok" or not isinstance(before[1][5], int) or _upper_dir(kernel.upper, parent) is None:
        return False  # a recent time stays recent (nothing to see), or the path is not plain dirs
    after = kernel.apply(["stat", parent])
    only_stamped = after[0] == "ok" and after[1][5] == "recent" and \
        after[1][:5] == before[1][:5] and after[1][6:] == before[1][6:]
    if not only_stamped or cand.apply(["stat", parent]) != before:
        return False
    if not _copied_whole_where_oracle_redirects(kernel.upper, cand.upper, parent):
        return False
    old = before[1][5]
    return bool(kernel.apply(["utime", parent, old, old])[0] == "ok")


def fallocate_supported(candidate: str, workdir: Path) -> bool:
    """Whether the candidate answers fallocate(2) at all (``FALLOCATE_SWITCH`` may say instead):
    a fresh file on a scratch mount of it, allocated with mode 0. Until it does, the random
    sequences leave fallocate out rather than report the same EOPNOTSUPP at every seed."""
    setting = os.environ.get(FALLOCATE_SWITCH, "")
    if setting in ("on", "off"):
        return setting == "on"
    base = workdir / "fallocate-probe"
    for d in ("lower", "upper", "work"):
        (base / d).mkdir(parents=True)
    probe = Union(candidate, [base / "lower"], base / "upper", base / "work", base / "mnt", base / "probe.log",
                  extra=KERNEL_ORACLE_OPTIONS if candidate == "kernel" else [])
    probe.mount()
    try:
        probe.apply(["create", "f", 0o644, ""])
        return bool(probe.apply(["fallocate", "f", 0, 0, 4096])[0] == "ok")
    finally:
        probe.unmount()


def run_differential(seed: int, nops: int, candidate: str, workdir: Path,
                     check_every: int = 20, replay: list[list[Any]] | None = None,
                     case: str | None = None) -> Report:
    """One seeded run; stops at the first divergence (what follows would only cascade).

    ``replay``: run these operations instead of generating ``nops`` of them (the lowers still come
    from ``seed``); used to shrink a failing sequence. ``case``: one of ``CASES`` (its own lowers and
    operations) instead.
    """
    ensure_dangling_target_absent()
    rng = random.Random(seed)
    report = Report(seed, candidate)
    os.umask(0)
    if case is not None:
        make_lowers, replay = CASES[case]
        kernel_lowers = make_lowers(workdir / "gen")
        check_every = 1
    else:
        kernel_lowers = generate_lowers(rng, workdir / "gen", rng.choice([2, 3]))
    cand_lowers = copy_layers(kernel_lowers, workdir / "cand-lowers")
    userns = candidate == "lamina-userns"
    if userns:
        # In a user namespace trusted.* is out of reach: the candidate's lowers carry user.overlay.*.
        convert_to_user_xattrs(cand_lowers)
    elif seed % 2 == 1 and case is None:
        report.oci_markers = convert_to_oci_format(rng, cand_lowers)
    for d in ("k-upper", "k-work", "c-upper", "c-work", "x-work"):
        (workdir / d).mkdir()
    kernel = Union("kernel", kernel_lowers, workdir / "k-upper", workdir / "k-work", workdir / "k-mnt",
                   workdir / "k.log", extra=KERNEL_ORACLE_OPTIONS)
    cand = Union(candidate, cand_lowers, workdir / "c-upper", workdir / "c-work", workdir / "c-mnt",
                 workdir / "c.log", extra=KERNEL_ORACLE_OPTIONS if candidate == "kernel" else [])
    t0_ns = time.time_ns() - 1_000_000_000
    kernel.t0_ns = cand.t0_ns = t0_ns
    kernel.in_userns = userns
    kroot = str(kernel.mountpoint)
    with_fallocate = replay is None and fallocate_supported(candidate, workdir)
    report.outcomes[f"fallocate-ops:{'on' if with_fallocate else 'off'}"] = 1
    fallocate_modes = () if not with_fallocate else KERNEL_FALLOCATE_MODES if candidate == "kernel" \
        else FUSE_FALLOCATE_MODES
    mounted: list[Union] = []
    try:
        for u in (kernel, cand):
            u.mount()
            mounted.append(u)

        def compare_trees(stage: str) -> tuple[dict[str, int], dict[str, Result]]:
            ktree, _, _ = kernel.snap()
            ctree, cinos, problems = cand.snap()
            for line in diff_trees(ktree, ctree, "kernel", candidate):
                report.divergences.append(f"{stage}: tree: {line}")
            for line in problems:
                report.divergences.append(f"{stage}: {candidate} invariant: {line}")
            return cinos, ctree

        if not (case or "").endswith("-cold"):
            compare_trees("initial")
        else:
            check_every = 10**9
        for i in range(nops if replay is None else len(replay)):
            if report.divergences:
                break
            op = generate_op(rng, kroot, userns, fallocate_modes) if replay is None else replay[i]
            report.ops.append(op)
            refusable = userns and op[0] in REFUSED_RENAME_OPS
            parent_before = kernel.apply(["stat", os.path.dirname(op[1])]) if refusable else None
            kres = kernel.apply(op)
            cres = cand.apply(op)
            report.ops_run += 1
            key = f"{op[0]}:{kres[1] if kres[0] == 'err' else 'ok'}"
            report.outcomes[key] = report.outcomes.get(key, 0) + 1
            if op[0] in INO_CHECKED_OPS:
                # The kernel (index=off here) may change st_ino on copy-up; lamina must not (issue 3, 7).
                kres, cres, stable = _strip_stable(kres), _strip_stable(cres), _stable(cres)
                if not stable and candidate != "kernel":
                    report.divergences.append(f"op {i} {op_text(op)}: {candidate} changed the inode number")
                    break
            if kres != cres:
                report.divergences.append(f"op {i} {op_text(op)}: kernel={kres} {candidate}={cres}")
                break
            if refusable and kres == ["err", "ENOTEMPTY"] and \
                    _undo_refused_rename_stamp(kernel, cand, os.path.dirname(op[1]), parent_before):
                report.outcomes["undone:ext4-stamp"] = report.outcomes.get("undone:ext4-stamp", 0) + 1
            if (i + 1) % check_every == 0:
                compare_trees(f"after op {i}")
        if not report.divergences:
            cinos_before, _ = compare_trees("end")
        if report.divergences:
            return report
        for u in (cand, kernel):
            u.unmount()
            mounted.remove(u)
        for u in (kernel, cand):
            u.mount()
            mounted.append(u)
        cinos_after, ctree_after = compare_trees("after remount")
        moved = [r for r in cinos_after if cinos_before.get(r) not in (None, cinos_after[r])]
        if moved and candidate != "kernel":
            report.divergences.append(f"after remount: {candidate} inode numbers changed for {sorted(moved)[:10]}")
        for u in (cand, kernel):
            u.unmount()
            mounted.remove(u)
        # The candidate's upper must mean the same to the kernel (over the kernel-format lowers).
        # A kernel candidate (self-check) keeps its index in its workdir; anything else must need none.
        # In a user namespace lamina writes user.overlay.* markers: the kernel reads them with userxattr.
        cross = Union("kernel", cand_lowers if candidate in ("kernel", "lamina-userns") else kernel_lowers,
                      workdir / "c-upper", workdir / ("c-work" if candidate == "kernel" else "x-work"),
                      workdir / "x-mnt", workdir / "x.log",
                      extra=(KERNEL_ORACLE_OPTIONS if candidate == "kernel"
                             else ["userxattr"] if userns else []), t0_ns=t0_ns)
        try:
            cross.mount()
        except subprocess.CalledProcessError as e:
            report.divergences.append(f"the kernel refuses to mount {candidate}'s upper: {e.stderr!r}")
            return report
        mounted.append(cross)
        xtree, _, _ = cross.snap()
        # Without the candidate's index the kernel cannot know the link count of a lower hardlink
        # some of whose names are gone: compare everything else.
        for line in diff_trees(_without_nlink(ctree_after), _without_nlink(xtree), candidate, "kernel-on-its-upper"):
            report.divergences.append(f"{candidate}'s upper mounted by the kernel: {line}")
        return report
    finally:
        for u in reversed(mounted):
            u.unmount()


def _without_nlink(tree: dict[str, Any]) -> dict[str, Any]:
    return {rel: (v[:4] + [None] + v[5:] if isinstance(v, list) and len(v) > 5 else v) for rel, v in tree.items()}


def category(divergence: str) -> str:
    """A coarse kind of divergence, kept while shrinking so that one bug does not turn into another."""
    if divergence.startswith("op "):
        return "op:" + divergence.split("(", 1)[1].split(",", 1)[0].rstrip(")")
    # A tree that differs only after the remount (lamina reads its own upper wrongly) is another
    # bug than one that differs while mounted: shrinking must not trade one for the other.
    for marker in ("invariant", "inode numbers changed", "mounted by the kernel", "tree"):
        if marker in divergence:
            return ("after remount: " if marker == "tree" and divergence.startswith("after remount:") else "") + marker
    return "other"


def shrink(seed: int, candidate: str, ops: list[list[Any]], want: str,
           check_every: int = 10**9) -> list[list[Any]]:
    """Delta debugging: a smaller operation list over the same lowers that still diverges the same way."""

    def fails(trial: list[list[Any]]) -> bool:
        workdir = Path(tempfile.mkdtemp(prefix=f"lamina-shrink-{seed}-"))
        try:
            found = run_differential(seed, 0, candidate, workdir, check_every, replay=trial).divergences
            return any(category(d) == want for d in found)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    n = 2
    while len(ops) >= 2:
        chunk = -(-len(ops) // n)
        for start in range(0, len(ops), chunk):
            trial = ops[:start] + ops[start + chunk:]
            if fails(trial):
                ops, n = trial, max(n - 1, 2)
                break
        else:
            if n >= len(ops):
                break
            n = min(len(ops), 2 * n)
    if len(ops) == 1 and fails([]):
        return []
    return ops


def lower_listing(seed: int, ops: list[list[Any]]) -> list[str]:
    """How the generated lowers look at the paths (and their parents) that ``ops`` name."""
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix=f"lamina-lowers-{seed}-"))
    try:
        layers = generate_lowers(rng, base / "gen", rng.choice([2, 3]))
        if seed % 2 == 1:
            convert_to_oci_format(rng, copy_layers(layers, base / "cand"))
            layers = sorted((base / "cand").iterdir(), reverse=True)
        names = {a for op in ops for a in op[1:] if isinstance(a, str) and not a.startswith(("user.", "trusted."))
                 and len(a) < 40}
        rels: set[str] = set()
        for n in names:
            parts = n.split("/")
            rels.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
        out = []
        for i, layer in enumerate(layers):
            for rel in sorted(rels):
                for name in (rel, os.path.join(os.path.dirname(rel), ".wh." + os.path.basename(rel))):
                    full = layer / name
                    if not os.path.lexists(full):
                        continue
                    st = os.lstat(full)
                    kind = "whiteout" if _is_whiteout(st) else stat.filemode(st.st_mode)
                    extra = f" -> {os.readlink(full)}" if stat.S_ISLNK(st.st_mode) else ""
                    if stat.S_ISDIR(st.st_mode):
                        if _get_xattr(full, "trusted.overlay.opaque") or (full / ".wh..wh..opq").exists():
                            extra += " (opaque)"
                    out.append(f"lower {i} (0 = top): {name}: {kind} {st.st_uid}:{st.st_gid} "
                               f"size={st.st_size} nlink={st.st_nlink}{extra}")
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def op_text(op: list[Any]) -> str:
    shown = [a if not (isinstance(a, str) and len(a) > 24) else a[:12] + "…" for a in op]
    shown = [oct(a) if isinstance(a, int) and op[0] in ("chmod", "mkdir", "create", "create_excl",
                                                          "mkfifo") and 0 < a < 0o10000 else a
             for a in shown]
    return "(" + ", ".join(map(str, shown)) + ")"


def run_isolated(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run this module's command line in a private mount namespace."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, __file__, *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--worker"]:
        return worker_main(args_in[1], args_in[2], args_in[3], int(args_in[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", default="lamina",
                        choices=["lamina", "lamina-userns", "fuse-overlayfs", "kernel"])
    parser.add_argument("--seed", type=int, action="append", default=[])
    parser.add_argument("--case", choices=sorted(CASES), help="run a hand-written case instead of seeds")
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="count outcomes per operation")
    parser.add_argument("--shrink", action="store_true", help="shrink a diverging sequence to a minimal one")
    parser.add_argument("--want", help="shrink for this category of divergence (default: the first one's)")
    parser.add_argument("--replay", help="JSON list of operations to run instead of generated ones")
    parser.add_argument("--json", action="store_true", help="print one JSON report per seed")
    args = parser.parse_args(argv)
    if not args.seed and not args.case:
        parser.error("give --seed or --case")
    failed = 0
    for seed in args.seed or [0]:
        workdir = Path(tempfile.mkdtemp(prefix=f"lamina-diff-{seed}-"))
        try:
            replay = json.loads(args.replay) if args.replay else None
            report = run_differential(seed, args.ops, args.candidate, workdir, replay=replay, case=args.case)
            report.server_log = _error_lines(workdir / "c.log")
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        failed += bool(report.divergences)
        if args.json:
            print(json.dumps(report.__dict__), flush=True)
        else:
            print(f"seed {seed}: {report.ops_run} ops, {len(report.divergences)} divergences, "
                  f"{report.oci_markers} OCI-format markers"
                  + (f" (workdir {workdir})" if args.keep else ""))
            if args.verbose:
                print("    outcomes:", " ".join(f"{k}={v}" for k, v in sorted(report.outcomes.items())))
            for line in report.divergences:
                print("   ", line)
            for line in report.server_log:
                print("    server:", line)
            if report.divergences and not args.shrink:
                print("    last ops:")
                for op in report.ops[-8:]:
                    print("     ", op_text(op))
            if report.divergences and args.shrink and report.ops and not args.case:
                small = shrink(seed, args.candidate, report.ops, args.want or category(report.divergences[0]))
                workdir = Path(tempfile.mkdtemp(prefix=f"lamina-diff-{seed}-"))
                try:
                    again = run_differential(seed, 0, args.candidate, workdir, check_every=1, replay=small)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                print(f"    shrunk to {len(small)} ops: --seed {seed} --replay '{json.dumps(small)}'")
                for line in again.divergences:
                    print("     ", line)
                for line in lower_listing(seed, small):
                    print("     ", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
