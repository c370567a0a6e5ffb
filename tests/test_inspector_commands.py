"""``lamina which / layers / mount / umount`` on a three-layer image made through the store.

The image (built by :func:`make_three_layer_image` with the store's own ``commit_layer`` and
``create_image``, the same calls the builder makes):

* layer 1 ``ADD base``: /etc/motd (100 B), /etc/keep, /opt/app/old (30 B), /data/big (1000 B)
* layer 2 ``COPY motd /etc/motd``: /etc/motd again (200 B): shadows layer 1's copy
* layer 3 ``RUN rm /etc/motd ...``: whiteout of /etc/motd, /opt/app made opaque with /opt/app/new,
  /data/big whited out
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import fuse_mounts_under

MAKE_IMAGE = r'''
import os, sys
from pathlib import Path
from lamina.store import Store
from unionfs.core import ondisk

root, work, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def write(rel, data):
    p = work / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)

def whiteout(rel):
    d = work / os.path.dirname(rel)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ondisk.make_whiteout(fd, os.path.basename(rel))
    finally:
        os.close(fd)

store = Store.open(root)
layers = []
work = Path(sys.argv[2]) / "l1"
write("etc/motd", b"m" * 100); write("etc/keep", b"keep\n"); write("opt/app/old", b"o" * 30)
write("data/big", b"b" * 1000)
layers.append(store.commit_layer(work))
work = Path(sys.argv[2]) / "l2"
write("etc/motd", b"M" * 200)
layers.append(store.commit_layer(work))
work = Path(sys.argv[2]) / "l3"
whiteout("etc/motd"); whiteout("data/big")
(work / "opt/app").mkdir(parents=True)
ondisk.mark_opaque(str(work / "opt/app"))
write("opt/app/new", b"new\n")
layers.append(store.commit_layer(work))
config = {
    "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
    "history": [
        {"created_by": "ADD base /"},
        {"created_by": "COPY motd /etc/motd"},
        {"created_by": "ENV X=1", "empty_layer": True},
        {"created_by": "RUN rm /etc/motd /data/big && mkdir -p /opt/app"},
    ],
}
image = store.create_image(layers, config, tags=[tag])
print(image.id)
'''


def make_three_layer_image(root: Path, work: Path, tag: str = "three:latest") -> str:
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", MAKE_IMAGE, str(root), str(work), tag]
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "lamina-root"
    make_three_layer_image(root, tmp_path / "src")
    return root


def test_which_provided_shadowed_deleted(lamina_cmd, image_root: Path) -> None:  # type: ignore[no-untyped-def]
    keep = lamina_cmd("which", "three", "/etc/keep", root=image_root).stdout
    assert keep.splitlines()[0] == "/etc/keep: provided by layer 1 of 3"
    assert "ADD base /" in keep and "shadows" not in keep

    motd = json.loads(lamina_cmd("which", "three", "etc/motd", "--json", root=image_root).stdout)
    assert motd["present"] is False and motd["provided_by"] is None
    assert [(h["layer"], h["event"]) for h in motd["history"]] == [(1, "added"), (2, "changed"), (3, "deleted")]
    assert motd["removed"][0]["layer"] == 3
    assert motd["removed"][0]["instruction"].startswith("RUN rm /etc/motd")
    text = lamina_cmd("which", "three", "/etc/motd", root=image_root).stdout
    assert "not in the image (deleted)" in text and "removed by   layer 3" in text and "whiteout" in text

    new = json.loads(lamina_cmd("which", "three", "/opt/app/new", "--json", root=image_root).stdout)
    assert new["provided_by"]["layer"] == 3
    old = lamina_cmd("which", "three", "/opt/app/old", root=image_root).stdout
    assert "hidden by /opt/app (opaque directory)" in old

    missing = lamina_cmd("which", "three", "/no/such", root=image_root, check=False)
    assert missing.returncode == 125 and missing.stderr.count("\n") == 1 and "/no/such" in missing.stderr


def test_which_shadowing_in_a_two_layer_prefix(lamina_cmd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Two images share layers 1 and 2; in the second one nothing deletes /etc/motd yet.
    root = tmp_path / "root"
    make_three_layer_image(root, tmp_path / "src")
    from lamina.store import Store

    store = Store.open(root)
    image = store.resolve_image("three")
    two = store.create_image(list(image.layers[:2]), {
        "architecture": "amd64", "os": "linux", "config": {},
        "history": [{"created_by": "ADD base /"}, {"created_by": "COPY motd /etc/motd"}]}, tags=["two:latest"])
    assert two.layers[1].diff_id == image.layers[1].diff_id
    out = lamina_cmd("which", "two", "/etc/motd", root=root).stdout
    assert out.splitlines()[0] == "/etc/motd: provided by layer 2 of 2"
    assert "COPY motd /etc/motd" in out
    assert "shadows      layer 1" in out


def test_layers_table_and_pictures(lamina_cmd, image_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(lamina_cmd("layers", "three", "--json", root=image_root).stdout)
    rows = data["layers"]
    assert [r["instruction"] for r in rows] == ["ADD base /", "COPY motd /etc/motd",
                                                 "RUN rm /etc/motd /data/big && mkdir -p /opt/app"]
    # Layer 3's deletions: its two whiteouts and the old file its opaque /opt/app hides.
    assert [(r["added"], r["changed"], r["deleted"]) for r in rows] == [(8, 0, 0), (0, 1, 0), (1, 0, 3)]
    assert [r["size"] for r in rows] == [1135, 200, 4]
    # layer 1: motd 100 + old 30 + big 1000 hidden; layer 2: its motd deleted
    assert [r["wasted"] for r in rows] == [1130, 200, 0]
    assert rows[2]["whiteouts"] == ["/data/big", "/etc/motd"] and rows[2]["opaque_dirs"] == ["/opt/app"]
    assert data["efficiency"] == pytest.approx(1 - 1330 / 1339)
    # dive's definitions by hand: leaves per path; /etc/motd 100+200+0 (file whiteout weighs 0),
    # /data/big 1000+0; the opaque /opt/app is ignored, so old (30) and new (4) count once each.
    dive = data["dive"]
    assert dive["efficiency"] == pytest.approx((5 + 30 + 4) / 1339)
    assert dive["wasted_bytes"] == 1300 and dive["user_bytes"] == 204
    assert dive["wasted_user_share"] == pytest.approx(1300 / 204)
    assert [(d["path"], d["count"], d["total"]) for d in dive["inefficiencies"]] == [
        ("/data/big", 2, 1000), ("/etc/motd", 3, 300)]

    table = lamina_cmd("layers", "three", root=image_root).stdout.splitlines()
    assert table[0].split()[:3] == ["#", "DIFF", "ID"]
    assert table[1].split()[0] == "3" and table[3].split()[0] == "1"   # newest first, like docker history
    assert table[-2].startswith("efficiency 0.7%")
    assert table[-1].startswith("dive's figures: efficiency 2.9126%, potential wasted space 1.3 kB (637.25% ")

    html, svg = tmp_path / "l.html", tmp_path / "l.svg"
    lamina_cmd("layers", "three", "--html", str(html), root=image_root)
    lamina_cmd("layers", "three", "--svg", str(svg), root=image_root)
    assert html.read_text().count('class="band layer"') == 3
    assert svg.read_text().startswith("<svg") and "whiteout: /data/big" in svg.read_text()

    both = lamina_cmd("layers", "three", "--html", "a", "--svg", "b", root=image_root, check=False)
    assert both.returncode == 125 and "not allowed with" in both.stderr
    unknown = lamina_cmd("layers", "nosuch", root=image_root, check=False)
    assert unknown.returncode == 125 and "nosuch" in unknown.stderr and "Traceback" not in unknown.stderr


# --- mounts --------------------------------------------------------------------------------------


def wait_for_line(path: Path, line: str, timeout: float = 5.0) -> bool:
    """The trace is written by the server process: give it a moment to land."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return True
        time.sleep(0.05)
    return False


def server_running(pid: int) -> bool:
    try:
        return b"unionfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _layer_xattr(path: Path) -> str:
    return os.getxattr(path, "user.lamina.layer", follow_symlinks=False).decode()


@pytest.mark.fuse
def test_mount_shows_merged_image_and_layer_xattr(lamina_cmd, image_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mnt = Path(lamina_cmd("mount", "three", root=image_root).stdout.strip())
    try:
        assert mnt.is_relative_to(image_root / "mounts") and mnt in fuse_mounts_under(mnt)
        assert sorted(os.listdir(mnt / "etc")) == ["keep"]
        assert os.listdir(mnt / "opt/app") == ["new"]
        assert not (mnt / "data/big").exists()
        keep_from = _layer_xattr(mnt / "etc/keep")
        new_from = _layer_xattr(mnt / "opt/app/new")
        # INDEX 0 is the top lowerdir: layer 3 of 3; layer 1 is index 2.
        assert keep_from.startswith("lower:2:") and new_from.startswith("lower:0:")
        with pytest.raises(OSError):
            (mnt / "etc/new").write_text("read-only mount")
        state = json.loads(next((image_root / "mounts").glob("*/state.json")).read_text())
        assert state["mountpoint"] == str(mnt) and state["layers"] == 3
        listing = lamina_cmd("mount", root=image_root).stdout.splitlines()
        assert listing[1].split() == [state["id"], "three", "3", "ro", str(state["pid"]), str(mnt)]
        busy = lamina_cmd("rmi", "three", root=image_root, check=False)
        assert busy.returncode == 1 and "mount:" in busy.stderr        # the store sees the mount
    finally:
        lamina_cmd("umount", str(mnt), root=image_root)
    assert fuse_mounts_under(image_root) == []
    assert list((image_root / "mounts").iterdir()) == []


@pytest.mark.fuse
def test_mount_upto_and_rw_scratch(lamina_cmd, image_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "view"
    target.mkdir()
    out = lamina_cmd("mount", "--upto", "2", "three", str(target), root=image_root).stdout.strip()
    assert out == str(target)
    try:
        assert (target / "etc/motd").read_bytes() == b"M" * 200        # layer 2's copy, not yet deleted
        assert (target / "opt/app/old").exists()
        assert _layer_xattr(target / "etc/motd").startswith("lower:0:")
    finally:
        lamina_cmd("umount", str(target), root=image_root)
    assert target.is_dir() and not fuse_mounts_under(target)          # a mount point we did not make stays

    from lamina.store import Store

    layer1 = Store.open(image_root).resolve_image("three").layers[0].diff_id
    trace = tmp_path / "trace.log"
    mnt = Path(lamina_cmd("mount", "--rw", "--trace", str(trace), "--upto", layer1[7:19], "three",
                          root=image_root).stdout.strip())
    try:
        assert (mnt / "etc/motd").read_bytes() == b"m" * 100
        with open(mnt / "etc/motd", "a") as f:
            f.write("changed\n")
        assert _layer_xattr(mnt / "etc/motd") == "upper"
        assert wait_for_line(trace, "copy-up /etc/motd from lower:0")
        scratch = json.loads(next((image_root / "mounts").glob("*/state.json")).read_text())["scratch"]
        assert (Path(scratch) / "upper/etc/motd").read_text() == "m" * 100 + "changed\n"
        (mnt / "etc/keep").write_text("overwritten\n")                  # O_TRUNC over a lower file
        assert (Path(scratch) / "upper/etc/keep").read_text() == "overwritten\n"
    finally:
        lamina_cmd("umount", str(mnt), root=image_root)
    assert not Path(scratch).exists()
    store_copy = Store.open(image_root).resolve_image("three").layers[0].path
    assert (Path(store_copy) / "etc/motd").read_bytes() == b"m" * 100   # the store's layer untouched


def test_mount_and_umount_errors(lamina_cmd, image_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for args, words in ((["mount", "--upto", "4", "three"], "layers 1..3"),
                        (["mount", "--upto", "zz", "three"], "--upto zz"),
                        (["mount", "nothing-here"], "nothing-here"),
                        (["mount", "three", str(tmp_path / "absent")], "not a directory"),
                        (["umount", str(tmp_path)], "not a lamina mount")):
        result = lamina_cmd(*args, root=image_root, check=False)
        assert result.returncode == 125, (args, result.stderr)
        assert result.stderr.startswith("lamina: error:") and words in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    assert not (image_root / "mounts").exists() or list((image_root / "mounts").iterdir()) == []


@pytest.mark.fuse
def test_copy_up_trace_names_the_layer(union_mount, image_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lamina.store import Store

    image = Store.open(image_root).resolve_image("three")
    lowers = [Path(layer.path) for layer in reversed(image.layers[:2])]
    upper, work, trace = tmp_path / "upper", tmp_path / "work", tmp_path / "trace.log"
    upper.mkdir()
    work.mkdir()
    m = union_mount(lowers, upper, work, options=["layer_xattr"], extra_args=[f"--trace={trace}"])
    with open(m.mountpoint / "etc/keep", "a") as f:
        f.write("more\n")
    os.unlink(m.mountpoint / "etc/motd")
    assert wait_for_line(trace, "whiteout /etc/motd"), trace.read_text()
    lines = trace.read_text().splitlines()
    copy_up = [line for line in lines if "copy-up" in line and "/etc/keep" in line]
    assert copy_up, lines
    assert str(lowers[1]) in copy_up[0] or "lower:1" in copy_up[0]
    assert any("whiteout" in line and "/etc/motd" in line for line in lines), lines
    assert (upper / "etc/keep").read_text() == "keep\nmore\n"


@pytest.mark.fuse
@pytest.mark.unprivileged
def test_mount_umount_unprivileged(unpriv) -> None:  # type: ignore[no-untyped-def]
    root = unpriv.workdir / "root"
    result = unpriv.run(["lamina-python", "-c", MAKE_IMAGE, str(root), str(unpriv.workdir / "src"), "three:latest"])
    assert result.returncode == 0, result.stderr
    which = unpriv.lamina("which", "three", "/etc/motd", check=True).stdout
    assert "not in the image (deleted)" in which and "[whiteout]" in which
    assert unpriv.lamina("layers", "three", check=True).stdout.splitlines()[-2].startswith("efficiency")
    mount = unpriv.lamina("mount", "three", check=True)
    mnt = Path(mount.stdout.strip())
    try:
        listing = unpriv.run(["ls", str(mnt / "etc")], check=True).stdout.split()
        assert listing == ["keep"]
        attr = unpriv.run(["lamina-python", "-c", "import os,sys; print(os.getxattr(sys.argv[1], "
                           "'user.lamina.layer').decode())", str(mnt / "opt/app/new")], check=True)
        assert attr.stdout.startswith("lower:0:")
        state = json.loads(next((root / "mounts").glob("*/state.json")).read_text())
        assert Path(f"/proc/{state['pid']}").stat().st_uid == unpriv.uid
    finally:
        done = unpriv.lamina("umount", str(mnt))
    assert done.returncode == 0, done.stderr
    assert fuse_mounts_under(mnt) == []
    assert not server_running(state["pid"])


@pytest.mark.fuse
def test_umount_busy_then_lazy(lamina_cmd, image_root: Path) -> None:  # type: ignore[no-untyped-def]
    mnt = Path(lamina_cmd("mount", "three", root=image_root).stdout.strip())
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)       # a process whose cwd is in the mount
    try:
        busy = lamina_cmd("umount", str(mnt), root=image_root, check=False)
        assert busy.returncode == 125 and "busy" in busy.stderr.lower(), busy.stderr
        assert mnt in fuse_mounts_under(mnt)                      # still mounted, still recorded
        assert lamina_cmd("mount", root=image_root).stdout.count(str(mnt)) == 1
        pid = json.loads(next((image_root / "mounts").glob("*/state.json")).read_text())["pid"]
        lamina_cmd("umount", "--lazy", str(mnt), root=image_root)
        assert fuse_mounts_under(image_root) == []
        assert list((image_root / "mounts").iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    # Detached, the server lives while the holder is inside, and exits by itself once it is gone.
    deadline = time.monotonic() + 10
    while server_running(pid):
        assert time.monotonic() < deadline, "the unionfs server did not exit after a lazy unmount"
        time.sleep(0.05)


@pytest.mark.fuse
@pytest.mark.unprivileged
def test_container_with_foreign_owned_files(unpriv) -> None:  # type: ignore[no-untyped-def]
    # With subordinate ids, /data belongs to a subordinate uid with mode 0700: unreadable to the user
    # on the host, readable to root of lamina's user namespace, where the analysis runs.
    unpriv.lamina("run", "--name", "own", "lamina/busybox", "sh", "-c",
                  "mkdir /data; echo s > /data/s; chown -R 1000:1000 /data; chmod 700 /data; chmod 600 /data/s",
                  check=True, timeout=300)
    which = unpriv.lamina("which", "own", "/data/s", check=True).stdout
    assert which.splitlines()[0] == "/data/s: provided by the container layer"
    rows = json.loads(unpriv.lamina("layers", "own", "--json", check=True).stdout)["layers"]
    assert rows[-1]["container"] is True and rows[-1]["added"] == 2 and rows[-1]["size"] == 2
    # The mount is served from the same namespace, so the user reads what the container wrote.
    mnt = Path(unpriv.lamina("mount", "own", check=True).stdout.strip())
    try:
        assert unpriv.run(["cat", str(mnt / "data/s")], check=True).stdout == "s\n"
        assert unpriv.run(["ls", str(mnt)], check=True).stdout.split().count("data") == 1
        attr = unpriv.run(["getfattr", "--only-values", "-n", "user.lamina.layer", str(mnt / "data/s")],
                          check=True).stdout
        assert attr.startswith("lower:0:") and attr.endswith("/upper")
    finally:
        done = unpriv.lamina("umount", str(mnt))
    assert done.returncode == 0, done.stderr
    assert fuse_mounts_under(mnt) == []


@pytest.mark.fuse
def test_mount_failure_leaves_nothing_behind(lamina_cmd, image_root: Path) -> None:  # type: ignore[no-untyped-def]
    from lamina.store import Store

    layer_dir = Path(Store.open(image_root).resolve_image("three").layers[-1].path)
    layer_dir.rename(layer_dir.with_name("moved-away"))            # as a damaged store would have it
    result = lamina_cmd("mount", "three", root=image_root, check=False)
    assert result.returncode == 125 and result.stderr.startswith("lamina: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert fuse_mounts_under(image_root) == []
    assert list((image_root / "mounts").iterdir()) == []


@pytest.mark.fuse
@pytest.mark.unprivileged
def test_unprivileged_mount_failure_leaves_nothing_behind(unpriv) -> None:  # type: ignore[no-untyped-def]
    root = unpriv.workdir / "root"
    result = unpriv.run(["lamina-python", "-c", MAKE_IMAGE, str(root), str(unpriv.workdir / "src"), "three:latest"])
    assert result.returncode == 0, result.stderr
    moved = unpriv.run(["lamina-python", "-c", "import sys; from pathlib import Path; from lamina.store import Store; "
                        "p = Path(Store.open(Path(sys.argv[1])).resolve_image('three').layers[-1].path); "
                        "p.rename(p.with_name('moved-away'))", str(root)])
    assert moved.returncode == 0, moved.stderr
    failed = unpriv.lamina("mount", "three")
    assert failed.returncode == 125 and failed.stderr.startswith("lamina: error:"), failed.stderr
    assert fuse_mounts_under(root) == [] and list((root / "mounts").iterdir()) == []
    assert unpriv.run(["pgrep", "-u", str(unpriv.uid), "-f", "unionfs"]).stdout.strip() == ""
