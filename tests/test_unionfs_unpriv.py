"""The union filesystem run by an unprivileged user: in the initial namespace (fusermount3) and
inside a user + mount namespace (``unshare -Urm``), with and without subordinate ids."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from unionfs.core import ondisk

pytestmark = [pytest.mark.fuse, pytest.mark.unprivileged]

# Runs as the unprivileged user: mounts, changes things, reports what it saw, unmounts.
SCRIPT = r'''
import json, os, subprocess, sys, time
lower, upper, work, mnt, mode = sys.argv[1:6]
opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
r = subprocess.run(["lamina-unionfs", "-o", opts, mnt], capture_output=True, text=True)
if r.returncode != 0:
    print(json.dumps({"mount_error": r.stderr})); sys.exit(1)
out = {}
try:
    with open(f"{mnt}/etc/conf", "a") as f:
        f.write("changed\n")
    os.unlink(f"{mnt}/gone")
    for name in os.listdir(f"{mnt}/dir"):
        os.unlink(f"{mnt}/dir/{name}")
    os.rmdir(f"{mnt}/dir")
    os.mkdir(f"{mnt}/dir")
    os.rename(f"{mnt}/tree", f"{mnt}/tree2")
    open(f"{mnt}/owned", "w").close()
    try:
        os.chown(f"{mnt}/owned", 4242, 4343)
        out["chown"] = "ok"
    except OSError as e:
        out["chown"] = e.strerror
    st = os.stat(f"{mnt}/owned")
    out["owned"] = [st.st_uid, st.st_gid]
    out["root"] = sorted(os.listdir(mnt))
    out["dir"] = os.listdir(f"{mnt}/dir")
    out["tree2"] = sorted(os.listdir(f"{mnt}/tree2"))
    out["conf"] = open(f"{mnt}/etc/conf").read()
finally:
    subprocess.run(["fusermount3", "-u", mnt], check=True)
for _ in range(100):
    if not os.path.ismount(mnt):
        break
    time.sleep(0.05)
out["unmounted"] = not os.path.ismount(mnt)
print(json.dumps(out))
'''


def prepare(user, base: Path) -> tuple[Path, Path, Path, Path, Path]:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "etc").mkdir()
    (lower / "etc" / "conf").write_text("orig\n")
    (lower / "gone").write_text("bye")
    (lower / "dir").mkdir()
    (lower / "dir" / "a").write_text("a")
    (lower / "tree").mkdir()
    for i in range(5):
        (lower / "tree" / f"f{i}").write_text(str(i))
    script = base / "script.py"
    script.write_text(SCRIPT)
    user.chown_tree(base)
    return lower, upper, work, mnt, script


def check_common(out: dict, upper: Path) -> None:
    assert out.get("unmounted"), out
    assert out["root"] == ["dir", "etc", "owned", "tree2"], out
    assert out["dir"] == []
    assert out["tree2"] == [f"f{i}" for i in range(5)]
    assert out["conf"] == "orig\nchanged\n"
    # user.overlay.redirect is never followed by the kernel (userxattr): a renamed lower directory
    # is copied up whole and made opaque, so the upper stays readable by the kernel
    assert sorted(os.listdir(upper / "tree2")) == [f"f{i}" for i in range(5)]
    assert ondisk.read_redirect(str(upper / "tree2")) is None
    assert os.getxattr(upper / "tree2", "user.overlay.opaque") == b"y"
    assert os.getxattr(upper / "dir", "user.overlay.opaque") == b"y"


def test_unprivileged_in_initial_namespace(unpriv, tmp_path: Path) -> None:
    base = unpriv.workdir / "initial"
    lower, upper, work, mnt, script = prepare(unpriv, base)
    r = unpriv.run(["lamina-python", str(script), str(lower), str(upper), str(work), str(mnt), "initial"])
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout)
    check_common(out, upper)
    # a whiteout in the kernel's format where mknod of 0/0 is allowed (Linux >= 5.8), else .wh.gone
    gone = upper / "gone"
    assert (gone.is_char_device() and os.lstat(gone).st_rdev == 0) or (upper / ".wh.gone").exists()
    # chown is refused to a plain user: an owner override instead
    assert out["chown"] == "ok" and out["owned"] == [4242, 4343]
    override = ondisk.read_owner_override(str(upper / "owned"))
    assert override is not None and (override.uid, override.gid) == (4242, 4343)
    assert os.stat(upper / "owned").st_uid == unpriv.uid


def test_unprivileged_inside_user_namespace(unpriv, tmp_path: Path) -> None:
    base = unpriv.workdir / "userns"
    lower, upper, work, mnt, script = prepare(unpriv, base)
    r = unpriv.run(["unshare", "-Urm", "lamina-python", str(script), str(lower), str(upper), str(work),
                    str(mnt), "userns"])
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout)
    check_common(out, upper)
    # inside a user namespace mknod of a 0/0 whiteout is allowed: the kernel's own format
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # the kernel's overlayfs (userxattr) reads what the unprivileged user wrote
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    kwork = tmp_path / "kwork"
    kwork.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={kwork},userxattr",
                    str(kmnt)], check=True)
    try:
        assert sorted(os.listdir(kmnt)) == ["dir", "etc", "owned", "tree2"]
        assert os.listdir(kmnt / "dir") == []
        assert sorted(os.listdir(kmnt / "tree2")) == [f"f{i}" for i in range(5)]
    finally:
        subprocess.run(["umount", str(kmnt)], check=True)


def test_unsearchable_child_directory_keeps_its_parent_listable(unpriv_nosubids, tmp_path: Path) -> None:
    user = unpriv_nosubids
    base = user.workdir / "unsearchable"
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "d", upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "d" / "f").write_text("f")
    (lower / "other").write_text("o")
    user.chown_tree(base)
    os.chmod(lower / "d", 0)
    script = (f"lamina-unionfs -o lowerdir={lower},upperdir={upper},workdir={work} {mnt} && "
              f"ls {mnt}; rc=$?; fusermount3 -u {mnt}; exit $rc")
    r = user.run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["d", "other"]


def test_single_id_namespace_shows_unmapped_override_owners_as_root(unpriv_nosubids, tmp_path: Path) -> None:
    user = unpriv_nosubids
    base = user.workdir / "squash"
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "home" / "u", upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "home" / "u" / "own").write_text("mine")
    user.chown_tree(base)
    ondisk.write_owner_override(str(lower / "home" / "u"), ondisk.OwnerOverride(1000, 1000, 0o700))
    os.chmod(lower / "home" / "u", 0o755)
    script = (f"lamina-unionfs -o lowerdir={lower},upperdir={upper},workdir={work} {mnt} && "
              f"stat -c '%u:%g:%a' {mnt}/home/u && cat {mnt}/home/u/own; rc=$?; fusermount3 -u {mnt}; exit $rc")
    r = user.run(["unshare", "-Urm", "sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0:0:700", "mine"]
    # outside that namespace the intended owner is still what the override says
    assert ondisk.read_owner_override(str(lower / "home" / "u")) == ondisk.OwnerOverride(1000, 1000, 0o700)
