"""lamina's unionfs against the kernel's overlayfs, on random and hand-written operation sequences.

The engine is tests/fsops.py (its docstring says how and why); every run happens in a child process
in a private mount namespace, so a crash or a hang cannot leave mounts behind in the test's namespace.

Knobs (environment): LAMINA_DIFF_SEEDS ("8" = seeds 1..8, or "3,17,40"; default 1..4),
LAMINA_DIFF_OPS (operations per seed, default 200), LAMINA_DIFF_CANDIDATE (lamina or fuse-overlayfs,
default lamina), LAMINA_DIFF_FALLOCATE (on/off: fallocate operations in the random sequences; by
default they are in when the candidate supports fallocate(2) at all, probed on a scratch mount). A failure prints the first divergence and the command that shrinks it to a minimal
repro.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

import fsops

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private mount namespace"),
]


def _seeds() -> list[int]:
    spec = os.environ.get("LAMINA_DIFF_SEEDS", "1,2,4")
    if "," in spec:
        return [int(s) for s in spec.split(",") if s]
    return list(range(1, int(spec) + 1))


OPS = int(os.environ.get("LAMINA_DIFF_OPS", "200"))
CANDIDATE = os.environ.get("LAMINA_DIFF_CANDIDATE", "lamina")
# lamina-userns: server and operations inside a user + mount namespace, as the builder and runner
# use it (user.overlay.* markers; the kernel reads its upper with -o userxattr).
CANDIDATES = [CANDIDATE] if "LAMINA_DIFF_CANDIDATE" in os.environ else ["lamina", "lamina-userns"]


def run(args: list[str], timeout: float = 240) -> list[dict[str, Any]]:
    proc = fsops.run_isolated([*args, "--json"], timeout=timeout)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not reports:
        pytest.fail(f"differential engine failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return reports


def explain(report: dict[str, Any], rerun: str) -> str:
    lines = [f"seed {report['seed']}: {report['candidate']} diverged from the kernel after "
             f"{report['ops_run']} operations:"]
    lines += ["  " + d for d in report["divergences"]]
    if report["server_log"]:
        lines += ["server log:"] + ["  " + line for line in report["server_log"]]
    lines += ["last operations:"] + ["  " + fsops.op_text(op) for op in report["ops"][-6:]]
    lines.append(f"minimal repro: unshare -m --propagation private .venv/bin/python tests/fsops.py {rerun} --shrink")
    return "\n".join(lines)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("seed", _seeds())
def test_random_sequence_matches_kernel(seed: int, candidate: str) -> None:
    """Results, errnos, merged trees, the tree after remount, and the upper read by the kernel."""
    (report,) = run(["--candidate", candidate, "--seed", str(seed), "--ops", str(OPS)])
    assert report["ops_run"] == OPS or report["divergences"]
    assert not report["divergences"], explain(report, f"--candidate {candidate} --seed {seed} --ops {OPS}")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("case", sorted(fsops.CASES))
def test_case(case: str, candidate: str) -> None:
    """Hand-written regressions, each first found by a random sequence."""
    (report,) = run(["--candidate", candidate, "--case", case])
    assert not report["divergences"], explain(report, f"--candidate {candidate} --case {case}")


LISTING_CASES = ["append-after-listing-cold", "append-while-listing-cold"]


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("case", LISTING_CASES)
def test_listing_case_with_true_attributes_only(case: str, candidate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing cases again with unionfs.bare_entries switched off (every entry carries true
    attributes): the other way lamina answers listings."""
    from unionfs.bare_entries import SWITCH

    monkeypatch.setenv(SWITCH, "off")
    (report,) = run(["--candidate", candidate, "--case", case])
    assert not report["divergences"], explain(report, f"--candidate {candidate} --case {case}")


# --- the harness itself --------------------------------------------------------------------------


def test_kernel_agrees_with_itself() -> None:
    """No false alarms: kernel vs kernel over kernel-format lowers (even seeds) never diverges."""
    reports = run(["--candidate", "kernel", "--seed", "2", "--seed", "4", "--ops", "150"])
    for report in reports:
        assert report["ops_run"] == 150, report["divergences"]
        assert not report["divergences"]
        # The sequence does real work: most kinds of operation succeed at least once.
        succeeded = {key.split(":")[0] for key, n in report["outcomes"].items() if key.endswith(":ok")}
        assert len(succeeded) >= 15, sorted(succeeded)


def test_harness_detects_a_divergence() -> None:
    """The kernel does not read ``.wh.`` whiteouts: as a "candidate" over OCI-format lowers it must fail."""
    (report,) = run(["--candidate", "kernel", "--seed", "5", "--ops", "10"])
    assert report["oci_markers"] > 0
    assert any(".wh." in d for d in report["divergences"]), report["divergences"]


def test_run_isolated_reports_usage_errors() -> None:
    proc = fsops.run_isolated(["--candidate", "nonesuch", "--seed", "1"], timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_category_keeps_bug_kinds_apart() -> None:
    assert fsops.category("op 3 (rename, a, b): kernel=('ok', None) lamina=('err', 'EXDEV')") == "op:rename"
    assert fsops.category("after op 19: tree: d: kernel=(...) lamina=(...)") == "tree"
    assert fsops.category("after remount: lamina inode numbers changed for ['a']") == "inode numbers changed"
    assert fsops.category("after remount: tree: a/c: kernel=None lamina=(...)") == "after remount: tree"


def test_model_of_lowers_matches_kernel(tmp_path: Any) -> None:
    """The generator's model of overlay lookup (used to place whiteouts) agrees with the kernel."""
    import random

    layers = fsops.generate_lowers(random.Random(11), tmp_path / "gen", 3)
    model = fsops.merged_kinds(layers)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t overlay overlay -o lowerdir={':'.join(map(str, layers))} {mnt} && "
         f"cd {mnt} && find . -mindepth 1 -printf '%P %y\\n'"],
        capture_output=True, text=True, check=True)
    seen = dict(line.split(" ") for line in proc.stdout.splitlines())
    assert {p: ("dir" if k == "d" else "other") for p, k in seen.items()} == model


def test_refused_rename_stamp_undone_only_below_a_whole_copy(tmp_path: Any) -> None:
    """The oracle's ext4 stamp on a refused rename is forgiven only where the candidate copied a
    renamed directory up whole and the oracle keeps a redirect, and never through a symlink."""
    oracle, cand = tmp_path / "k-upper", tmp_path / "c-upper"
    for upper in (oracle, cand):
        (upper / "n" / "b").mkdir(parents=True)
        (upper / "plain" / "b").mkdir(parents=True)
        os.symlink("n", upper / "link")
    os.setxattr(oracle / "n", "trusted.overlay.redirect", b"/a")
    os.setxattr(cand / "n", "user.overlay.opaque", b"y")
    assert fsops._copied_whole_where_oracle_redirects(oracle, cand, "n/b")
    assert fsops._copied_whole_where_oracle_redirects(oracle, cand, "n")
    assert not fsops._copied_whole_where_oracle_redirects(oracle, cand, "plain/b")
    assert not fsops._copied_whole_where_oracle_redirects(oracle, cand, "link/b")
    assert not fsops._copied_whole_where_oracle_redirects(oracle, cand, "")
    os.setxattr(oracle / "plain", "trusted.overlay.opaque", b"y")
    os.setxattr(cand / "plain", "user.overlay.opaque", b"y")
    assert not fsops._copied_whole_where_oracle_redirects(oracle, cand, "plain/b")


@pytest.mark.parametrize("candidate", ["lamina", "lamina-userns"])
def test_refused_rename_stamp_undone_in_userns_only(candidate: str) -> None:
    """Only in a user namespace is the oracle's stamp undone (the case's second rename); lamina
    itself must stamp exactly as the kernel does."""
    (report,) = run(["--candidate", candidate, "--case", "rename-refused-below-renamed-lower-dir"])
    assert not report["divergences"], explain(report, f"--candidate {candidate} --case rename-refused-below-renamed-lower-dir")
    assert report["outcomes"].get("undone:ext4-stamp", 0) == (1 if candidate == "lamina-userns" else 0)
