"""``python -m bench.transfer``: a big image pushed to and pulled from a local registry (issue 15).

lamina against podman (its ``push`` and ``pull``) and skopeo (``skopeo copy``, the tool made for
registry transfers), interleaved, all as the same unprivileged user. The image is the layers
suite's rootfs tarball (:func:`bench.layers.make_big_tarball`: the base, one file of random bytes
and many small files) imported as one layer. Every contestant pushes into a Distribution registry
started empty for it (Debian's ``docker-registry`` on 127.0.0.1, as the tests start it), so no
blob is ever already there or mounted from another repository. Per repetition and contestant,
in rotated order:

- untimed: import the tarball (lamina, podman; skopeo copies from the docker-archive lamina saved
  of it once) and start the registry;
- **push**: ``lamina push`` / ``podman push --tls-verify=false`` / ``skopeo copy
  docker-archive:FILE docker://...`` (each compresses with gzip, as it would by default);
- untimed: remove the image (and prune, so the layer goes too);
- **pull**: ``lamina pull`` / ``podman pull`` (both unpack into their store) / ``skopeo copy
  docker://... oci:DIR`` (which only downloads: the floor of what a pull can cost).

Peak RSS (``ru_maxrss`` of the process tree, from ``wait4``) of each command is kept, as in the
layers suite. Writes ``bench/results/<stamp>-transfer.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cache import registry
from bench.common import LAMINA, REPO_ROOT, CommandFailed, Row, SuiteResult, machine_stamp, markdown_table
from bench.containers import _remove_tree, _rotated, base_tarball, open_contestants
from bench.layers import LayerSizes, make_big_tarball, measure_argv, run_measured, spread_markdown
from bench.podman_env import PodmanUser

log = logging.getLogger(__name__)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SKOPEO = "skopeo"


class _Skopeo:
    """skopeo run as the bench user, with its own temporary directory."""

    def __init__(self, user: PodmanUser, workdir: Path) -> None:
        self.user = user
        self.tmp = workdir / "skopeo-tmp"
        self.tmp.mkdir(mode=0o700)
        (self.tmp / "auth.json").write_text('{"auths": {}}\n')
        for path in (self.tmp, self.tmp / "auth.json"):
            os.chown(path, user.uid, user.gid)

    def kwargs(self) -> dict[str, Any]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.tmp), "TMPDIR": str(self.tmp),
               "XDG_RUNTIME_DIR": str(self.tmp), "REGISTRY_AUTH_FILE": str(self.tmp / "auth.json")}
        return {"env": env, "user": self.user.uid, "group": self.user.gid, "extra_groups": []}


def _timed(row: Row, label: str, measure: Any, rss: dict[str, Any]) -> bool:
    try:
        seconds, peak_kib = measure()
    except (CommandFailed, subprocess.TimeoutExpired, OSError) as exc:
        log.warning("%s: %s: %s", row.label, label, exc)
        row.note(label, f"failed: {str(exc)[:300]}")
        return False
    row.add(label, seconds)
    rss.setdefault(row.key, {}).setdefault(label, []).append(peak_kib // 1024)
    return True


def run_transfer_suite(*, mib: int, files: int, reps: int) -> SuiteResult:
    """Push and pull the big image with lamina, podman and skopeo, interleaved."""
    sizes = LayerSizes(mib=mib, files=files)
    workdir = Path(tempfile.mkdtemp(prefix="lamina-bench-transfer-", dir="/var/tmp"))
    workdir.chmod(0o755)
    try:
        base_tar, _origin = base_tarball(workdir)
        big_tar = make_big_tarball(base_tar, sizes, workdir / "big.tar")
        tar_mib = big_tar.stat().st_size >> 20
        rows = {"push": Row("transfer", "push", f"push a {tar_mib} MiB image to an empty local registry"),
                "pull": Row("transfer", "pull", "pull it into a store that lacks it")}
        rss: dict[str, Any] = {}
        with open_contestants(workdir, ["rootless/fuse-overlayfs"], ["rootless"], base_tar) as contestants:
            lamina = next(c for c in contestants if c.lamina is not None)
            assert lamina.lamina is not None and lamina.lamina.user is not None
            skopeo = _Skopeo(lamina.lamina.user, workdir)
            archive = skopeo.tmp / "big-docker.tar"  # a directory the user may write in
            lamina.command(["import", str(big_tar), "localhost/bench-transfer:src"], timeout=1800)
            lamina.command(["save", "-o", str(archive), "localhost/bench-transfer:src"], timeout=1800)
            lamina.command(["rmi", "localhost/bench-transfer:src"])
            order = [*contestants, None]  # None: skopeo
            for rep in range(reps):
                log.info("transfer: repetition %d/%d", rep + 1, reps)
                for contestant in _rotated(order, rep):  # type: ignore[arg-type]
                    label = contestant.label if contestant is not None else SKOPEO
                    with registry(workdir / f"{rep}-{label.replace(' ', '_').replace('/', '_')}") as reg:
                        ref = f"{reg}/bench/big:{rep}"
                        if contestant is None:
                            _skopeo_round(skopeo, archive, ref, workdir / f"oci-{rep}", rows, rss)
                        else:
                            _store_round(contestant, big_tar, ref, rows, rss)
            systems = [c.label for c in contestants] + [SKOPEO]
        details = {"sizes": sizes.__dict__, "peak_rss_mib": rss, "image_tar_bytes": big_tar.stat().st_size}
        return SuiteResult("transfer", systems, list(rows.values()), details=details)
    finally:
        _remove_tree(workdir)


def _store_round(contestant: Any, big_tar: Path, ref: str, rows: dict[str, Row], rss: dict[str, Any]) -> None:
    tls = [] if contestant.lamina is not None else ["--tls-verify=false"]
    contestant.command(["import", str(big_tar), ref], timeout=1800)
    try:
        if not _timed(rows["push"], contestant.label,
                      lambda: run_measured(contestant, ["push", *tls, ref]), rss):
            return
        _forget(contestant, ref)
        _timed(rows["pull"], contestant.label, lambda: run_measured(contestant, ["pull", *tls, ref]), rss)
    finally:
        _forget(contestant, ref)


def _forget(contestant: Any, ref: str) -> None:
    with contextlib.suppress(CommandFailed, subprocess.TimeoutExpired):
        contestant.command(["rmi", "-f", ref], timeout=300)
    with contextlib.suppress(CommandFailed, subprocess.TimeoutExpired):
        contestant.command(["image", "prune", "-f"] if contestant.podman else ["system", "prune", "-f"],
                           timeout=300)


def _skopeo_round(skopeo: _Skopeo, archive: Path, ref: str, oci_dir: Path, rows: dict[str, Row],
                  rss: dict[str, Any]) -> None:
    push = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false", f"docker-archive:{archive}", f"docker://{ref}"]
    if not _timed(rows["push"], SKOPEO, lambda: measure_argv(push, skopeo.kwargs()), rss):
        return
    oci_dir.mkdir()
    os.chown(oci_dir, skopeo.user.uid, skopeo.user.gid)
    pull = [SKOPEO, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci_dir}:latest"]
    try:
        _timed(rows["pull"], SKOPEO, lambda: measure_argv(pull, skopeo.kwargs()), rss)
    finally:
        shutil.rmtree(oci_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mib", type=int, default=1024, help="MiB of random data in the image")
    parser.add_argument("--files", type=int, default=10_000, help="small files in the image")
    parser.add_argument("--out", type=Path, default=None, help="result prefix (default bench/results/<stamp>-transfer)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bench: %(levelname)s: %(message)s", stream=sys.stderr)
    started = dt.datetime.now(dt.UTC)
    stamp = machine_stamp()
    stamp["started"] = started.strftime("%Y-%m-%d %H:%M UTC")
    suite = run_transfer_suite(mib=args.mib, files=args.files, reps=args.reps)
    stamp["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%d-%H%M')}-transfer"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"stamp": stamp, "suite": suite.name, "rows": [r.to_json() for r in suite.rows],
                "details": suite.details}
    out.with_suffix(".json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    skopeo_ratios = [f"| {row.label} | {ratio:.2f} |" for row in suite.rows
                     if (ratio := row.ratio(f"{LAMINA} rootless", SKOPEO)) is not None]
    text = "\n".join([
        f"# push and pull of a big image, {stamp['started']}", "",
        f"commit `{stamp['commit'][:12]}`{' (uncommitted changes)' if stamp['tree_dirty'] else ''}, kernel "
        f"{stamp['kernel']}, {stamp['cpus']} x {stamp['cpu']}, load {' '.join(stamp['loadavg'])} at start, "
        f"{' '.join(stamp['loadavg_end'])} at end; {stamp['podman']}; medians of {args.reps} repetitions.", "",
        markdown_table(suite), "",
        "| workload | lamina rootless / skopeo |", "|---|---:|", *skopeo_ratios, "",
        spread_markdown(suite), ""])
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
