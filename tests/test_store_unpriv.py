"""The store as an unprivileged user: import, images, save, load. Owners that cannot be chowned land
in the owner-override xattr, and exported tar headers carry container ids (uid 0, not the user's)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from unionfs.core import ondisk

pytestmark = pytest.mark.unprivileged


def rootfs_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, uid, mode, data in [("bin/tool", 0, 0o4755, b"tool"), ("home/u/own", 1000, 0o600, b"u"),
                                      ("etc/shadow", 0, 0o000, b"secret")]:
            info = tarfile.TarInfo(name)
            info.uid = info.gid = uid
            info.mode = mode
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        # A static busybox, so a container of this image can look at itself.
        tar.add("/bin/busybox", "bin/busybox")
        link = tarfile.TarInfo("bin/stat")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)
        d = tarfile.TarInfo("home/u")
        d.type = tarfile.DIRTYPE
        d.uid = d.gid = 1000
        d.mode = 0o700
        tar.addfile(d)


def headers(archive: Path, layer_suffix: str = "layer.tar") -> dict[str, tarfile.TarInfo]:
    result: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if member.name.endswith(layer_suffix):
                f = outer.extractfile(member)
                assert f is not None
                with tarfile.open(fileobj=io.BytesIO(f.read())) as layer:
                    result.update({m.name: m for m in layer.getmembers()})
    return result


def test_import_images_save_load_as_a_normal_user(unpriv: object, tmp_path: Path) -> None:
    user = unpriv
    work: Path = user.workdir  # type: ignore[attr-defined]
    tar = work / "rootfs.tar"
    rootfs_tar(tar)
    user.chown_tree(tar)  # type: ignore[attr-defined]

    def lamina(*args: str) -> str:
        result = user.lamina(*args)  # type: ignore[attr-defined]
        assert result.returncode == 0, f"lamina {args}: {result.stderr}"
        assert "Traceback" not in result.stderr
        return str(result.stdout)

    image_id = lamina("import", str(tar), "mine:1", "-c", "CMD /bin/tool").strip()
    assert image_id.startswith("sha256:")
    listing = lamina("images")
    assert "mine" in listing and image_id[7:19] in listing
    layer_dir = Path(json.loads(lamina("inspect", "mine:1"))[0]["GraphDriver"]["Data"]["LowerDir"])
    # The user could not chown: the intended owners are in the xattr; the files are the user's.
    own = layer_dir / "home/u/own"
    assert os.stat(own).st_uid == user.uid  # type: ignore[attr-defined]
    assert ondisk.read_owner_override(str(own)) == ondisk.OwnerOverride(1000, 1000, 0o600)
    shadow = ondisk.read_owner_override(str(layer_dir / "etc/shadow"))
    assert shadow == ondisk.OwnerOverride(0, 0, 0o000), "mode 000 kept in the override, file stays readable"

    # What the store recorded is what a container sees (the runner serves the layer through unionfs).
    # Without subordinate ids only one id is mapped: like podman (ignore_chown_errors), unionfs then
    # shows other owners as root, so the container's root can still enter a 0700 home.
    seen = user.lamina("run", "--rm", "mine:1", "stat", "-c", "%u:%g %a", "/home/u/own", "/bin/tool")  # type: ignore[attr-defined]
    assert seen.returncode == 0, seen.stderr
    first = "1000:1000 600" if user.has_subids else "0:0 600"  # type: ignore[attr-defined]
    assert seen.stdout.split("\n")[:2] == [first, "0:0 4755"]

    for fmt, suffix in (("docker-archive", "layer.tar"),):
        archive = work / f"saved-{fmt}.tar"
        lamina("save", "--format", fmt, "-o", str(archive), "mine:1")
        h = headers(archive, suffix)
        assert (h["bin/tool"].uid, h["bin/tool"].mode) == (0, 0o4755)
        assert (h["home/u/own"].uid, h["home/u/own"].gid, h["home/u/own"].mode) == (1000, 1000, 0o600)
        assert (h["home/u"].uid, h["home/u"].mode) == (1000, 0o700)
        assert (h["etc/shadow"].uid, h["etc/shadow"].mode) == (0, 0o000)
        assert {m.uid for m in h.values()} <= {0, 1000}, "never the user's own uid"
        oci = work / "saved-oci.tar"
        lamina("save", "--format", "oci-archive", "-o", str(oci), "mine:1")
        for source in (archive, oci):
            root2 = work / f"root-{source.stem}"
            out = user.lamina("--root", str(root2), "load", "-i", str(source))  # type: ignore[attr-defined]
            assert out.returncode == 0 and "Loaded image: mine:1" in out.stdout, out.stderr
            check = user.lamina("--root", str(root2), "system", "check")  # type: ignore[attr-defined]
            assert check.returncode == 0, check.stdout + check.stderr

    # The embedded base is built unprivileged too, and its files are root's in the image.
    base_archive = work / "base.tar"
    lamina("save", "-o", str(base_archive), "lamina/busybox")
    assert {m.uid for m in headers(base_archive).values()} == {0}

    # A device node the user cannot create is kept (as containers/storage keeps it in rootless
    # storage): the image imports, checks clean and saves the real node again.
    dev_tar = work / "dev.tar"
    with tarfile.open(dev_tar, "w") as t:
        info = tarfile.TarInfo("dev/sda")
        info.type = tarfile.BLKTYPE
        info.devmajor, info.devminor = 8, 0
        t.addfile(info)
    user.chown_tree(dev_tar)  # type: ignore[attr-defined]
    kept = user.lamina("import", str(dev_tar), "dev:1")  # type: ignore[attr-defined]
    assert kept.returncode == 0, kept.stderr
    check = user.lamina("system", "check")  # type: ignore[attr-defined]
    assert check.returncode == 0, check.stdout + check.stderr
    dev_saved = work / "dev-saved.tar"
    lamina("save", "-o", str(dev_saved), "dev:1")
    node = headers(dev_saved)["dev/sda"]
    assert (node.type, node.devmajor, node.devminor) == (tarfile.BLKTYPE, 8, 0)
