"""Build, run and store suites: lamina against podman on the same busybox base and Dockerfiles.

Every contestant (lamina as root, lamina as an unprivileged user, podman in each requested mode)
gets a private store holding the same base image, imported from one rootfs tarball. Then, per
repetition and per workload, the contestants take turns in a rotating order:

- build: each Dockerfile of :data:`DOCKERFILES` with ``--no-cache`` (cold), then again at once
  (cached rebuild);
- run: ``run --rm BASE true`` start to exit, with the default network and with ``--network none``;
- store: ``import`` of one rootfs tarball (the base plus the "files" context), ``save -o FILE``
  of that image (docker-archive), then ``rmi`` and ``load -i`` of the archive.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bench.common import LAMINA, NOT_AVAILABLE, CommandFailed, Row, SuiteResult, timed
from bench.lamina_cli import LaminaCli
from bench.podman_env import (
    FUSE_OVERLAYFS,
    PodmanEnv,
    PodmanUnavailable,
    ensure_bench_user,
    open_podman_env,
)

log = logging.getLogger(__name__)

# lamina's embedded base (store.base), and the same layer imported into podman under this name.
LAMINA_BASE_REF = "lamina/busybox:latest"
PODMAN_BASE_REF = "localhost/lamina-bench-base:latest"


class PodmanMode(NamedTuple):
    storage_driver: str
    rootless: bool
    mount_program: str | None = None


PODMAN_MODES = {
    "root/overlay": PodmanMode("overlay", rootless=False),
    "root/vfs": PodmanMode("vfs", rootless=False),
    "rootless/overlay": PodmanMode("overlay", rootless=True),
    "rootless/fuse-overlayfs": PodmanMode("overlay", rootless=True, mount_program=FUSE_OVERLAYFS),
}
DEFAULT_PODMAN_MODES = ["root/overlay", "rootless/overlay", "rootless/fuse-overlayfs"]
QUICK_PODMAN_MODES = ["root/overlay"]

# Dockerfiles built by every contestant.
DOCKERFILES = {
    "small": textwrap.dedent("""\
        FROM {base}
        ENV GREETING=hello
        WORKDIR /app
        COPY hello.txt /app/
        RUN echo "$GREETING" > /app/out.txt && cat /app/hello.txt >> /app/out.txt
        CMD ["cat", "/app/out.txt"]
        """),
    "files": textwrap.dedent("""\
        FROM {base}
        COPY tree/ /srv/tree/
        COPY blob.bin /srv/blob.bin
        RUN mkdir -p /data && i=0; while [ $i -lt {n_files} ]; do echo $i > /data/f$i; i=$((i+1)); done
        RUN rm -f /bin/vi && chmod 0700 /data && ls -R /srv/tree | wc -l > /srv/count
        RUN echo done > /srv/done
        CMD ["cat", "/srv/done"]
        """),
}
STORE_REF = "localhost/bench-store:latest"


@dataclass
class Sizes:
    """How big the build contexts are; --quick makes them tiny."""

    n_files: int = 500
    blob_bytes: int = 16 << 20

    @classmethod
    def quick(cls) -> Sizes:
        return cls(n_files=20, blob_bytes=64 << 10)


@dataclass
class Contestant:
    """One system under test: a lamina CLI or a podman environment, with what it cannot do."""

    label: str
    lamina: LaminaCli | None = None
    podman: PodmanEnv | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # verb -> note
    broken: str | None = None  # set-up failed: every cell says so

    @property
    def kind(self) -> str:
        return "lamina" if self.lamina is not None else "podman"

    @property
    def base_ref(self) -> str:
        return LAMINA_BASE_REF if self.lamina is not None else PODMAN_BASE_REF

    @property
    def rootless(self) -> bool:
        if self.podman is not None:
            return self.podman.rootless
        return self.lamina is not None and self.lamina.user is not None

    def command(self, args: list[str], *, timeout: float = 900) -> float:
        if self.lamina is not None:
            elapsed, _ = self.lamina.run(args, timeout=timeout)
            return elapsed
        assert self.podman is not None
        elapsed, _ = timed(self.podman.argv(args), env=self.podman.environment(), timeout=timeout,
                           stdin=subprocess.DEVNULL, **_user_kwargs(self.podman))
        return elapsed

    def note_for(self, verbs: tuple[str, ...]) -> str | None:
        if self.broken:
            return self.broken
        for verb in verbs:
            if verb in self.unavailable:
                return self.unavailable[verb]
        return None


def _user_kwargs(podman: PodmanEnv) -> dict[str, Any]:
    if podman.rootless and podman.user is not None:
        return {"user": podman.user.uid, "group": podman.user.gid, "extra_groups": []}
    return {}


def make_busybox_tarball(dest: Path) -> Path:
    """A busybox-static root (busybox + applet links, passwd, group, tmp) as an uncompressed tar."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(prefix="bb-root-") as scratch:
        root = Path(scratch)
        for directory in ("bin", "etc", "tmp", "root", "proc", "dev", "sys"):
            (root / directory).mkdir()
        (root / "tmp").chmod(0o1777)
        shutil.copy2(busybox, root / "bin" / "busybox")
        # Installing from inside the root makes the links point at /bin/busybox, not the host path.
        subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        with tarfile.open(dest, "w") as tar:
            for entry in sorted(root.iterdir()):
                tar.add(entry, arcname=entry.name)
    dest.chmod(0o644)
    return dest


ENSURE_BASE = ("import sys; from pathlib import Path; from lamina.store import Store; "
               "from lamina.store.base import ensure_default_base; ensure_default_base(Store.open(Path(sys.argv[1])))")


def base_tarball(workdir: Path) -> tuple[Path, str]:
    """The base rootfs tarball podman imports, and where it came from.

    It is the very layer of lamina's embedded base (``store.base.ensure_default_base``), so both
    sides start from identical files; before the store lands, a busybox root made here instead.
    """
    dest = workdir / "base.tar"
    try:
        store_module = importlib.import_module("lamina.store")
        base_module = importlib.import_module("lamina.store.base")
    except ImportError:
        return make_busybox_tarball(dest), "bench: busybox-static root (store.base not available)"
    store = store_module.Store.open(workdir / "base-store")
    image = base_module.ensure_default_base(store)
    (layer,) = image.layers
    blob = store.blob_path(layer.digest)
    with (gzip.open(blob, "rb") if _is_gzip(blob) else open(blob, "rb")) as source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    dest.chmod(0o644)
    return dest, f"the layer of lamina's embedded base {LAMINA_BASE_REF} ({layer.diff_id[:19]})"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def write_contexts(workdir: Path, sizes: Sizes, seed: int = 20261127) -> dict[str, Path]:
    """One build context per Dockerfile, readable by every user.

    Each holds ``Dockerfile.lamina`` and ``Dockerfile.podman``: the same text but for the base
    image's name in each store.
    """
    rng = random.Random(seed)
    contexts = {}
    for name, text in DOCKERFILES.items():
        context = workdir / "contexts" / name
        context.mkdir(parents=True)
        for kind, base in (("lamina", LAMINA_BASE_REF), ("podman", PODMAN_BASE_REF)):
            (context / f"Dockerfile.{kind}").write_text(text.format(base=base, n_files=sizes.n_files))
        contexts[name] = context
    (contexts["small"] / "hello.txt").write_text("hello from the build context\n")
    tree = contexts["files"] / "tree"
    for index in range(sizes.n_files):
        path = tree / f"d{index % 10}" / f"file{index:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(100, 4000)))
    (contexts["files"] / "blob.bin").write_bytes(rng.randbytes(sizes.blob_bytes))
    # Only the contexts, and never through a symlink (chmod follows them: a base layer's
    # bin/sh -> /bin/busybox would change the host's busybox).
    top = workdir / "contexts"
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return contexts


@contextlib.contextmanager
def open_contestants(workdir: Path, podman_modes: list[str], lamina_modes: list[str],
                     base_tar: Path) -> Iterator[list[Contestant]]:
    """Every contestant set up with the base in its store; torn down after."""
    with contextlib.ExitStack() as stack:
        contestants: list[Contestant] = []
        user = None
        if any(m == "rootless" for m in lamina_modes) or any(PODMAN_MODES[m].rootless for m in podman_modes):
            try:
                user = ensure_bench_user()
            except (PodmanUnavailable, subprocess.CalledProcessError) as exc:
                log.warning("no unprivileged user for rootless benchmarks: %s", exc)
        for mode in lamina_modes:
            contestant = Contestant(LAMINA if mode == "root" else f"{LAMINA} rootless")
            contestants.append(contestant)
            if mode == "rootless" and user is None:
                contestant.broken = f"{NOT_AVAILABLE}: no unprivileged user"
                continue
            cli = LaminaCli(workdir / f"lamina-{mode}", user if mode == "rootless" else None)
            contestant.lamina = cli
            for verb in ("build", "run", "import", "save", "load", "rmi"):
                note = cli.missing(verb)
                if note:
                    contestant.unavailable[verb] = note
            ensured = subprocess.run([sys.executable, "-c", ENSURE_BASE, str(cli.root)], capture_output=True,
                                     text=True, timeout=300, **cli.subprocess_kwargs())
            if ensured.returncode != 0:
                last = (ensured.stderr.strip().splitlines() or ["?"])[-1]
                contestant.broken = f"{NOT_AVAILABLE}: store.base.ensure_default_base: {last[:200]}"
        for mode in podman_modes:
            spec = PODMAN_MODES[mode]
            contestant = Contestant(f"podman {mode}")
            contestants.append(contestant)
            if spec.rootless and user is None:
                contestant.broken = f"{NOT_AVAILABLE}: no unprivileged user"
                continue
            try:
                podman = stack.enter_context(open_podman_env(
                    storage_driver=spec.storage_driver, user=user if spec.rootless else None,
                    mount_program=spec.mount_program, parent=workdir))
            except PodmanUnavailable as exc:
                contestant.broken = f"{NOT_AVAILABLE}: {exc}"
                continue
            contestant.podman = podman
            done = podman.run(["import", str(base_tar), PODMAN_BASE_REF], check=False, timeout=300)
            if done.returncode != 0:
                contestant.broken = f"failed: podman import: {done.stderr.decode(errors='replace').strip()[-300:]}"
        yield contestants


def _rotated(items: list[Contestant], shift: int) -> list[Contestant]:
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


def _measure(row: Row, contestant: Contestant, verbs: tuple[str, ...], action: Callable[[], float]) -> None:
    note = contestant.note_for(verbs)
    if note:
        row.note(contestant.label, note)
        return
    try:
        row.add(contestant.label, action())
    except (CommandFailed, subprocess.TimeoutExpired, OSError) as exc:
        log.warning("%s: %s: %s", row.label, contestant.label, exc)
        row.note(contestant.label, f"failed: {str(exc)[:300]}")


def _build_args(context: Path, tag: str, *, cold: bool, kind: str) -> list[str]:
    args = ["build", "-t", tag, "-f", str(context / f"Dockerfile.{kind}")]
    if cold:
        args.append("--no-cache")
    if kind == "podman":
        args += ["--format", "docker"]  # the history and config lamina writes, too
    return [*args, str(context)]


def run_container_suites(*, quick: bool, reps: int, podman_modes: list[str], lamina_modes: list[str],
                         suites: set[str]) -> list[SuiteResult]:
    """Run the build, run and store suites (those named in ``suites``) with every contestant."""
    sizes = Sizes.quick() if quick else Sizes()
    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    try:
        base_tar, base_origin = base_tarball(workdir)
        contexts = write_contexts(workdir, sizes)
        store_tar = make_store_tarball(base_tar, contexts["files"], workdir / "store.tar")
        store_mib = store_tar.stat().st_size / (1 << 20)
        with open_contestants(workdir, podman_modes, lamina_modes, base_tar) as contestants:
            systems = [c.label for c in contestants]
            details: dict[str, Any] = {
                "base": base_origin, "base_ref": {"lamina": LAMINA_BASE_REF, "podman": PODMAN_BASE_REF},
                "sizes": sizes.__dict__,
                "dockerfiles": {n: (contexts[n] / "Dockerfile.lamina").read_text() for n in contexts},
                       "commands": {c.label: (c.podman.argv(["..."]) if c.podman else c.lamina.argv(["..."])
                                              if c.lamina else None) for c in contestants}}
            results = []
            build_rows = {(name, cold): Row("build", f"{name}_{'cold' if cold else 'cached'}",
                                            f"build `{name}`, {'cold (--no-cache)' if cold else 'cached rebuild'}")
                          for name in DOCKERFILES for cold in (True, False)}
            run_rows = {net: Row("run", f"run_{net}", f"run --rm BASE true, network {net}")
                        for net in ("default", "none")}
            # The floor under every command: the interpreter and imports (lamina), the Go binary (podman).
            version_row = Row("run", "version", "--version (command start-up floor)")
            store_rows = {
                "import": Row("store", "import", f"import a {store_mib:.0f} MiB rootfs tarball (after rmi)"),
                "save": Row("store", "save", "save -o FILE (docker-archive) of that image"),
                "load": Row("store", "load", "load -i FILE (after rmi)"),
            }
            for rep in range(reps):
                log.info("containers: repetition %d/%d", rep + 1, reps)
                shift = rep
                if "build" in suites:
                    for name, context in contexts.items():
                        for contestant in _rotated(contestants, shift):
                            shift += 1
                            tag = f"localhost/bench-{name}:latest"
                            for cold in (True, False):
                                build = functools.partial(contestant.command, timeout=1800,
                                                          args=_build_args(context, tag, cold=cold, kind=contestant.kind))
                                _measure(build_rows[(name, cold)], contestant, ("build",), build)
                if "run" in suites:
                    for contestant in _rotated(contestants, shift):
                        shift += 1
                        _measure(version_row, contestant, (),
                                 functools.partial(contestant.command, ["--version"], timeout=60))
                    for net, extra in (("default", []), ("none", ["--network", "none"])):
                        for contestant in _rotated(contestants, shift):
                            shift += 1
                            run = functools.partial(contestant.command, ["run", "--rm", *extra, contestant.base_ref, "true"],
                                                    timeout=300)
                            _measure(run_rows[net], contestant, ("run",), run)
                if "store" in suites:
                    for contestant in _rotated(contestants, shift):
                        shift += 1
                        _store_round(contestant, store_tar, workdir, rows=store_rows, details=details)
            if "build" in suites:
                results.append(SuiteResult("build", systems, list(build_rows.values()), details=details))
            if "run" in suites:
                results.append(SuiteResult("run", systems, [*run_rows.values(), version_row], details=details))
            if "store" in suites:
                results.append(SuiteResult("store", systems, list(store_rows.values()), details=details))
            return results
    finally:
        _remove_tree(workdir)


def make_store_tarball(base_tar: Path, files_context: Path, dest: Path) -> Path:
    """The base rootfs plus the "files" context under /srv: the image the store suite moves around."""
    with tarfile.open(base_tar) as base, tarfile.open(dest, "w") as out:
        for member in base:
            out.addfile(member, base.extractfile(member) if member.isfile() else None)
        out.add(files_context / "tree", arcname="srv/tree")
        out.add(files_context / "blob.bin", arcname="srv/blob.bin")
    dest.chmod(0o644)
    return dest


def _store_round(contestant: Contestant, store_tar: Path, workdir: Path, *, rows: dict[str, Row],
                 details: dict[str, Any]) -> None:
    """import, save and load one image with one contestant; the untimed rmi in between empties the store."""
    ref = STORE_REF
    archive = workdir / "archives" / f"{contestant.label.replace(' ', '_').replace('/', '_')}.tar"
    archive.parent.mkdir(exist_ok=True)
    archive.parent.chmod(0o777)
    with contextlib.suppress(FileNotFoundError):
        archive.unlink()

    def forget() -> None:
        if contestant.note_for(("rmi",)) is None:
            with contextlib.suppress(CommandFailed):
                contestant.command(["rmi", "-f", ref], timeout=300)

    forget()
    _measure(rows["import"], contestant, ("import",),
             functools.partial(contestant.command, ["import", str(store_tar), ref], timeout=900))
    if not rows["import"].samples.get(contestant.label):
        for key in ("save", "load"):
            rows[key].note(contestant.label, rows["import"].notes.get(contestant.label, "failed: no image"))
        return
    _measure(rows["save"], contestant, ("save",),
             functools.partial(contestant.command, ["save", "-o", str(archive), "--format", "docker-archive", ref]))
    if not archive.exists():
        rows["load"].note(contestant.label, rows["save"].notes.get(contestant.label, "failed: no archive"))
        return
    details.setdefault("archive_bytes", {})[contestant.label] = archive.stat().st_size
    forget()
    _measure(rows["load"], contestant, ("load", "rmi"),
             functools.partial(contestant.command, ["load", "-i", str(archive)], timeout=900))


def _remove_tree(path: Path) -> None:
    """Remove a benchmark tree, including read-only directories a container left behind."""
    def make_writable(function: Any, target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o755)  # a directory we made or a container made in it
            if not os.path.islink(target):  # chmod follows symlinks: never touch what one points to
                os.chmod(target, 0o755)
        with contextlib.suppress(OSError):
            function(target)
    shutil.rmtree(path, onerror=make_writable)
