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

The pieces: ``fsops_lowers`` (generated layers), ``fsops_ops`` (operations, their choice, the tree
snapshot), ``fsops_mounts`` (the two kinds of mount, and the user-namespace worker), ``fsops_cases``
(hand-written cases); this module runs and compares them, and is the command line.

Run from the command line (as root)::

    unshare -m --propagation private .venv/bin/python tests/fsops.py --candidate lamina --seed 1 --ops 200
    ... --candidate lamina-userns --seed 7 --shrink          # minimal repro of a divergence
    ... --candidate lamina --case rename-dir-with-deleted-file
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsops_cases import CASES
from fsops_lowers import (
    _get_xattr,
    _is_whiteout,
    convert_to_oci_format,
    convert_to_user_xattrs,
    copy_layers,
    ensure_dangling_target_absent,
    generate_lowers,
)
from fsops_lowers import merged_kinds as merged_kinds
from fsops_mounts import Union, worker_main
from fsops_ops import (
    FALLOCATE_SWITCH,
    FUSE_FALLOCATE_MODES,
    INO_CHECKED_OPS,
    KERNEL_FALLOCATE_MODES,
    Result,
    _stable,
    _strip_stable,
    diff_trees,
    generate_op,
)
from fsops_ops import snapshot as snapshot
from harness import REPO_ROOT

# index=on (lamina's design, issue 3 item 7: files hardlinked in a lower layer are one inode while
# mounted): after copy-up of one name, every name shows the copy, as with the kernel's index dir.
# LAMINA_DIFF_KERNEL_OPTS=index=off compares with link-breaking copy-up (this kernel's default,
# fuse-overlayfs) instead.
KERNEL_ORACLE_OPTIONS = [o for o in os.environ.get("LAMINA_DIFF_KERNEL_OPTS", "index=on").split(",") if o]


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
    run = _Run.prepare(report, workdir, kernel_lowers, cand_lowers)
    with_fallocate = replay is None and fallocate_supported(candidate, workdir)
    report.outcomes[f"fallocate-ops:{'on' if with_fallocate else 'off'}"] = 1
    fallocate_modes = () if not with_fallocate else KERNEL_FALLOCATE_MODES if candidate == "kernel" \
        else FUSE_FALLOCATE_MODES
    try:
        run.mount(run.kernel, run.cand)
        if not (case or "").endswith("-cold"):
            run.compare_trees("initial")
        else:
            check_every = 10**9
        for i in range(nops if replay is None else len(replay)):
            if report.divergences:
                break
            op = generate_op(rng, str(run.kernel.mountpoint), userns, fallocate_modes) if replay is None \
                else replay[i]
            if not run.step(i, op):
                break
            if (i + 1) % check_every == 0:
                run.compare_trees(f"after op {i}")
        if not report.divergences:
            cinos_before, _ = run.compare_trees("end")
        if report.divergences:
            return report
        run.check_remount_and_upper(cinos_before)
        return report
    finally:
        run.unmount(*reversed(run.mounted))


@dataclass
class _Run:
    """The two mounts of one differential run (the kernel oracle and the candidate) and its report."""

    report: Report
    workdir: Path
    kernel_lowers: list[Path]
    cand_lowers: list[Path]
    kernel: Union
    cand: Union
    t0_ns: int
    mounted: list[Union] = field(default_factory=list)

    @classmethod
    def prepare(cls, report: Report, workdir: Path, kernel_lowers: list[Path], cand_lowers: list[Path]) -> _Run:
        candidate = report.candidate
        for d in ("k-upper", "k-work", "c-upper", "c-work", "x-work"):
            (workdir / d).mkdir()
        kernel = Union("kernel", kernel_lowers, workdir / "k-upper", workdir / "k-work", workdir / "k-mnt",
                       workdir / "k.log", extra=KERNEL_ORACLE_OPTIONS)
        cand = Union(candidate, cand_lowers, workdir / "c-upper", workdir / "c-work", workdir / "c-mnt",
                     workdir / "c.log", extra=KERNEL_ORACLE_OPTIONS if candidate == "kernel" else [])
        t0_ns = time.time_ns() - 1_000_000_000
        kernel.t0_ns = cand.t0_ns = t0_ns
        kernel.in_userns = candidate == "lamina-userns"
        return cls(report, workdir, kernel_lowers, cand_lowers, kernel, cand, t0_ns)

    @property
    def candidate(self) -> str:
        return self.report.candidate

    def mount(self, *unions: Union) -> None:
        for u in unions:
            u.mount()
            self.mounted.append(u)

    def unmount(self, *unions: Union) -> None:
        for u in unions:
            u.unmount()
            self.mounted.remove(u)

    def compare_trees(self, stage: str) -> tuple[dict[str, int], dict[str, Result]]:
        ktree, _, _ = self.kernel.snap()
        ctree, cinos, problems = self.cand.snap()
        for line in diff_trees(ktree, ctree, "kernel", self.candidate):
            self.report.divergences.append(f"{stage}: tree: {line}")
        for line in problems:
            self.report.divergences.append(f"{stage}: {self.candidate} invariant: {line}")
        return cinos, ctree

    def step(self, i: int, op: list[Any]) -> bool:
        """Run operation ``i`` on both sides; False (and a divergence noted) when they disagree."""
        report, kernel, cand, candidate = self.report, self.kernel, self.cand, self.candidate
        report.ops.append(op)
        refusable = kernel.in_userns and op[0] in REFUSED_RENAME_OPS
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
                return False
        if kres != cres:
            report.divergences.append(f"op {i} {op_text(op)}: kernel={kres} {candidate}={cres}")
            return False
        if refusable and kres == ["err", "ENOTEMPTY"] and \
                _undo_refused_rename_stamp(kernel, cand, os.path.dirname(op[1]), parent_before):
            report.outcomes["undone:ext4-stamp"] = report.outcomes.get("undone:ext4-stamp", 0) + 1
        return True

    def check_remount_and_upper(self, cinos_before: dict[str, int]) -> None:
        """Both remounted: the candidate's inode numbers stay; then its upper, mounted by the kernel,
        must show the candidate's tree."""
        kernel, cand, candidate, workdir = self.kernel, self.cand, self.candidate, self.workdir
        self.unmount(cand, kernel)
        self.mount(kernel, cand)
        cinos_after, ctree_after = self.compare_trees("after remount")
        moved = [r for r in cinos_after if cinos_before.get(r) not in (None, cinos_after[r])]
        if moved and candidate != "kernel":
            self.report.divergences.append(
                f"after remount: {candidate} inode numbers changed for {sorted(moved)[:10]}")
        self.unmount(cand, kernel)
        # The candidate's upper must mean the same to the kernel (over the kernel-format lowers).
        # A kernel candidate (self-check) keeps its index in its workdir; anything else must need none.
        # In a user namespace lamina writes user.overlay.* markers: the kernel reads them with userxattr.
        cross = Union("kernel", self.cand_lowers if candidate in ("kernel", "lamina-userns") else self.kernel_lowers,
                      workdir / "c-upper", workdir / ("c-work" if candidate == "kernel" else "x-work"),
                      workdir / "x-mnt", workdir / "x.log",
                      extra=(KERNEL_ORACLE_OPTIONS if candidate == "kernel"
                             else ["userxattr"] if kernel.in_userns else []), t0_ns=self.t0_ns)
        try:
            cross.mount()
        except subprocess.CalledProcessError as e:
            self.report.divergences.append(f"the kernel refuses to mount {candidate}'s upper: {e.stderr!r}")
            return
        self.mounted.append(cross)
        xtree, _, _ = cross.snap()
        # Without the candidate's index the kernel cannot know the link count of a lower hardlink
        # some of whose names are gone: compare everything else.
        for line in diff_trees(_without_nlink(ctree_after), _without_nlink(xtree), candidate, "kernel-on-its-upper"):
            self.report.divergences.append(f"{candidate}'s upper mounted by the kernel: {line}")


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
