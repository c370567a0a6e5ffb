"""The filesystem suite's workloads: each one timed on a union freshly mounted over the image.

A workload gets the mount point and the image's manifest, and returns a :class:`Measured`: seconds
per metric ("cold" right after the mount with the kernel's caches dropped, "warm" when the same
work is repeated at once), and what it found wrong. Every workload checks its result against the
image's model (counts, sizes), so a fast wrong answer is reported as wrong, not as fast. Mutating
workloads each touch their own set of files, so one repetition can run them in any order on one
upper directory.
"""

from __future__ import annotations

import errno
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.fs_image import MIB, Manifest

now = time.perf_counter
READDIR_WARM_CALLS = 5
COMMAND_TIMEOUT_S = 600


@dataclass
class Measured:
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[Path, Manifest], Measured]
    prepare: Callable[[Manifest], None] | None = None  # untimed, after the caches are dropped


def _cold_then_warm(metric: str, once: Callable[[], str | None]) -> Measured:
    """Time ``once`` right after the mount (cold) and again at once (warm); it returns what it
    found wrong, or None."""
    out = Measured()
    for phase in ("cold", "warm"):
        start = now()
        problem = once()
        out.seconds[f"{metric}_{phase}"] = now() - start
        if problem:
            out.problems.append(f"{metric} {phase}: {problem}")
    return out


def find_files(mnt: Path, manifest: Manifest) -> Measured:
    def once() -> str | None:
        done = subprocess.run(["find", str(mnt), "-type", "f"], capture_output=True, timeout=COMMAND_TIMEOUT_S)
        count = done.stdout.count(b"\n")
        if done.returncode != 0 or count != manifest.expected_files:
            return f"{count} files (expected {manifest.expected_files}), exit {done.returncode}"
        return None

    return _cold_then_warm("find", once)


def walk_and_stat(mnt: Path, manifest: Manifest) -> Measured:
    def once() -> str | None:
        entries = 0
        for directory, dirs, files in os.walk(mnt):
            for name in dirs + files:
                os.lstat(os.path.join(directory, name))
            entries += len(dirs) + len(files)
        return None if entries == manifest.expected_entries else \
            f"{entries} entries (expected {manifest.expected_entries})"

    return _cold_then_warm("walk", once)


def stat_paths(mnt: Path, manifest: Manifest) -> Measured:
    """lstat of known paths, without listing any directory: lookups only."""
    paths = [os.path.join(mnt, rel) for rel in manifest.stat_paths]

    def once() -> str | None:
        missing = 0
        for path in paths:
            try:
                os.lstat(path)
            except FileNotFoundError:
                missing += 1
        return f"{missing} of {len(paths)} paths missing" if missing else None

    return _cold_then_warm("stat", once)


def list_big_directory(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    directory = mnt / "bigdir"
    start = now()
    count = len(os.listdir(directory))
    out.seconds["readdir_cold"] = now() - start
    warm = []
    for _ in range(READDIR_WARM_CALLS):
        start = now()
        os.listdir(directory)
        warm.append(now() - start)
    out.seconds["readdir_warm"] = statistics.median(warm)
    if count != manifest.bigdir_entries:
        out.problems.append(f"readdir: {count} entries (expected {manifest.bigdir_entries})")
    return out


def read_sequentially(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    total = 0
    start = now()
    with open(mnt / "big" / "A.bin", "rb", buffering=0) as f:
        while chunk := f.read(MIB):
            total += len(chunk)
    out.seconds["seqread_cold"] = now() - start
    if total != manifest.big_size:
        out.problems.append(f"seqread: {total} bytes (expected {manifest.big_size})")
    return out


def random_offsets(manifest: Manifest) -> list[int]:
    rng = random.Random(manifest.params["seed"] + 1)
    blocks = manifest.big_size // 4096
    return [rng.randrange(blocks) * 4096 for _ in range(manifest.params["rand_n"])]


def read_randomly(mnt: Path, manifest: Manifest) -> Measured:
    offsets = random_offsets(manifest)

    def once() -> str | None:
        fd = os.open(mnt / "big" / "A.bin", os.O_RDONLY)
        try:
            short = sum(len(os.pread(fd, 4096, offset)) != 4096 for offset in offsets)
        finally:
            os.close(fd)
        return f"{short} short reads" if short else None

    return _cold_then_warm("randread", once)


def create_small_files(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    count = manifest.params["create_n"]
    directory = mnt / "created"
    payload = b"x" * 4096
    start = now()
    os.mkdir(directory)
    for j in range(count):
        fd = os.open(directory / f"c{j:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    out.seconds["create"] = now() - start
    listed = len(os.listdir(directory))
    if listed != count or os.stat(directory / "c00000").st_size != len(payload):
        out.problems.append(f"create: {listed} files listed (expected {count})")
    return out


def _append_one_byte(path: Path) -> None:
    """Open a lower file for appending (the copy-up) and write one byte."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def append_to_lower_files(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    paths = [mnt / rel for rel in manifest.copyup]
    start = now()
    for path in paths:
        _append_one_byte(path)
    out.seconds["copyup_small"] = now() - start
    wrong = sum(os.stat(p).st_size != size + 1 for p, size in zip(paths, manifest.copyup_sizes, strict=True))
    if wrong:
        out.problems.append(f"copyup_small: {wrong} of {len(paths)} files have the wrong size")
    return out


def append_to_large_file(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    path = mnt / "big" / "B.bin"
    start = now()
    _append_one_byte(path)
    out.seconds["copyup_large"] = now() - start
    os.sync()
    out.seconds["copyup_large_sync"] = now() - start
    size = os.stat(path).st_size
    if size != manifest.big_size + 1:
        out.problems.append(f"copyup_large: size {size} (expected {manifest.big_size + 1})")
    return out


def unlink_lower_files(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    paths = [mnt / rel for rel in manifest.delete]
    start = now()
    for path in paths:
        os.unlink(path)
    out.seconds["delete"] = now() - start
    still = sum(os.path.lexists(p) for p in paths)
    if still:
        out.problems.append(f"delete: {still} of {len(paths)} files still there")
    return out


def rename_lower_directory(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    source, target = mnt / "mvdir", mnt / "mvdir_renamed"
    start = now()
    try:
        os.rename(source, target)
        out.info["mode"] = "rename(2)"
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        done = subprocess.run(["mv", str(source), str(target)], capture_output=True, timeout=COMMAND_TIMEOUT_S)
        out.info["mode"] = f"EXDEV, then mv copies (exit {done.returncode})"
    out.seconds["rename_dir"] = now() - start
    count = len(os.listdir(target)) if target.is_dir() else -1
    if count != manifest.mvdir_files or source.exists():
        out.problems.append(f"rename: {count} files under the new name (expected {manifest.mvdir_files})")
    return out


REQUESTS_N = 20_000


def request_floor(mnt: Path, manifest: Manifest) -> Measured:
    """getxattr of a name no file has, again and again on one file: every call is one request the
    kernel cannot answer from its caches, and the answer costs the server one system call. What
    a union spends per request beyond that is the floor under every request-bound row."""
    out = Measured()
    path = str(mnt / "big" / "A.bin")
    os.lstat(path)  # the lookups are not what this measures
    absent = 0
    start = now()
    for _ in range(REQUESTS_N):
        try:
            os.getxattr(path, "user.lamina-bench-absent", follow_symlinks=False)
        except OSError as e:
            absent += e.errno == errno.ENODATA
    out.seconds["requests"] = now() - start
    if absent != REQUESTS_N:
        out.problems.append(f"requests: {REQUESTS_N - absent} of {REQUESTS_N} getxattr calls did not say ENODATA")
    return out


def read_tarball(manifest: Manifest) -> None:
    """Put the tarball in the page cache: untar measures writing through the union, not reading it."""
    with open(manifest.tarball, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def untar(mnt: Path, manifest: Manifest) -> Measured:
    out = Measured()
    start = now()
    done = subprocess.run(["tar", "-xf", str(manifest.tarball), "-C", str(mnt)], capture_output=True,
                          timeout=COMMAND_TIMEOUT_S)
    out.seconds["untar"] = now() - start
    if done.returncode != 0 or not (mnt / manifest.tar_last).exists():
        out.problems.append(f"untar: exit {done.returncode}: {done.stderr.decode(errors='replace')[:200]}")
    return out


WORKLOADS = [
    Workload("find", find_files),
    Workload("walk", walk_and_stat),
    Workload("stat", stat_paths),
    Workload("readdir", list_big_directory),
    Workload("seqread", read_sequentially),
    Workload("randread", read_randomly),
    Workload("create", create_small_files),
    Workload("copyup_small", append_to_lower_files),
    Workload("copyup_large", append_to_large_file),
    Workload("delete", unlink_lower_files),
    Workload("rename", rename_lower_directory),
    Workload("untar", untar, prepare=read_tarball),
    Workload("requests", request_floor),
]


def row_labels(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(metric, workload, label) of every row, in the order the table shows them."""
    p = manifest.params
    big = f"{manifest.big_size // MIB} MiB"
    return [
        ("mount", "", "mount (spawn to answering stat)"),
        ("find_cold", "find", f"find -type f, {manifest.expected_files} files, cold"),
        ("find_warm", "find", "find -type f, warm"),
        ("walk_cold", "walk", f"os.walk + lstat, {manifest.expected_entries} entries, cold"),
        ("walk_warm", "walk", "os.walk + lstat, warm"),
        ("stat_cold", "stat", f"lstat {len(manifest.stat_paths)} known paths, cold"),
        ("stat_warm", "stat", "lstat known paths, warm"),
        ("readdir_cold", "readdir", f"listdir of a {manifest.bigdir_entries}-entry merged directory, cold"),
        ("readdir_warm", "readdir", f"listdir, warm (median of {READDIR_WARM_CALLS})"),
        ("seqread_cold", "seqread", f"read a {big} lower file, 1 MiB reads, cold"),
        ("randread_cold", "randread", f"{p['rand_n']} x 4 KiB pread of a {big} lower file, cold"),
        ("randread_warm", "randread", "4 KiB preads, warm"),
        ("create", "create", f"create + write 4 KiB + close {p['create_n']} new files"),
        ("copyup_small", "copyup_small", f"append 1 B to {len(manifest.copyup)} lower small files"),
        ("copyup_large", "copyup_large", f"append 1 B to a {big} lower file (copy-up)"),
        ("copyup_large_sync", "copyup_large", "... and sync()"),
        ("delete", "delete", f"unlink {len(manifest.delete)} lower files"),
        ("rename_dir", "rename", f"rename a lower directory of {manifest.mvdir_files} files"),
        ("untar", "untar", f"tar -x {manifest.tar_files} small files"),
        ("requests", "requests", f"{REQUESTS_N} getxattr requests of an absent name (request floor)"),
    ]
