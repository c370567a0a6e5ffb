"""The pyfuse3 adapter's handlers called directly (no kernel mount), inside trio."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from unionfs.core import UnionFS
from unionfs.copy_ups import THREAD_COPY_BYTES
from unionfs.fuse_ops import UnionOperations

CTX: Any = SimpleNamespace(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)


def fields(**kw: bool) -> Any:
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


@pytest.fixture
def ops(tmp_path: Path) -> UnionOperations:
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "dir").mkdir()
    (lower / "dir" / "file").write_text("lower data")
    with open(lower / "big", "wb") as f:
        f.write(b"B" * (THREAD_COPY_BYTES * 4))
    os.setxattr(lower / "dir" / "file", "user.kept", b"1")
    return UnionOperations(UnionFS([str(lower)], str(upper), str(work), layer_xattr=True))


def run(fn: Any) -> Any:
    return trio.run(fn)


def test_lookup_getattr_and_negative_entries(ops: UnionOperations) -> None:
    async def main() -> None:
        d = await ops.lookup(pyfuse3.ROOT_INODE, b"dir", CTX)
        assert stat.S_ISDIR(d.st_mode) and d.st_ino != pyfuse3.ROOT_INODE
        f = await ops.lookup(d.st_ino, b"file", CTX)
        assert f.st_size == len("lower data")
        again = await ops.getattr(f.st_ino, CTX)
        assert again.st_ino == f.st_ino
        missing = await ops.lookup(d.st_ino, b"nope", CTX)
        assert missing.st_ino == 0  # a cached negative entry, not an error
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(d.st_ino, b"x" * 256, CTX)
        assert e.value.errno == errno.ENAMETOOLONG
        node = ops.core.node(f.st_ino)
        assert node.lookups == 1
        await ops.forget([(f.st_ino, 1)])
        assert ops.core.table.get(f.st_ino) is None

    run(main)


def test_create_write_read_setattr(ops: UnionOperations) -> None:
    async def main() -> None:
        info, attrs = await ops.create(pyfuse3.ROOT_INODE, b"new", 0o666, os.O_RDWR, CTX)
        assert stat.S_IMODE(attrs.st_mode) == 0o644  # the caller's umask applies
        assert await ops.write(info.fh, 0, b"hello world") == 11
        assert await ops.read(info.fh, 6, 100) == b"world"
        a = pyfuse3.EntryAttributes()
        a.st_size = 5
        a.st_mode = stat.S_IFREG | 0o600
        out = await ops.setattr(attrs.st_ino, a, fields(update_size=True, update_mode=True), info.fh, CTX)
        assert out.st_size == 5 and stat.S_IMODE(out.st_mode) == 0o600
        await ops.release(info.fh)
        assert not ops.files

    run(main)


def test_write_open_copies_up_and_read_open_does_not(ops: UnionOperations, tmp_path: Path) -> None:
    async def main() -> None:
        d = await ops.lookup(pyfuse3.ROOT_INODE, b"dir", CTX)
        f = await ops.lookup(d.st_ino, b"file", CTX)
        ro = await ops.open(f.st_ino, os.O_RDONLY, CTX)
        assert not (tmp_path / "upper" / "dir").exists()
        assert await ops.getxattr(f.st_ino, b"user.lamina.layer", CTX) == f"lower:0:{tmp_path / 'lower'}".encode()
        rw = await ops.open(f.st_ino, os.O_WRONLY, CTX)
        assert (tmp_path / "upper" / "dir" / "file").exists()
        await ops.write(rw.fh, 0, b"UPPER")
        # the read-only handle opened before the copy-up now reads the upper copy
        assert await ops.read(ro.fh, 0, 5) == b"UPPER"
        assert await ops.getxattr(f.st_ino, b"user.lamina.layer", CTX) == b"upper"
        assert await ops.getxattr(f.st_ino, b"user.kept", CTX) == b"1"
        names = await ops.listxattr(f.st_ino, CTX)
        assert b"user.kept" in names and b"user.lamina.layer" in names
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.setxattr(f.st_ino, b"user.lamina.layer", b"x", CTX)
        assert e.value.errno == errno.EPERM
        await ops.release(ro.fh)
        await ops.release(rw.fh)

    run(main)


def test_big_copy_up_runs_in_a_thread_and_truncation_copies_nothing(ops: UnionOperations, tmp_path: Path) -> None:
    async def main() -> None:
        big = await ops.lookup(pyfuse3.ROOT_INODE, b"big", CTX)
        h = await ops.open(big.st_ino, os.O_WRONLY, CTX)
        assert not (tmp_path / "upper" / "big").exists()  # deferred: O_TRUNC may follow
        a = pyfuse3.EntryAttributes()
        a.st_size = 0
        await ops.setattr(big.st_ino, a, fields(update_size=True), h.fh, CTX)
        assert (tmp_path / "upper" / "big").stat().st_size == 0
        await ops.write(h.fh, 0, b"new")
        await ops.release(h.fh)
        assert (tmp_path / "upper" / "big").read_bytes() == b"new"

    run(main)


def test_concurrent_requests_during_a_big_copy_up(tmp_path: Path, ops: UnionOperations) -> None:
    done: list[str] = []

    async def main() -> None:
        big = await ops.lookup(pyfuse3.ROOT_INODE, b"big", CTX)
        h = await ops.open(big.st_ino, os.O_RDWR, CTX)

        async def writer() -> None:
            await ops.write(h.fh, 0, b"X")  # copies 4 MiB up in a worker thread
            done.append("write")

        async def reader() -> None:
            await ops.getattr(pyfuse3.ROOT_INODE, CTX)
            done.append("getattr")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(0)
            nursery.start_soon(reader)
        assert await ops.read(h.fh, 0, 2) == b"XB"
        await ops.release(h.fh)

    run(main)
    assert done == ["getattr", "write"]


@pytest.mark.allow_log(r"unexpected error in lookup")
def test_unexpected_error_is_eio_and_turns_on_fail_safe(ops: UnionOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*a: object) -> None:
        raise RuntimeError("bug")

    async def main() -> None:
        monkeypatch.setattr(ops.core, "lookup", broken)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(pyfuse3.ROOT_INODE, b"dir", CTX)
        assert e.value.errno == errno.EIO
        assert ops.failed
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, CTX)
        assert e.value.errno == errno.EIO

    run(main)


def test_rename_and_unlink_through_handlers(ops: UnionOperations, tmp_path: Path) -> None:
    async def main() -> None:
        await ops.rename(pyfuse3.ROOT_INODE, b"dir", pyfuse3.ROOT_INODE, b"dir2", 0, CTX)
        d2 = await ops.lookup(pyfuse3.ROOT_INODE, b"dir2", CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.rmdir(pyfuse3.ROOT_INODE, b"dir2", CTX)
        assert e.value.errno == errno.ENOTEMPTY
        await ops.unlink(d2.st_ino, b"file", CTX)
        await ops.rmdir(pyfuse3.ROOT_INODE, b"dir2", CTX)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.unlink(pyfuse3.ROOT_INODE, b"dir2", CTX)
        assert e.value.errno == errno.ENOENT
        st = await ops.statfs(CTX)
        assert st.f_namemax == 255

    run(main)


def test_listing_gives_bare_entries_only_for_numbers_that_come_back(
        ops: UnionOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare entry holds no lookup, so its node may be dropped and made again: a node whose
    number comes from the private counter (it would not come back) is listed with true attributes
    and a counted lookup, so that the listing's d_ino stays its st_ino."""
    if ops.cache.make_bare is None:
        pytest.skip("bare entries are not available here")
    sent: dict[bytes, int] = {}

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        sent[name] = attr.st_ino  # the node id: 0 for a bare entry
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def listing() -> dict[bytes, int]:
        sent.clear()
        fh = await ops.opendir(ops.core.root.ino, CTX)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        return dict(sent)

    first = trio.run(listing)
    assert first[b"big"] == 0  # bare
    node = ops.core.root.children["big"]  # type: ignore[index]
    table = ops.core.table
    del table.by_ino[node.ino]
    node.ino = (0xFFFF << 48) + 12345  # as if its identity's number had been taken
    table.by_ino[node.ino] = node
    second = trio.run(listing)
    assert second[b"big"] == node.ino and node.lookups == 1
