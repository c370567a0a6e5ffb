"""``lamina build -``: the build context, or the Dockerfile alone, from standard input (docker's form).

docker reads standard input as a tar archive (plain, gzip, bzip2 or xz) holding the context with its
Dockerfile, or, when it is not an archive, as a Dockerfile and no context at all. The archive is
hostile like any other: it is read with a limit, and extracted only into a fresh private directory,
member by member, refusing absolute names, ``..``, a member under a symlink and links that leave
the context; device nodes and fifos are skipped (a context has no use for them). Owners are not
kept: COPY gives root the files unless ``--chown`` says otherwise.

Resource handling: :func:`open_stdin_context` owns the temporary directory it extracts into and
removes it when its block ends.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import posixpath
import secrets
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lamina.bounded import TEXT_LIMIT, InputTooLarge, describe_size
from lamina.errors import UsageError

# A context larger than this is refused (docker's own has no limit; this keeps /dev/zero out).
MAX_CONTEXT_BYTES = int(os.environ.get("LAMINA_MAX_CONTEXT_BYTES", str(8 << 30)))
MAX_MEMBERS = 1_000_000
READ_SIZE = 1 << 20


@contextlib.contextmanager
def open_stdin_context(stream: IO[bytes], tmp_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """The context read from ``stream``: ``(directory, None)`` for an archive, ``(empty directory,
    Dockerfile text)`` for anything else. Error handling: UsageError (one line) for input too
    large or an archive member that would leave the context."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    work = tmp_dir / f"{os.getpid()}.{secrets.token_hex(6)}.context"
    work.mkdir(mode=0o700)
    try:
        raw = work / "stdin"
        _copy_limited(stream, raw)
        context = work / "context"
        context.mkdir(mode=0o755)
        if _is_archive(raw):
            _extract(raw, context)
            raw.unlink()
            yield context, None
        else:
            if raw.stat().st_size > TEXT_LIMIT:
                raise UsageError(f"Dockerfile from standard input: larger than {describe_size(TEXT_LIMIT)}")
            text = raw.read_bytes().decode("utf-8", "surrogateescape")
            raw.unlink()
            yield context, text
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_limited(stream: IO[bytes], path: Path) -> None:
    total = 0
    with open(path, "xb") as out:
        while chunk := stream.read(READ_SIZE):
            total += len(chunk)
            if total > MAX_CONTEXT_BYTES:
                raise UsageError(str(InputTooLarge("build context from standard input", MAX_CONTEXT_BYTES)))
            out.write(chunk)


def _is_archive(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def _extract(path: Path, root: Path) -> None:
    """Extract the archive at ``path`` into the empty directory ``root``, member by member."""
    extracted = members = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # type: ignore[attr-defined]  # no index kept: memory stays flat
                members += 1
                extracted += member.size if member.isreg() else 0
                if extracted > MAX_CONTEXT_BYTES:
                    raise UsageError(str(InputTooLarge("build context from standard input", MAX_CONTEXT_BYTES)))
                if members > MAX_MEMBERS:
                    raise UsageError(f"build context from standard input: more than {MAX_MEMBERS} entries")
                _extract_member(tar, member, root)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise UsageError(f"build context from standard input: not a valid archive: {e}") from None
    except OSError as e:
        if e.errno is not None:
            raise
        # gzip and bz2 report a damaged stream as an OSError without an errno.
        raise UsageError(f"build context from standard input: not a valid archive: {e}") from None


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    name = posixpath.normpath(member.name.lstrip("/")) if member.name.strip("/") else "."
    if name == "." and member.isdir():
        return
    if name == ".." or name.startswith("../") or name == ".":
        raise UsageError(f"build context from standard input: entry {member.name!r} leaves the context")
    parent = root
    for part in name.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink():
            raise UsageError(f"build context from standard input: entry {member.name!r} is under a symlink")
        if not parent.exists():
            parent.mkdir(mode=0o755)
    target = root / name
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    mode = member.mode & 0o7777
    if member.isdir():
        if not target.exists():
            target.mkdir(mode=0o755)
        os.chmod(target, mode | 0o700)
    elif member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        with source, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
            shutil.copyfileobj(source, out, READ_SIZE)
        os.chmod(target, mode)
    elif member.issym():
        os.symlink(member.linkname, target)
        return
    elif member.islnk():
        linked = posixpath.normpath(member.linkname.lstrip("/"))
        source_path = root / linked
        if linked.startswith("../") or linked == ".." or source_path.is_symlink() or not source_path.is_file():
            raise UsageError(f"build context from standard input: hard link {member.name!r} to "
                             f"{member.linkname!r} does not name a file of the context")
        os.link(source_path, target)
        return
    else:
        return  # devices and fifos: nothing a context needs
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
