"""Layer tar <-> directory: round trips in unionfs's on-disk format, determinism, hostile tarballs."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from lamina.errors import LayerError
from lamina.store.layer_pack import IdMap, pack_layer
from lamina.store.layer_unpack import Limits, unpack_layer, validate
from unionfs.core import ondisk

IS_ROOT = os.geteuid() == 0


def pack(src: Path, compress: bool = False) -> tuple[bytes, str]:
    buf = io.BytesIO()
    result = pack_layer(src, buf, compress=compress, idmap=IdMap())
    return buf.getvalue(), result.diff_id


def unpack(data: bytes, dest: Path, tmp: Path, **kw: object) -> None:
    unpack_layer(io.BytesIO(data), dest, tmp, **kw)  # type: ignore[arg-type]


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.chmod(root / "bin/tool", 0o4755)
    os.symlink("tool", root / "bin/alias")
    os.symlink("/etc/passwd", root / "bin/abs-link")
    os.link(root / "bin/tool", root / "bin/tool-hardlink")
    os.mkfifo(root / "fifo")
    os.chmod(root / "fifo", 0o640)
    (root / "ro-dir").mkdir()
    (root / "ro-dir/inside").write_text("x")
    os.chmod(root / "ro-dir", 0o555)
    (root / "empty").write_bytes(b"")
    # sparse-ish: a big hole then data
    with open(root / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    os.setxattr(root / "etc/passwd", "user.comment", b"kept")
    fd = os.open(root / "bin", os.O_RDONLY)
    try:
        ondisk.make_whiteout(fd, "deleted-file")
    finally:
        os.close(fd)
    (root / "opaque").mkdir()
    ondisk.mark_opaque(str(root / "opaque"))
    (root / "opaque/new").write_text("n")
    for p in [root / "etc/passwd", root / "bin/tool", root / "empty", root / "sparse"]:
        os.utime(p, (1_600_000_000, 1_600_000_000))


def test_round_trip_keeps_content_metadata_and_markers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    data, diff_id = pack(src)
    m = members(data)
    assert "bin/.wh.deleted-file" in m and m["bin/.wh.deleted-file"].size == 0
    assert "opaque/.wh..wh..opq" in m
    assert m["bin/tool-hardlink"].islnk() and m["bin/tool-hardlink"].linkname == "bin/tool"
    assert m["bin/abs-link"].issym() and m["bin/abs-link"].linkname == "/etc/passwd"
    assert m["etc/passwd"].pax_headers.get("SCHILY.xattr.user.comment") == "kept"
    assert m["bin/tool"].mode == 0o4755 and m["etc/passwd"].mtime == 1_600_000_000
    assert m["ro-dir"].mode == 0o555
    assert all(x.uname == "" and x.gname == "" for x in m.values())

    dest = tmp_path / "dest"
    result = unpack_layer(io.BytesIO(gzip.compress(data)), dest, tmp_path / "tmp")
    assert result.diff_id == diff_id and result.compression == "gzip"
    assert (dest / "etc/passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert os.getxattr(dest / "etc/passwd", "user.comment") == b"kept"
    assert os.readlink(dest / "bin/alias") == "tool"
    assert os.stat(dest / "bin/tool").st_ino == os.stat(dest / "bin/tool-hardlink").st_ino
    assert stat.S_IMODE(os.stat(dest / "bin/tool").st_mode) == 0o4755
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)
    assert os.stat(dest / "etc/passwd").st_mtime == 1_600_000_000
    assert os.stat(dest / "sparse").st_size == (8 << 20) + 3
    assert os.stat(dest / "sparse").st_blocks * 512 < 1 << 20, "holes should stay holes"
    assert ondisk.is_opaque_dir(str(dest / "opaque"))
    # Readable inside a user namespace too, where trusted.* xattrs are invisible.
    assert os.getxattr(dest / "opaque", ondisk.USER_OPAQUE, follow_symlinks=False) == b"y"
    wh = dest / "bin/deleted-file"
    assert ondisk.is_whiteout_stat(os.lstat(wh)) if IS_ROOT else (dest / "bin/.wh.deleted-file").exists()
    # Directory -> tar -> directory -> tar is the identity on the bytes.
    again, again_id = pack(dest)
    assert again_id == diff_id and again == data


def test_same_content_gives_same_bytes_and_digest(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a)
    make_tree(b)
    # Different creation order and inode numbers must not matter; mtimes are part of the content.
    for root in (a, b):
        for p in [root / "bin", root / "etc", root / "opaque", root / "ro-dir", root / "bin/alias",
                  root / "bin/abs-link", root / "fifo"]:
            os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    ra = pack_layer(a, buf_a, compress=True, idmap=IdMap())
    rb = pack_layer(b, buf_b, compress=True, idmap=IdMap())
    assert ra.diff_id == rb.diff_id and ra.digest == rb.digest
    assert buf_a.getvalue() == buf_b.getvalue()


def test_both_whiteout_formats_and_opaque_file_export_alike(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / ".wh.gone").write_bytes(b"")  # fuse-overlayfs/OCI style
    (src / "d").mkdir()
    (src / "d" / ondisk.OPAQUE_MARKER).write_bytes(b"")  # opaque as a marker file
    data, _ = pack(src)
    names = list(members(data))
    assert names == [".wh.gone", "d", "d/.wh..wh..opq"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown")
def test_owner_override_wins_over_real_owner_and_chown_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "owned").write_text("x")
    os.chown(src / "owned", 1234, 5678)
    (src / "overridden").write_text("y")
    ondisk.write_owner_override(str(src / "overridden"), ondisk.OwnerOverride(42, 43, 0o2750))
    data, _ = pack(src)
    m = members(data)
    assert (m["owned"].uid, m["owned"].gid) == (1234, 5678)
    assert (m["overridden"].uid, m["overridden"].gid, m["overridden"].mode) == (42, 43, 0o2750)
    dest = tmp_path / "dest"
    unpack(data, dest, tmp_path / "tmp")
    st = os.stat(dest / "overridden")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 43, 0o2750)
    assert ondisk.read_owner_override(str(dest / "overridden")) is None, "root chowns for real"


def test_idmap_maps_own_ids_to_root_and_subids_up() -> None:
    idmap = IdMap(((1000, 0, 1), (100000, 1, 65536)), ((1000, 0, 1), (100000, 1, 65536)))
    assert idmap.uid(1000) == 0 and idmap.uid(100000) == 1 and idmap.uid(100999) == 1000
    assert idmap.uid(5) == 65534, "unmapped ids become nobody"
    assert IdMap().uid(5) == 5


def test_zstd_and_plain_are_detected(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("zstd")
    data, diff_id = pack(src)
    r1 = unpack_layer(io.BytesIO(zstandard.ZstdCompressor().compress(data)), tmp_path / "z", tmp_path / "t")
    r2 = unpack_layer(io.BytesIO(data), tmp_path / "p", tmp_path / "t")
    assert (r1.compression, r2.compression) == ("zstd", None)
    assert r1.diff_id == r2.diff_id == diff_id
    assert (tmp_path / "z/f").read_text() == "zstd"


def test_whiteout_and_directory_of_same_name_in_one_tar_make_an_opaque_dir(tmp_path: Path) -> None:
    data = build_tar([entry("d", tarfile.DIRTYPE), entry(".wh.d"), entry("d/f", data=b"1")])
    unpack(data, tmp_path / "out", tmp_path / "tmp")
    assert ondisk.is_opaque_dir(str(tmp_path / "out/d"))
    assert (tmp_path / "out/d/f").read_bytes() == b"1"


def test_later_entry_replaces_earlier_one(tmp_path: Path) -> None:
    data = build_tar([entry("x", data=b"old"), entry("x", data=b"new"),
                      entry("y", tarfile.DIRTYPE), entry("y/inner", data=b"z"), entry("y", data=b"file now")])
    unpack(data, tmp_path / "out", tmp_path / "tmp")
    assert (tmp_path / "out/x").read_bytes() == b"new"
    assert (tmp_path / "out/y").read_bytes() == b"file now"


# --- hostile tarballs ----------------------------------------------------------------------------


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
          size: int | None = None, dev: tuple[int, int] = (0, 0), mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    info.size = len(data) if size is None else size
    info.devmajor, info.devminor = dev
    return info, data


def build_tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            if info.type == tarfile.REGTYPE and info.size != len(data):
                # A lying header: write the header only, no data.
                buf.write(info.tobuf(fmt))
                continue
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "dotdot": (lambda: build_tar([entry("../escaped", data=b"x")]), "'..'"),
    "dotdot-deep": (lambda: build_tar([entry("a/b/../../../escaped", data=b"x")]), "'..'"),
    "absolute": (lambda: build_tar([entry("/tmp/escaped", data=b"x")]), "absolute"),
    "through-symlink": (lambda: build_tar([entry("link", tarfile.SYMTYPE, linkname="/tmp"),
                                           entry("link/escaped", data=b"x")]), "symlink"),
    "through-relative-symlink": (lambda: build_tar([entry("d", tarfile.DIRTYPE),
                                                    entry("d/up", tarfile.SYMTYPE, linkname="../.."),
                                                    entry("d/up/escaped", data=b"x")]), "symlink"),
    "dir-replaced-by-symlink": (lambda: build_tar([entry("d", tarfile.DIRTYPE),
                                                   entry("d", tarfile.SYMTYPE, linkname="/tmp"),
                                                   entry("d/escaped", data=b"x")]), "symlink"),
    "hardlink-outside": (lambda: build_tar([entry("h", tarfile.LNKTYPE, linkname="../../etc/passwd")]), "'..'"),
    "hardlink-absolute": (lambda: build_tar([entry("h", tarfile.LNKTYPE, linkname="/etc/passwd")]),
                          "outside the layer"),
    "hardlink-missing": (lambda: build_tar([entry("h", tarfile.LNKTYPE, linkname="nothing")]), "missing target"),
    "hardlink-through-symlink": (lambda: build_tar([entry("s", tarfile.SYMTYPE, linkname="/etc"),
                                                    entry("h", tarfile.LNKTYPE, linkname="s/passwd")]),
                                 "missing target"),
    "absurd-size": (lambda: build_tar([entry("big", size=1 << 45)]), "absurd size|past the end"),
    "lying-size": (lambda: build_tar([entry("big", size=10 << 20)]), "past the end|end of data"),
    "below-file": (lambda: build_tar([entry("f", data=b"x"), entry("f/g", data=b"y")]), "non-directory"),
    "bad-whiteout": (lambda: build_tar([entry(".wh...")]), "malformed whiteout"),
    "not-a-tar": (lambda: b"this is not a tar archive at all" * 40, "tar"),
    "corrupt-gzip": (lambda: gzip.compress(build_tar([entry("f", data=b"x" * 1000)]))[:60], "corrupt"),
}
if not IS_ROOT:
    HOSTILE["device-unprivileged"] = (lambda: build_tar([entry("dev/sda", tarfile.BLKTYPE, dev=(8, 0))]),
                                      "cannot be created")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    make, expected = HOSTILE[case]
    data = make()
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = sandbox / "layer"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(LayerError, match=expected):
        unpack(data, dest, sandbox / "tmp")
    assert not dest.exists(), "a refused layer must leave no directory"
    assert not list((sandbox / "tmp").iterdir()), "temporary files must be removed"
    after = sorted(p.name for p in tmp_path.rglob("*") if p.name != "tmp")
    assert after == [n for n in before if n != "tmp"]
    assert not Path("/tmp/escaped").exists()


def test_device_nodes_are_accepted_by_the_validator() -> None:
    # Created for real by root, kept as placeholders otherwise (tests/test_builder_fidelity.py).
    info, _ = entry("dev/null", tarfile.CHRTYPE, dev=(1, 3))
    info.offset_data = 512
    assert validate([info], 1 << 20, Limits()).ops


def test_decompression_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    data = gzip.compress(build_tar([entry("zeros", data=bytes(8 << 20))]))
    with pytest.raises(LayerError, match="larger than the limit"):
        unpack(data, tmp_path / "out", tmp_path / "tmp", limits=Limits(max_total_bytes=1 << 20))
    assert not (tmp_path / "out").exists()


def test_expected_diff_id_mismatch_is_refused_before_unpacking(tmp_path: Path) -> None:
    data = build_tar([entry("f", data=b"x")])
    with pytest.raises(LayerError, match="diff_id"):
        unpack(data, tmp_path / "out", tmp_path / "tmp", expected_diff_id="sha256:" + "0" * 64)
    assert not (tmp_path / "out").exists()


def test_private_xattrs_in_a_tar_are_not_applied(tmp_path: Path) -> None:
    info, data = entry("d", tarfile.DIRTYPE)
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                        "SCHILY.xattr.user.containers.override_stat": "0:0:04755"}
    unpack(build_tar([(info, data)]), tmp_path / "out", tmp_path / "tmp")
    assert ondisk.read_redirect(str(tmp_path / "out/d")) is None
    assert ondisk.read_owner_override(str(tmp_path / "out/d")) is None


@pytest.mark.skipif(not IS_ROOT or not shutil.which("unshare"), reason="needs root and unshare")
def test_root_of_a_user_namespace_records_owners_instead_of_chowning(tmp_path: Path) -> None:
    """The runner commits inside a user namespace: layers must stay owned by the real user."""
    info, payload = entry("by1234", data=b"y", mode=0o600)
    info.uid = info.gid = 1234
    data = build_tar([(info, payload), entry("by0", data=b"z")])
    (tmp_path / "layer.tar").write_bytes(data)
    script = ("import sys; from pathlib import Path; from lamina.store.layer_unpack import unpack_layer; "
              "unpack_layer(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))")
    subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script,
                    str(tmp_path / "layer.tar"), str(tmp_path / "out"), str(tmp_path / "tmp")],
                   check=True, cwd=Path(__file__).resolve().parent.parent)
    st = os.stat(tmp_path / "out/by1234")
    assert (st.st_uid, st.st_gid) == (0, 0), "not chowned to an id only the namespace maps"
    assert ondisk.read_owner_override(str(tmp_path / "out/by1234")) == ondisk.OwnerOverride(1234, 1234, 0o600)
    assert ondisk.read_owner_override(str(tmp_path / "out/by0")) is None


def test_non_utf8_long_and_unicode_names_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), b"caf\xe9-latin1"), "w") as f:
        f.write("x")
    (src / ("long" * 40)).write_text("y")
    (src / "ünïcode").write_text("z")
    data, diff_id = pack(src)
    unpack(data, tmp_path / "dst", tmp_path / "tmp")
    assert sorted(os.listdir(os.fsencode(tmp_path / "dst"))) == sorted(os.listdir(os.fsencode(src)))
    assert pack(tmp_path / "dst")[1] == diff_id


@pytest.mark.skipif(not IS_ROOT, reason="security.* xattrs need root")
def test_file_capabilities_survive_unpack_and_pack(tmp_path: Path) -> None:
    """chown clears security.capability, so it must be applied after the owner."""
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    info, data = entry("bin/ping", data=b"\x7fELF", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                        "hdrcharset": "BINARY"}
    unpack(build_tar([(info, data)]), tmp_path / "out", tmp_path / "tmp")
    assert os.getxattr(tmp_path / "out/bin/ping", "security.capability") == cap
    packed, _ = pack(tmp_path / "out")
    header = members(packed)["bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert header.encode("utf-8", "surrogateescape") == cap


def test_a_failing_sink_stops_packing_with_its_error(tmp_path: Path) -> None:
    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    (tmp_path / "big").write_bytes(os.urandom(3 << 20))
    with pytest.raises(OSError, match="No space left"):
        pack_layer(tmp_path, Full(), compress=True, idmap=IdMap())  # type: ignore[arg-type]


def test_tar_stream_writes_what_tarfile_writes() -> None:
    """The packer's own tar writer is byte for byte tarfile's PAX writer (the layer digests rely on it)."""
    from lamina.store.layer_pack import _TarStream
    from lamina.store.blobs import HashingWriter

    entries = []
    for name, size, extra in [("etc", None, {}), ("etc/short", 0, {}), ("etc/odd", 513, {}),
                              ("d/" + "x" * 150, 10, {}), ("caf\u00e9/\udcff", 3, {}),
                              ("etc/xattr", 1, {"SCHILY.xattr.user.k": "v"}), ("big-uid", 2, {})]:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE if size is None else tarfile.REGTYPE
        info.size, info.mode, info.mtime, info.uname, info.gname = size or 0, 0o640, 1_700_000_000, "", ""
        info.uid = 2**24 if name == "big-uid" else 1000
        info.pax_headers = extra
        entries.append((info, bytes(range(256)) * 3 if size else b""))
    link = tarfile.TarInfo("etc/link")
    link.type, link.linkname, link.uname, link.gname = tarfile.SYMTYPE, "y" * 120, "", ""
    entries.append((link, b""))
    expected = io.BytesIO()
    with tarfile.TarFile(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                         errors="surrogateescape") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data[:info.size]) if info.isreg() else None)
    mine = io.BytesIO()
    stream = _TarStream(HashingWriter(mine))  # type: ignore[arg-type]
    for info, data in entries:
        stream.addfile(info, io.BytesIO(data[:info.size]) if info.isreg() else None)  # type: ignore[arg-type]
    stream.close()
    assert mine.getvalue() == expected.getvalue()


def test_plain_header_fast_path_is_tarfiles_header() -> None:
    import random

    from lamina.store.layer_pack import _plain_ustar_header

    rng = random.Random(15)
    kinds = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]
    fast = 0
    for _ in range(3000):
        name = "".join(rng.choice("ab/.") for _ in range(rng.randint(1, 110)))
        info = tarfile.TarInfo(name + "é" if rng.random() < 0.1 else name)
        info.type = rng.choice(kinds)
        info.uname = info.gname = ""
        info.linkname = "t" * rng.choice([0, 5, 100, 101]) if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        info.uid, info.gid = rng.choice([0, 1000, 8**7 - 1, 8**7]), rng.choice([0, 65534, 8**7])
        info.mode = rng.choice([0o644, 0o4755, 0o170777])
        info.size = rng.choice([0, 1, 8**11 - 1, 8**11]) if info.type == tarfile.REGTYPE else 0
        info.mtime = rng.choice([0, 1_700_000_000, 8**11, -1])
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        mine = _plain_ustar_header(info)
        if mine is not None:
            fast += 1
            assert mine == expected, info.name
    assert fast > 300  # the fast path is taken for the common entries
