"""``python -m bench.lazy``: an image mounted lazily from a registry, against pulling it first.

One image (lamina's busybox base and a data layer of ``--files`` small files plus one large file,
random bytes, ``--scale`` multiplies the sizes) is pushed to Debian's Distribution registry on
127.0.0.1 twice: as stored (gzip) and as eStargz. Then, per repetition and from empty stores, in
rotating order:

- ``lamina lazy``: ``lamina mount REF DIR`` of the eStargz image (ready = the command returns),
  ``ls -R`` of the whole tree (a walk with lstat), then reading one small file;
- ``lamina pull``: ``lamina pull`` of the gzip image, then ``lamina mount`` of it, the same walk
  and read;
- ``podman``: ``podman pull`` of the eStargz image (a normal pull) and ``podman image mount``, the
  same walk and read (root only; skipped with a note otherwise).

The run rows (``run --rm REF cat FILE`` lazily, or after a pull) are :mod:`bench.lazy_run`'s.

Bytes are counted on the registry's side, from its access log (blob GETs, ranges included). The
run writes ``bench/results/DATE-lazy.json`` and ``.md``. It needs root for podman and the
``docker-registry`` package; the tests' registry fixture starts the registry.

The issue's target image (``--image big``, offline): busybox and a data layer of ``--files`` small
files plus one large file, ``--size-mb`` in all (random bytes: as much compressed as not).
``--image debian`` (network, opt-in) builds a Debian base with python3 by debootstrap from
``--mirror`` instead of busybox, under the same data layer. For either, the ``ls -R`` row's bytes
must be 0: a walk reads TOCs only, and they all came when the mount became ready.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Row, SuiteResult, machine_stamp, markdown_table, timed
from bench.lamina_cli import lamina_command
from bench.podman_env import PodmanEnv, PodmanUnavailable, open_podman_env

log = logging.getLogger(__name__)

LAZY, PULL, PODMAN = "lamina lazy", "lamina pull", "podman"
_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" (200|206) (\d+)')


def registry_bytes(log_path: Path) -> int:
    """Blob bytes the registry has sent so far, from its access log."""
    return sum(int(m.group(2)) for m in _BLOB_GET.finditer(log_path.read_text(errors="replace")))


def make_image(root: Path, files: int, scale: float, seed: int = 20261207) -> str:
    """busybox + a data layer in a new store at ``root``; returns the image's tag."""
    from lamina.store import Store

    store = Store.open(root)
    base = store.resolve_image("lamina/busybox")
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        upper = Path(tmp) / "upper"
        for i in range(files):
            path = upper / "data" / f"d{i % 50:02d}" / f"f{i:05d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(int(rng.randint(1024, 32 * 1024) * scale)))
        (upper / "data" / "large.bin").write_bytes(rng.randbytes(int(32 * 1024 * 1024 * scale)))
        layer = store.commit_layer(upper)
    config = json.loads(json.dumps(base.config))
    config["history"].append({"created_by": "bench data layer"})
    store.create_image(base.layers + [layer], config, tags=["bench/lazy:1"], base=base)
    return "bench/lazy:1"


DEBIAN_MIRROR = "http://deb.debian.org/debian"


def _data_layer(store: Any, files: int, total_bytes: int, seed: int) -> Any:
    """A layer of ``files`` small random files (1-32 KiB) and one large one, ``total_bytes`` in all."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=store.root) as tmp:
        upper = Path(tmp) / "upper"
        written = 0
        for i in range(files):
            path = upper / "data" / f"d{i % 50:02d}" / f"f{i:05d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = rng.randint(1024, 32 * 1024)
            path.write_bytes(rng.randbytes(size))
            written += size
        with open(upper / "data" / "large.bin", "wb") as out:
            left = max(total_bytes - written, 0)
            while left > 0:
                piece = min(left, 8 << 20)
                out.write(rng.randbytes(piece))
                left -= piece
        return store.commit_layer(upper)


def make_big_image(root: Path, files: int, size_mb: int, debian: bool, mirror: str,
                   seed: int = 20261207) -> str:
    """The issue's ~500 MB image in a new store at ``root``: a base (busybox, or Debian with
    python3 built by debootstrap) and a data layer of ``size_mb`` MB; returns its tag."""
    from lamina.store import Store

    store = Store.open(root)
    base = store.resolve_image("lamina/busybox")
    config = json.loads(json.dumps(base.config))
    layers = list(base.layers)
    if debian:
        rootfs = root.parent / "debian-rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(rootfs), mirror],
                       check=True, stdout=subprocess.DEVNULL)
        layers = [store.commit_layer(rootfs)]
        config["history"] = [{"created_by": f"debootstrap --variant=minbase --include=python3 bookworm {mirror}"}]
        config["config"]["Env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        config["config"]["Cmd"] = ["python3"]
    layers.append(_data_layer(store, files, size_mb * 1_000_000, seed))
    config["history"].append({"created_by": f"bench data layer ({files} files, {size_mb} MB)"})
    store.create_image(layers, config, tags=["bench/lazy:1"], base=None if debian else base)
    return "bench/lazy:1"


def walk(root: Path) -> int:
    """``ls -R`` with lstat of every entry; the number of entries."""
    count = 0
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            os.lstat(os.path.join(directory, name))
            count += 1
    return count


class Measure:
    """Times steps into rows and counts the registry's bytes for each."""

    def __init__(self, registry_log: Path) -> None:
        self.registry_log = registry_log
        self.rows: dict[str, Row] = {}
        self.bytes: dict[str, dict[str, list[int]]] = {}

    def step(self, key: str, label: str, system: str, action: Callable[[], object]) -> None:
        before = registry_bytes(self.registry_log)
        start = time.perf_counter()
        action()
        self.rows.setdefault(key, Row("lazy", key, label)).add(system, time.perf_counter() - start)
        self.bytes.setdefault(key, {}).setdefault(system, []).append(registry_bytes(self.registry_log) - before)

    def note(self, system: str, text: str) -> None:
        for row in self.rows.values():
            row.note(system, text)


def lamina(root: Path, *args: str) -> None:
    timed([*lamina_command(), "--root", str(root), *args], cwd=REPO_ROOT)


@contextlib.contextmanager
def mounted(root: Path, ref: str, mountpoint: Path) -> Iterator[None]:
    mountpoint.mkdir()
    try:
        yield
    finally:
        timed([*lamina_command(), "--root", str(root), "umount", str(mountpoint)], check=False, cwd=REPO_ROOT)


def lazy_round(m: Measure, work: Path, esgz_ref: str, small_file: str) -> None:
    root, mnt = work / "lazy-root", work / "lazy-mnt"
    with mounted(root, esgz_ref, mnt):
        m.step("ready", "ready to list (mount, or pull + mount)", LAZY, lambda: lamina(root, "mount", esgz_ref, str(mnt)))
        m.step("walk", "ls -R of the whole tree", LAZY, lambda: walk(mnt))
        m.step("read", "then read one small file", LAZY, lambda: (mnt / small_file).read_bytes())


def pull_round(m: Measure, work: Path, gzip_ref: str, small_file: str) -> None:
    root, mnt = work / "pull-root", work / "pull-mnt"

    def pull_and_mount() -> None:
        lamina(root, "pull", "-q", gzip_ref)
        lamina(root, "mount", gzip_ref, str(mnt))

    with mounted(root, gzip_ref, mnt):
        m.step("ready", "", PULL, pull_and_mount)
        m.step("walk", "", PULL, lambda: walk(mnt))
        m.step("read", "", PULL, lambda: (mnt / small_file).read_bytes())


def podman_round(m: Measure, podman: PodmanEnv, esgz_ref: str, small_file: str) -> None:
    holder: dict[str, Path] = {}

    def pull_and_mount() -> None:
        podman.run(["pull", "--tls-verify=false", "-q", esgz_ref])
        holder["root"] = Path(podman.run(["image", "mount", esgz_ref]).stdout.decode().strip())

    try:
        m.step("ready", "", PODMAN, pull_and_mount)
        m.step("walk", "", PODMAN, lambda: walk(holder["root"]))
        m.step("read", "", PODMAN, lambda: (holder["root"] / small_file).read_bytes())
    finally:
        podman.run(["image", "unmount", "--all"], check=False)
        podman.run(["rmi", "-f", esgz_ref], check=False)


def run(reps: int, files: int, scale: float, work: Path, image: str = "small", size_mb: int = 500,
        mirror: str = DEBIAN_MIRROR) -> SuiteResult:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from registry_server import run_registry

    source = work / "source-root"
    if image == "small":
        tag = make_image(source, files, scale)
    else:
        tag = make_big_image(source, files, size_mb, image == "debian", mirror)
    small_file = "data/d00/f00000"
    with run_registry(work / "registry") as registry, contextlib.ExitStack() as stack:
        gzip_ref, esgz_ref = f"{registry.address}/bench/lazy:gzip", f"{registry.address}/bench/lazy:esgz"
        lamina(source, "push", "--tls-verify=false", tag, gzip_ref)
        lamina(source, "push", "--tls-verify=false", "--compression-format", "estargz", tag, esgz_ref)
        m = Measure(registry.log_path)
        podman: PodmanEnv | None = None
        try:
            podman = stack.enter_context(open_podman_env(storage_driver="overlay")) if os.geteuid() == 0 else None
        except PodmanUnavailable as e:
            log.warning("podman: %s", e)
        rounds: list[Callable[[Path], None]] = [
            lambda w: lazy_round(m, w, esgz_ref, small_file),
            lambda w: pull_round(m, w, gzip_ref, small_file)]
        if podman is not None:
            rounds.append(lambda w: podman_round(m, podman, esgz_ref, small_file))
        from bench.lazy_run import run_rounds

        rounds += run_rounds(m, esgz_ref, gzip_ref, small_file, podman)
        for rep in range(reps):
            for index in range(len(rounds)):
                one = rounds[(index + rep) % len(rounds)]
                with tempfile.TemporaryDirectory(dir=work, prefix=f"rep{rep}-") as tmp:
                    one(Path(tmp))
        if podman is None:
            m.note(PODMAN, "not available: needs root and a working podman")
        sizes = json.loads(timed([*lamina_command(), "--root", str(source), "inspect", tag], cwd=REPO_ROOT)[1].stdout)
    systems = [LAZY, PULL, PODMAN]
    details: dict[str, Any] = {"files": files, "scale": scale, "reps": reps, "image_size": sizes[0].get("Size"),
                               "image": image, "size_mb": size_mb if image != "small" else None,
                               "bytes_from_registry": m.bytes, "load": os.getloadavg()}
    return SuiteResult("lazy", systems, list(m.rows.values()), details)


def _image_line(details: dict[str, Any]) -> str:
    if details.get("image", "small") == "small":
        return f"{details['files']} files + one large file (scale {details['scale']})"
    base = "Debian bookworm + python3 (debootstrap)" if details["image"] == "debian" else "busybox"
    return f"{base} + a data layer of {details['files']} files and one large file, {details['size_mb']} MB"


def render(suite: SuiteResult, stamp: dict[str, Any]) -> str:
    lines = [f"# Lazy mount from a registry ({time.strftime('%Y-%m-%d')})", "",
             f"commit {stamp['commit'][:12]}, kernel {stamp['kernel']}, {stamp['cpus']} CPUs, "
             f"{_image_line(suite.details)}, median of {suite.details['reps']}, "
             f"load {suite.details.get('load', ('?',))[0]}", "", markdown_table(suite), "",
             "Bytes from the registry (median per step):", "",
             "| step | " + " | ".join(suite.systems) + " |", "|---|" + "---:|" * len(suite.systems)]
    for key, per_system in suite.details["bytes_from_registry"].items():
        cells = [str(sorted(per_system[s])[len(per_system[s]) // 2]) if s in per_system else "—" for s in suite.systems]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    from bench.lazy_run import run_summary

    lines += run_summary(suite)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lazy", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--image", choices=("small", "big", "debian"), default="small",
                        help="small: --files and --scale; big: busybox + --size-mb of data (the issue's "
                             "target, offline); debian: debootstrap's Debian + python3 + the data (network)")
    parser.add_argument("--size-mb", type=int, default=500, help="the data layer of --image big/debian")
    parser.add_argument("--mirror", default=DEBIAN_MIRROR, help="the Debian mirror of --image debian")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-lazy-") as tmp:
        suite = run(args.reps, args.files, args.scale, Path(tmp), args.image, args.size_mb, args.mirror)
    stamp = machine_stamp()
    name = time.strftime("%Y%m%d-%H%M") + "-lazy"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"stamp": stamp, "suite": suite.to_json()}, indent=1))
    markdown = render(suite, stamp)
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
