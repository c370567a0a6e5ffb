"""The store gives no other local user a way in (issue 13, item 1: local root through the store).

An image may carry a setuid-root binary or a 0666 device node, and the store unpacks them for real
(as root) into its layer directories; a root-run container may make more in its upper. With a 0755
store, any local user could run ``STORE/layers/<hex>/diff/suid`` and get euid 0. The store root and
everything in it are private to the owner (0700, as containers-storage does), an old open store is
closed by the next command, ``system check`` reports it, and a rootless store is private likewise.
The other user is one of the unprivileged accounts of tests/conftest.py; the stores live under a
directory that user can traverse, so only the store's own modes stand in the way.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import UnprivilegedUser, fuse_mounts_under

pytestmark = [pytest.mark.root, pytest.mark.unprivileged]

Lamina = Callable[..., "subprocess.CompletedProcess[str]"]
EUID_SOURCE = Path(__file__).parent / "security" / "euid.c"
CONTENT_DIRS = ("", "blobs", "blobs/sha256", "layers", "images", "tmp", "containers")


@pytest.fixture(scope="module")
def euid_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (needed to build the static setuid probe)")
    binary = tmp_path_factory.mktemp("euid") / "euid"
    built = subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(EUID_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a static binary here: {built.stderr.strip()[:200]}")
    return binary


def hostile_rootfs_tar(path: Path, euid_binary: Path, device: bool = True) -> None:
    """A root filesystem with a setuid-root probe, a 0666 device node (an unprivileged user cannot
    make one), busybox and a readable file."""
    with tarfile.open(path, "w") as tar:
        for name in ("bin", "opt", "dev", "etc"):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        tar.add("/bin/busybox", "bin/busybox")
        data = euid_binary.read_bytes()
        info = tarfile.TarInfo("opt/suid")
        info.mode, info.uid, info.gid, info.size = 0o4755, 0, 0, len(data)
        tar.addfile(info, io.BytesIO(data))
        if device:
            node = tarfile.TarInfo("dev/open-null")
            node.type, node.mode, node.devmajor, node.devminor = tarfile.CHRTYPE, 0o666, 1, 3
            tar.addfile(node)
        text = b"image content\n"
        info = tarfile.TarInfo("etc/readable")
        info.mode, info.size = 0o644, len(text)
        tar.addfile(info, io.BytesIO(text))


@pytest.fixture
def open_area(unpriv_nosubids: UnprivilegedUser, tmp_path: Path) -> Iterator[Path]:
    """A root-owned 0755 directory every user can traverse (pytest's tmp_path is 0700)."""
    area = unpriv_nosubids.workdir.parent / f"sec-store-{tmp_path.name}"
    area.mkdir(mode=0o755)
    area.chmod(0o755)
    yield area
    for mountpoint in fuse_mounts_under(area):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    shutil.rmtree(area, ignore_errors=True)


def dangerous_paths(root: Path) -> list[Path]:
    """Setuid/setgid files and device nodes (not whiteouts) anywhere in the store."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            path = Path(dirpath) / name
            st = os.lstat(path)
            setid = stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID)
            device = (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and st.st_rdev != 0
            if setid or device:
                found.append(path)
    return found


def assert_out_of_reach(user: UnprivilegedUser, path: Path) -> None:
    """``user`` can neither run, open, write nor even stat ``path``."""
    try:
        ran = user.run([str(path)])
    except PermissionError:
        pass  # exec refused before the program could start: what we want
    else:
        assert ran.returncode != 0 and "euid=" not in ran.stdout, f"{path}: {ran.stdout}"
    for argv in (["cat", str(path)], ["sh", "-c", f"echo x > '{path}'"], ["stat", str(path)]):
        r = user.run(argv)
        assert r.returncode != 0, f"{user.user} could {argv[0]} {path}"


def test_setuid_root_files_and_device_nodes_are_out_of_reach_of_other_users(
        lamina_cmd: Lamina, open_area: Path, unpriv_nosubids: UnprivilegedUser, euid_binary: Path,
        tmp_path: Path) -> None:
    """Through every path of the store: the imported layer, a container's upper and its anonymous
    volume, a `lamina mount`."""
    root = open_area / "store"
    tar = tmp_path / "hostile.tar"
    hostile_rootfs_tar(tar, euid_binary)
    lamina_cmd("import", str(tar), "hostile:1", root=root)
    lamina_cmd("run", "--name", "maker", "-v", "/vol", "hostile:1", "/bin/busybox", "sh", "-c",
               "/bin/busybox cp /opt/suid /made-suid && /bin/busybox chmod 4755 /made-suid && "
               "/bin/busybox cp -p /made-suid /vol/vol-suid", root=root)
    found = dangerous_paths(root)
    kinds = {p.relative_to(root).parts[0] for p in found}
    assert {"layers", "containers", "volumes"} <= kinds, found
    assert {p.name for p in found} >= {"suid", "open-null", "made-suid", "vol-suid"}
    # The probe itself works: as root, from the layer, it reports euid 0 (so a refusal means something).
    suid = next(p for p in found if p.name == "suid")
    assert subprocess.run([str(suid)], capture_output=True, text=True).stdout == "euid=0\n"
    for path in found:
        assert_out_of_reach(unpriv_nosubids, path)
    for sub in CONTENT_DIRS:
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o700, sub

    # A `lamina mount` is the owner's too unless asked otherwise (no allow_other).
    mountpoint = open_area / "mnt"
    mountpoint.mkdir(mode=0o755)
    lamina_cmd("mount", "hostile:1", str(mountpoint), root=root)
    try:
        assert (mountpoint / "opt" / "suid").exists()
        assert_out_of_reach(unpriv_nosubids, mountpoint / "opt" / "suid")
        assert_out_of_reach(unpriv_nosubids, mountpoint / "dev" / "open-null")
    finally:
        lamina_cmd("umount", str(mountpoint), root=root)


def test_an_open_store_is_closed_by_the_next_command_and_reported_by_check(
        lamina_cmd: Lamina, open_area: Path, unpriv_nosubids: UnprivilegedUser, euid_binary: Path,
        tmp_path: Path) -> None:
    """A store an older lamina left 0755 is made 0700 by whatever command comes next, and
    `system check` says it was open (the content may have been reached already)."""
    root = open_area / "store"
    tar = tmp_path / "hostile.tar"
    hostile_rootfs_tar(tar, euid_binary)
    lamina_cmd("import", str(tar), "hostile:1", root=root)

    def open_like_the_old_code() -> list[Path]:
        dirs = [root / sub for sub in CONTENT_DIRS] + list((root / "layers").iterdir())
        for d in dirs:
            d.chmod(0o755)
        return dirs

    layer_dirs = list((root / "layers").iterdir())
    open_like_the_old_code()
    suid = next(p for p in dangerous_paths(root) if p.name == "suid")
    assert "euid=0" in unpriv_nosubids.run([str(suid)]).stdout  # the hole, as the old code left it
    lamina_cmd("ps", "-a", root=root)
    for sub in CONTENT_DIRS:
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o700, sub
    assert_out_of_reach(unpriv_nosubids, suid)

    open_like_the_old_code()
    check = lamina_cmd("system", "check", root=root, check=False)
    assert check.returncode != 0
    assert "open to other users" in check.stdout and f"{root}:" in check.stdout, check.stdout
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in layer_dirs)
    again = lamina_cmd("system", "check", root=root, check=False)
    assert again.returncode == 0 and "ok" in again.stdout, again.stdout + again.stderr


def test_a_rootless_store_is_private_to_its_user(unpriv_subids: UnprivilegedUser,
                                                 unpriv_nosubids: UnprivilegedUser, tmp_path: Path,
                                                 euid_binary: Path) -> None:
    """User A's store (``--root`` under a directory B can traverse, and the default
    ~/.local/share/lamina) gives user B nothing: not its listing, not a layer's file."""
    owner, other = unpriv_subids, unpriv_nosubids
    tar = owner.workdir / "image.tar"
    hostile_rootfs_tar(tar, euid_binary, device=False)
    tar.chmod(0o644)
    r = owner.lamina("import", str(tar), "mine:1")
    assert r.returncode == 0, r.stderr
    root = owner.workdir / "root"
    readable = [p for p in root.rglob("readable") if p.is_file()]
    assert readable, "the image's file is not in the store"
    for path in readable:
        r = other.run(["cat", str(path)])
        assert r.returncode != 0 and "image content" not in r.stdout, path
    assert other.run(["ls", str(root)]).returncode != 0
    assert other.run(["ls", str(root / "layers")]).returncode != 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    default = owner.lamina("images", env={"LAMINA_ROOT": ""})
    assert default.returncode == 0, default.stderr
    default_root = owner.home / ".local" / "share" / "lamina"
    assert stat.S_IMODE(default_root.stat().st_mode) == 0o700


def test_a_mount_shared_with_allow_other_honours_no_setuid_bit_and_no_device(
        lamina_cmd: Lamina, open_area: Path, unpriv_nosubids: UnprivilegedUser, euid_binary: Path,
        tmp_path: Path) -> None:
    """`lamina mount --allow-other` is the explicit way to let others in: they see the files, but
    the kernel runs the setuid-root probe with their own euid and refuses the device node."""
    root = open_area / "store"
    tar = tmp_path / "hostile.tar"
    hostile_rootfs_tar(tar, euid_binary)
    lamina_cmd("import", str(tar), "hostile:1", root=root)
    mountpoint = open_area / "shared"
    mountpoint.mkdir(mode=0o755)
    lamina_cmd("mount", "--allow-other", "hostile:1", str(mountpoint), root=root)
    try:
        seen = unpriv_nosubids.run(["cat", str(mountpoint / "etc" / "readable")])
        assert seen.stdout == "image content\n", seen.stderr
        ran = unpriv_nosubids.run([str(mountpoint / "opt" / "suid")])
        assert ran.stdout == f"euid={unpriv_nosubids.uid}\n", ran.stdout + ran.stderr
        wrote = unpriv_nosubids.run(["sh", "-c", f"echo x > '{mountpoint / 'dev' / 'open-null'}'"])
        assert wrote.returncode != 0
    finally:
        lamina_cmd("umount", str(mountpoint), root=root)


@pytest.mark.allow_log("the store was open to other users")
def test_tightening_closes_the_content_but_never_a_directory_that_is_not_only_the_store(
        tmp_path: Path) -> None:
    """``--root /tmp`` (sticky, shared) or a root with other files in it keeps its mode; its
    content directories are closed all the same. A directory holding only the store is closed."""
    from lamina.store import private

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "layers").mkdir()
    (shared / "layers").chmod(0o755)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    mixed.chmod(0o755)
    (mixed / "someone-elses-file").write_text("x")
    store_only = tmp_path / "store-only"
    store_only.mkdir()
    (store_only / "lock").write_text("")
    (store_only / "images").mkdir()
    for d in (store_only, store_only / "images"):
        d.chmod(0o755)
    private.tighten(shared)
    private.tighten(mixed)
    private.tighten(store_only)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "layers").stat().st_mode) == 0o700
    assert stat.S_IMODE(mixed.stat().st_mode) == 0o755
    assert stat.S_IMODE(store_only.stat().st_mode) == 0o700
    assert stat.S_IMODE((store_only / "images").stat().st_mode) == 0o700
