"""A RUN step's upper renamed into the store as its layer (lamina.store.layer_settle).

The oracle is the unpacker, which made every stored layer directory before: the same upper,
packed and unpacked the old way, must give the same diff_id and, entry for entry, the same
directory (owners, modes, overrides, times, xattrs, whiteouts, opaque markers, hard links,
device placeholders) as the upper settled while it is packed. As root of the initial namespace
(real owners, real devices) and as root of lamina's user namespace for an unprivileged user
with and without subordinate ids (owner overrides, placeholders), where rootless builds commit.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from harness import UnprivilegedUser
from settle_scenario import compare_both_ways

IS_ROOT = os.geteuid() == 0


def ondisk_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _assert_same(found: dict[str, Any]) -> None:
    assert found["new_diff_id"] == found["old_diff_id"], "settling changed what was packed"
    assert found["repacked_settled"] == found["repacked_unpacked"]
    unpacked, settled = found["unpacked"], found["settled"]
    differences = {k: (unpacked.get(k), settled.get(k)) for k in sorted(set(unpacked) | set(settled))
                   if unpacked.get(k) != settled.get(k)}
    assert not differences


@pytest.mark.skipif(not IS_ROOT, reason="real owners and device nodes need root")
def test_settled_upper_is_the_unpacked_layer_as_root(tmp_path: Path) -> None:
    found = compare_both_ways(tmp_path)
    _assert_same(found)
    assert found["repacked_settled"] == found["old_diff_id"]
    settled = found["settled"]
    assert "a/sock" not in settled and "opaque-by-file/.wh..wh..opq" not in settled
    assert settled["owned/file"]["uid"] == 1000
    assert stat.S_ISCHR(int(settled["a/null"]["mode"], 8))


_IN_USERNS = """
import json, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from runner.sandbox import call_in_userns
from settle_scenario import compare_both_ways
found = call_in_userns(compare_both_ways, Path(sys.argv[1]))
print(json.dumps(found, default=lambda b: b.hex()))
"""


def test_settled_upper_is_the_unpacked_layer_in_the_user_namespace(unpriv: UnprivilegedUser) -> None:
    work = unpriv.workdir / "settle"
    work.mkdir()
    unpriv.chown_tree(work)
    done = unpriv.run(["python3", "-c", _IN_USERNS, str(work), str(Path(__file__).resolve().parent)],
                      check=True)
    found = json.loads(done.stdout)
    _assert_same(found)
    settled = found["settled"]
    # Seen from outside the namespace: everything is the user's, readable and removable by it.
    for dirpath, dirnames, filenames in os.walk(work / "upper-new"):
        for name in ["", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            assert (st.st_uid, st.st_gid) == (unpriv.uid, unpriv.gid), os.path.join(dirpath, name)
            assert stat.S_ISLNK(st.st_mode) or st.st_mode & 0o600 == 0o600 or ondisk_whiteout(st)
    assert settled["ro"]["mode"] == oct(stat.S_IFDIR | 0o755)
    override = "user.containers.override_stat"
    assert bytes.fromhex(settled["ro"]["xattrs"][override]) == b"0:0:0555"
    if unpriv.has_subids:
        assert bytes.fromhex(settled["owned/file"]["xattrs"][override]) == b"1000:1000:0640"
    assert bytes.fromhex(settled["a/null"]["xattrs"][override]) == b"0:0:0666:char-1-3"
    assert bytes.fromhex(settled["."]["xattrs"]["user.lamina.device_placeholders"]) == b"a/null"


_UNPACK_AND_COMPARE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from runner.sandbox import call_in_userns
from lamina.store.layer_unpack import unpack_layer
from settle_scenario import snapshot

def compare(blob, layer, work):
    unpack_layer(Path(blob), work / "unpacked", work / "tmp")
    return {"stored": snapshot(Path(layer)), "unpacked": snapshot(work / "unpacked")}

print(json.dumps(call_in_userns(compare, sys.argv[1], sys.argv[2], Path(sys.argv[4])),
                 default=lambda b: b.hex()))
"""

RUN_STEP = """FROM lamina/busybox
RUN mkdir -p /d/sub /o && echo x > /d/f && ln /d/f /d/link && chown 1000:1000 /d/f && \\
    chmod 555 /d/sub && mkfifo -m 640 /d/p && ln -s f /d/s && rm -f /bin/true && \\
    echo ro > /d/ro && chmod 444 /d/ro && rm -rf /var && mkdir /var && echo new > /var/only
"""


def test_rootless_run_step_layer_is_what_its_blob_unpacks_to(unpriv: UnprivilegedUser) -> None:
    """End to end: the layer directory a rootless RUN step leaves in the store (its upper, settled
    and renamed) is entry for entry the directory its blob unpacks to, and nothing is left over."""
    context = unpriv.workdir / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(RUN_STEP if unpriv.has_subids else RUN_STEP.replace(
        "chown 1000:1000", "true"))
    unpriv.chown_tree(context)
    unpriv.lamina("build", "-q", "-t", "settled:1", str(context), check=True, timeout=300)
    inspect = unpriv.lamina("image", "inspect", "settled:1", check=True)
    diff_id = json.loads(inspect.stdout)[0]["RootFS"]["Layers"][-1]
    root = unpriv.workdir / "root"
    hexdigest = diff_id.removeprefix("sha256:")
    work = unpriv.workdir / "compare"
    work.mkdir()
    unpriv.chown_tree(work)
    done = unpriv.run(["python3", "-c", _UNPACK_AND_COMPARE, str(root / "blobs/sha256" / hexdigest),
                       str(root / "layers" / hexdigest / "diff"), str(Path(__file__).resolve().parent),
                       str(work)], check=True)
    found = json.loads(done.stdout)
    stored, unpacked = found["stored"], found["unpacked"]
    assert {k: (unpacked.get(k), stored.get(k)) for k in set(stored) | set(unpacked)
            if unpacked.get(k) != stored.get(k)} == {}
    assert stored["d/link"]["hardlink_to"] == "d/f"
    assert unpriv.lamina("system", "check").returncode == 0
    assert os.listdir(root / "tmp") == []
    # Its user can remove it outside the namespace (what garbage collection does), as any layer.
    unpriv.run(["python3", "-c", "import sys; from pathlib import Path; from lamina.store.blobs import "
                "remove_tree; remove_tree(Path(sys.argv[1]))", str(root / "layers" / hexdigest)], check=True)
    assert not (root / "layers" / hexdigest).exists()
