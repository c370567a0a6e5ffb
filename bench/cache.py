"""``python -m bench.cache``: a build cache shared by two CI runners through a registry (issue 20).

A Dockerfile whose RUN steps take more than 20 s cold (sleeps that stand for compilers, and file
writes) is built on one runner, its cache exported to Debian's Distribution registry on 127.0.0.1,
and built again on a second runner whose store is empty, with ``--cache-from``. Each runner is a
fresh store; the base image comes from the registry too, as on a fresh CI machine. Per repetition:

- lamina: a cold build; the export (the same build again with ``--cache-to``: every step is a local
  hit, so this is the upload); the rebuild on an empty store with ``--cache-from``; the same after
  changing one COPY'd file; and ``lamina pull`` of the built image into an empty store, which is the
  transfer the rebuild cannot avoid (every layer, downloaded and unpacked).
- podman (root, overlay), the competitor: a cold build with ``--layers --cache-to`` (podman pushes
  its cache while it builds, so cold and export are one figure), the rebuild on an empty store with
  ``--cache-from``, and the same after the change.

The issue's target: the rebuild from the cache takes at most 10 % of the cold build plus the
transfer, every step CACHED and the image identical. Results go to
``bench/results/<stamp>-cache.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    LAMINA,
    NOT_AVAILABLE,
    REPO_ROOT,
    Row,
    SuiteResult,
    machine_stamp,
    markdown_table,
    timed,
)
from bench.lamina_cli import LaminaCli
from bench.podman_env import PodmanEnv, PodmanUnavailable, open_podman_env

log = logging.getLogger("bench.cache")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PODMAN = "podman root/overlay"

DOCKERFILE = """\
FROM {base}
WORKDIR /app
COPY deps.txt ./
RUN sleep {pause} && {fill_deps}
COPY src/ src/
RUN sleep {pause} && {fill_build} && cat src/* > built.txt
RUN sleep {pause} && echo tested > tested.txt
CMD ["cat", "/app/built.txt"]
"""
RUN_STEPS = 3
# What two RUN steps write, about MIB MiB each: random bytes (nothing to compress), or copies of
# the busybox executable (compiler output: gzip halves it).
FILLS = {"random": "dd if=/dev/urandom of={out} bs=1M count={mib} 2>/dev/null",
         "binary": "for i in $(seq {copies}); do cat /bin/busybox; done > {out}"}


def write_context(path: Path, pause: float, mib: int, base: str, data: str = "random") -> Path:
    (path / "src").mkdir(parents=True)
    copies = max(1, round(mib * (1 << 20) / 1_982_256))  # busybox-static 1.35's size

    def fill(out: str) -> str:
        return FILLS[data].format(out=out, mib=mib, copies=copies)

    (path / "Dockerfile").write_text(DOCKERFILE.format(base=base, pause=pause, fill_deps=fill("deps.bin"),
                                                       fill_build=fill("build.bin")))
    (path / "deps.txt").write_text("dependency list\n")
    for n in range(20):
        (path / "src" / f"module{n:02d}.txt").write_text(f"module {n}\n" * 100)
    return path


def step_outcomes(output: str) -> list[str]:
    """``CACHED`` or what else each step but FROM printed after its ``-->``."""
    outcomes, current = [], False
    for line in output.splitlines():
        if m := re.match(r"STEP \d+/\d+: (.*)", line):
            current = not m.group(1).startswith("FROM")
        elif current and line.startswith("--> "):
            outcomes.append(line[4:])
            current = False
    return outcomes


@contextlib.contextmanager
def registry(tmp: Path) -> Iterator[str]:
    # The tests' fixture already starts and stops Distribution on 127.0.0.1 with a fresh storage.
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    try:
        from registry_server import run_registry
    finally:
        sys.path.remove(str(REPO_ROOT / "tests"))
    with run_registry(tmp / "registry") as running:
        yield running.address


def cache_layer_bytes(cache: str, runner: LaminaRunner) -> tuple[int, int]:
    """The bytes of the cache's layer blobs in the registry, and of the same layers as the plain
    tars the exporting store keeps."""
    from lamina.store import Reference, Store
    from lamina.store.registry import RegistryClient

    ref = Reference.parse(cache)
    with RegistryClient(ref.registry, tls_verify=False) as client:
        manifest = json.loads(client.get_manifest(ref.repository, ref.tag or "latest").data)
    store = Store.open(runner.cli.root)
    layers = manifest["layers"]
    return (sum(layer["size"] for layer in layers),
            sum(store.blobs.size(layer["annotations"]["containerd.io/uncompressed"]) for layer in layers))


class LaminaRunner:
    def __init__(self, tmp: Path, name: str) -> None:
        self.cli = LaminaCli(tmp / name)

    def run(self, *args: str) -> tuple[float, str]:
        seconds, done = self.cli.run(args, timeout=1800)
        return seconds, done.stdout.decode(errors="replace")

    def image_id(self, ref: str) -> str:
        _seconds, out = self.run("images", "-q", "--no-trunc", ref)
        return out.strip().removeprefix("sha256:")


def lamina_round(tmp: Path, reg: str, base: str, rep: int, rows: dict[str, Row], details: dict[str, Any],
                 pause: float, mib: int) -> None:
    cache = f"{reg}/bench/app:cache-{rep}"
    image = f"{reg}/bench/app:built-{rep}"
    ctx = write_context(tmp / f"ctx-{rep}", pause, mib, base, details["data"])
    first = LaminaRunner(tmp, f"lamina-1-{rep}")
    seconds, out = first.run("build", "-t", image, str(ctx))
    rows["cold"].add(LAMINA, seconds)
    seconds, out = first.run("build", "-t", image, "--cache-to", f"type=registry,ref={cache}", str(ctx))
    rows["export"].add(LAMINA, seconds)
    sent, plain = cache_layer_bytes(cache, first)
    details.setdefault("lamina_cache_layer_bytes", []).append(sent)
    details.setdefault("lamina_cache_plain_layer_bytes", []).append(plain)
    first.run("push", image)
    seconds, _ = LaminaRunner(tmp, f"lamina-pull-{rep}").run("pull", image)
    rows["transfer"].add(LAMINA, seconds)

    second = LaminaRunner(tmp, f"lamina-2-{rep}")
    seconds, out = second.run("build", "-t", "app", "--cache-from", cache, str(ctx))
    rows["warm"].add(LAMINA, seconds)
    outcomes = step_outcomes(out)
    details.setdefault("lamina_warm_all_cached", []).append(set(outcomes) == {"CACHED"})
    details.setdefault("lamina_same_image", []).append(second.image_id("app") == first.image_id(image))

    (ctx / "src" / "module07.txt").write_text("changed\n")
    seconds, out = LaminaRunner(tmp, f"lamina-3-{rep}").run("build", "-t", "app", "--cache-from", cache, str(ctx))
    rows["changed"].add(LAMINA, seconds)
    details.setdefault("lamina_changed_steps_run", []).append(sum(o != "CACHED" for o in step_outcomes(out)))
    for name in (f"lamina-1-{rep}", f"lamina-2-{rep}", f"lamina-3-{rep}", f"lamina-pull-{rep}"):
        shutil.rmtree(tmp / name, ignore_errors=True)


def podman_round(tmp: Path, reg: str, base: str, rep: int, rows: dict[str, Row], details: dict[str, Any],
                 pause: float, mib: int) -> None:
    cache = f"{reg}/bench/podman-cache-{rep}"
    ctx = write_context(tmp / f"pctx-{rep}", pause, mib, base, details["data"])
    flags = ["--layers", "--tls-verify=false", "--format", "oci"]

    def build(env: PodmanEnv, *extra: str) -> tuple[float, str]:
        seconds, done = timed(env.argv(["build", *flags, *extra, "-t", "app", str(ctx)]), env=env.environment(),
                              timeout=1800)
        return seconds, done.stdout.decode(errors="replace")

    with open_podman_env(storage_driver="overlay", parent=tmp) as env:
        seconds, _ = build(env, "--cache-to", cache)
        rows["cold_export"].add(PODMAN, seconds)
    with open_podman_env(storage_driver="overlay", parent=tmp) as env:
        seconds, out = build(env, "--cache-from", cache)
        rows["warm"].add(PODMAN, seconds)
        details.setdefault("podman_warm_cache_hits", []).append(out.count("Using cache"))
    (ctx / "src" / "module07.txt").write_text("changed\n")
    with open_podman_env(storage_driver="overlay", parent=tmp) as env:
        seconds, out = build(env, "--cache-from", cache)
        rows["changed"].add(PODMAN, seconds)


def run_cache_suite(reps: int, pause: float, mib: int, podman: bool, workdir: Path | None,
                    data: str = "random") -> SuiteResult:
    rows = {
        "cold": Row("cache", "cold", f"cold build, empty store ({RUN_STEPS} RUN steps of {pause:g} s)"),
        "export": Row("cache", "export", "export: the same build with --cache-to (all steps local hits)"),
        "cold_export": Row("cache", "cold_export", "cold build with --cache-to (podman: one command)"),
        "transfer": Row("cache", "transfer", "transfer: pull of the built image into an empty store"),
        "warm": Row("cache", "warm", "second runner, empty store, --cache-from"),
        "changed": Row("cache", "changed", "second runner, one COPY'd file changed, --cache-from"),
    }
    systems = [LAMINA] + ([PODMAN] if podman else [])
    details: dict[str, Any] = {"pause_s": pause, "mib_per_run_step": mib, "data": data}
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        with registry(tmp) as reg:
            seed = LaminaCli(tmp / "seed")
            base = f"{reg}/bench/busybox:1"
            seed.run(["tag", "lamina/busybox", base], timeout=600)  # the store makes its base on first use
            seed.run(["push", base], timeout=600)
            for rep in range(reps):
                log.info("repetition %d/%d", rep + 1, reps)
                lamina_round(tmp, reg, base, rep, rows, details, pause, mib)
                if podman:
                    try:
                        podman_round(tmp, reg, base, rep, rows, details, pause, mib)
                    except (PodmanUnavailable, OSError, RuntimeError) as e:
                        for key in ("cold_export", "warm", "changed"):
                            rows[key].note(PODMAN, f"{NOT_AVAILABLE}: {e}"[:300])
                        podman = False
    # lamina's cold build and export were measured apart; their sum is the figure podman gives.
    for cold, export in zip(rows["cold"].samples.get(LAMINA, []), rows["export"].samples.get(LAMINA, []),
                            strict=True):
        rows["cold_export"].add(LAMINA, cold + export)
    rows["cold_export"].note(LAMINA, "lamina: the sum of the cold and export rows, measured apart")
    return SuiteResult("cache", systems, list(rows.values()), details)


def target_verdict(suite: SuiteResult) -> dict[str, Any]:
    cold, warm, transfer = (suite.row(k).median(LAMINA) for k in ("cold", "warm", "transfer"))  # type: ignore[union-attr]
    if cold is None or warm is None or transfer is None:
        return {"target": "warm <= 10% cold + transfer", "verdict": "not measured"}
    limit = 0.10 * cold + transfer
    all_cached = all(suite.details.get("lamina_warm_all_cached", [False]))
    same = all(suite.details.get("lamina_same_image", [False]))
    return {"target": "rebuild on an empty store with --cache-from <= 10 % of cold + transfer, every step "
                      "CACHED, identical image",
            "measured": f"{warm:.2f} s against {limit:.2f} s (cold {cold:.1f} s, transfer {transfer:.2f} s); "
                        f"all CACHED: {all_cached}; same image: {same}",
            "verdict": "met" if warm <= limit and all_cached and same else "NOT met"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pause", type=float, default=7.0, help="seconds each RUN step sleeps (3 of them)")
    parser.add_argument("--mib", type=int, default=8, help="MiB of data two RUN steps write")
    parser.add_argument("--data", choices=sorted(FILLS), default="random",
                        help="what they write: random bytes (default) or copies of an executable")
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="result prefix (default bench/results/<stamp>-cache)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bench: %(levelname)s: %(message)s", stream=sys.stderr)
    started = dt.datetime.now(dt.UTC)
    stamp = machine_stamp()
    stamp["started"] = started.strftime("%Y-%m-%d %H:%M UTC")
    suite = run_cache_suite(args.reps, args.pause, args.mib, not args.no_podman, args.workdir, args.data)
    verdict = target_verdict(suite)
    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%d-%H%M')}-cache"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"stamp": stamp, "suite": suite.name, "rows": [r.to_json() for r in suite.rows],
                "details": suite.details, "target": verdict}
    out.with_suffix(".json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    text = "\n".join([
        f"# build cache through a registry, {stamp['started']}", "",
        f"commit `{stamp['commit'][:12]}`{' (uncommitted changes)' if stamp['tree_dirty'] else ''}, kernel "
        f"{stamp['kernel']}, {stamp['cpus']} x {stamp['cpu']}, load {' '.join(stamp['loadavg'])} at start; "
        f"{stamp['podman']}; medians of {args.reps} repetitions.", "",
        markdown_table(suite), "",
        f"details: {json.dumps(suite.details, sort_keys=True)}", "",
        f"target: {verdict['target']}: {verdict.get('measured', '')} — **{verdict['verdict']}**", ""])
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
