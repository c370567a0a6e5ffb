"""Big-layer suite: builds and store verbs whose time goes into committing and moving layers.

The same contestants as the build suite (:func:`bench.containers.open_contestants`), the same
rotation per repetition, but workloads sized like real images:

- ``RUN dd if=/dev/urandom of=/big bs=1M count=N`` (incompressible content made by a RUN);
- a ``RUN`` creating many small files in 100 directories with ``echo > file``;
- ``COPY blob /blob`` of an N MiB file from the build context;
- ``import`` of a rootfs tarball holding the base, one big file and the many small files, then
  ``save -o FILE`` (docker-archive) and, after ``rmi``, ``load -i FILE``.

Every build is cold (``--no-cache``) and its image is removed (untimed) afterwards so the stores
do not grow by a big layer per repetition. Besides the time, each command's peak resident set
(``ru_maxrss`` of the process tree the command waited for, from ``wait4``) is kept in the
details, since the store must not buffer whole layers in memory. The table's spread column is the
slowest of the repetitions over their median.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import CommandFailed, Row, SuiteResult
from bench.containers import (
    Contestant,
    _build_args,
    _remove_tree,
    _rotated,
    _user_kwargs,
    base_tarball,
    open_contestants,
)

log = logging.getLogger(__name__)

LAYER_DOCKERFILES = {
    "dd": "FROM {base}\nRUN dd if=/dev/urandom of=/big bs=1M count={mib} 2>/dev/null\n",
    "many_files": textwrap.dedent("""\
        FROM {base}
        RUN i=0; while [ $i -lt 100 ]; do mkdir -p /many/d$i; j=0; \\
            while [ $j -lt {per_dir} ]; do echo $j > /many/d$i/f$j; j=$((j+1)); done; i=$((i+1)); done
        """),
    "copy_big": "FROM {base}\nCOPY blob /blob\n",
}
BIG_REF = "localhost/bench-big:latest"


@dataclass
class LayerSizes:
    """How big the layers are: 200 MiB and 10,000 files by default, 1 GiB and 100,000 with --big."""

    mib: int = 200
    files: int = 10_000

    @classmethod
    def choose(cls, *, quick: bool, big: bool) -> LayerSizes:
        if quick:
            return cls(mib=2, files=200)
        return cls(mib=1024, files=100_000) if big else cls()


def write_layer_contexts(workdir: Path, sizes: LayerSizes) -> dict[str, Path]:
    """One context per Dockerfile (``Dockerfile.lamina``/``.podman``), readable by every user."""
    contexts = {}
    for name, text in LAYER_DOCKERFILES.items():
        context = workdir / "layer-contexts" / name
        context.mkdir(parents=True)
        for kind, base in (("lamina", "lamina/busybox:latest"), ("podman", "localhost/lamina-bench-base:latest")):
            (context / f"Dockerfile.{kind}").write_text(
                text.format(base=base, mib=sizes.mib, per_dir=max(1, sizes.files // 100)))
        contexts[name] = context
    _write_random(contexts["copy_big"] / "blob", sizes.mib << 20)
    for path in [workdir / "layer-contexts", *(workdir / "layer-contexts").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return contexts


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = min(left, 8 << 20)
            out.write(os.urandom(chunk))
            left -= chunk


def make_big_tarball(base_tar: Path, sizes: LayerSizes, dest: Path) -> Path:
    """The base rootfs plus /big (random, ``sizes.mib``) and ``sizes.files`` small files under /many."""
    with tempfile.TemporaryDirectory(prefix="bench-big-", dir=dest.parent) as scratch:
        blob = Path(scratch) / "big"
        _write_random(blob, sizes.mib << 20)
        with tarfile.open(base_tar) as base, tarfile.open(dest, "w") as out:
            for member in base:
                out.addfile(member, base.extractfile(member) if member.isfile() else None)
            out.add(blob, arcname="big")
            for index in range(sizes.files):
                data = f"{index}\n".encode()
                info = tarfile.TarInfo(f"many/d{index % 100}/f{index // 100}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                out.addfile(info, _Bytes(data))
    dest.chmod(0o644)
    return dest


class _Bytes:
    """The smallest file object ``TarFile.addfile`` reads from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        out, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return out


def run_measured(contestant: Contestant, args: list[str], timeout: float = 1800) -> tuple[float, int]:
    """Run one command of ``contestant``; (seconds, peak RSS in KiB of the tree it waited for)."""
    if contestant.lamina is not None:
        argv, kwargs = contestant.lamina.argv(args), contestant.lamina.subprocess_kwargs()
    else:
        assert contestant.podman is not None
        argv, kwargs = contestant.podman.argv(args), {"env": contestant.podman.environment(),
                                                      **_user_kwargs(contestant.podman)}
    return measure_argv(argv, kwargs, timeout)


def measure_argv(argv: list[str], kwargs: dict[str, Any], timeout: float = 1800) -> tuple[float, int]:
    """Run ``argv`` (``kwargs`` for Popen); (seconds, peak RSS in KiB of the tree it waited for)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise CommandFailed(argv, subprocess.CompletedProcess(argv, process.returncode, b"", err.read()[-4000:]))
    return elapsed, usage.ru_maxrss


def _measure(row: Row, contestant: Contestant, verb: str, args: list[str], rss: dict[str, Any]) -> bool:
    note = contestant.note_for((verb,))
    if note:
        row.note(contestant.label, note)
        return False
    try:
        seconds, peak_kib = run_measured(contestant, args)
    except (CommandFailed, subprocess.TimeoutExpired, OSError) as exc:
        log.warning("%s: %s: %s", row.label, contestant.label, exc)
        row.note(contestant.label, f"failed: {str(exc)[:300]}")
        return False
    row.add(contestant.label, seconds)
    rss.setdefault(row.key, {}).setdefault(contestant.label, []).append(peak_kib // 1024)
    return True


def _forget(contestant: Contestant, ref: str) -> None:
    if contestant.note_for(("rmi",)) is None:
        with contextlib.suppress(CommandFailed, subprocess.TimeoutExpired):
            contestant.command(["rmi", "-f", ref], timeout=300)
        with contextlib.suppress(CommandFailed, subprocess.TimeoutExpired):
            contestant.command(["image", "prune", "-f"] if contestant.podman else ["system", "prune", "-f"],
                               timeout=300)


def run_layer_suite(*, quick: bool, big: bool, reps: int, podman_modes: list[str],
                    lamina_modes: list[str]) -> SuiteResult:
    """Run the big-layer builds and store verbs with every contestant, interleaved."""
    sizes = LayerSizes.choose(quick=quick, big=big)
    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-layers-", dir="/var/tmp"))
    workdir.chmod(0o755)
    try:
        base_tar, _origin = base_tarball(workdir)
        contexts = write_layer_contexts(workdir, sizes)
        big_tar = make_big_tarball(base_tar, sizes, workdir / "big.tar")
        archives = workdir / "archives"
        archives.mkdir(mode=0o777)
        archives.chmod(0o777)
        labels = {"dd": f"RUN dd {sizes.mib} MiB from /dev/urandom",
                  "many_files": f"RUN creating {sizes.files:,} files in 100 directories",
                  "copy_big": f"COPY of a {sizes.mib} MiB file"}
        rows = {name: Row("layers", f"build_{name}", f"build --no-cache: {labels[name]}") for name in contexts}
        tar_mib = big_tar.stat().st_size >> 20
        for verb, text in (("import", f"import a {tar_mib} MiB rootfs tarball ({sizes.files:,} small files)"),
                           ("save", "save -o FILE (docker-archive) of that image"),
                           ("load", "load -i FILE (after rmi)")):
            rows[verb] = Row("layers", verb, text)
        rss: dict[str, Any] = {}
        with open_contestants(workdir, podman_modes, lamina_modes, base_tar) as contestants:
            for rep in range(reps):
                log.info("layers: repetition %d/%d", rep + 1, reps)
                shift = rep
                for name, context in contexts.items():
                    for contestant in _rotated(contestants, shift):
                        shift += 1
                        tag = f"localhost/bench-{name}:latest"
                        _measure(rows[name], contestant, "build", _build_args(context, tag, cold=True,
                                                                              kind=contestant.kind), rss)
                        _forget(contestant, tag)
                for contestant in _rotated(contestants, shift):
                    shift += 1
                    archive = archives / f"{contestant.label.replace(' ', '_').replace('/', '_')}.tar"
                    with contextlib.suppress(FileNotFoundError):
                        archive.unlink()
                    _forget(contestant, BIG_REF)
                    if (_measure(rows["import"], contestant, "import", ["import", str(big_tar), BIG_REF], rss)
                            and _measure(rows["save"], contestant, "save",
                                         ["save", "-o", str(archive), "--format", "docker-archive", BIG_REF], rss)):
                        _forget(contestant, BIG_REF)
                        _measure(rows["load"], contestant, "load", ["load", "-i", str(archive)], rss)
                    _forget(contestant, BIG_REF)
                    with contextlib.suppress(FileNotFoundError):
                        archive.unlink()
            systems = [c.label for c in contestants]
        details = {"sizes": sizes.__dict__, "peak_rss_mib": rss, "big_tar_bytes": big_tar.stat().st_size,
                   "dockerfiles": {n: (c / "Dockerfile.lamina").read_text() for n, c in contexts.items()}}
        return SuiteResult("layers", systems, list(rows.values()), details=details)
    finally:
        _remove_tree(workdir)


def spread_markdown(suite: SuiteResult) -> str:
    """Per row and system: the slowest repetition over the median, and the peak RSS (MiB)."""
    rss = suite.details.get("peak_rss_mib", {})
    header = ["workload", *(f"{s} spread" for s in suite.systems), *(f"{s} peak RSS" for s in suite.systems)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in suite.rows:
        cells = [row.label]
        for system in suite.systems:
            values, median = row.samples.get(system), row.median(system)
            cells.append(f"{max(values) / median:.2f}" if values and median else "—")
        for system in suite.systems:
            peaks = rss.get(row.key, {}).get(system)
            cells.append(f"{max(peaks)} MiB" if peaks else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
