"""Content-addressed blobs (``blobs/sha256/<hex>``), written atomically and verified on the way in.

Every blob is written to a temporary file under ``<root>/tmp`` (same filesystem as the blobs),
hashed while it is written, fsynced, checked against the expected digest, and only then renamed to
its final name; the directory is fsynced after the rename. A crash at any point therefore leaves at
most an orphaned temporary file (removed by the next ``system check`` or ``system prune``), never a
blob whose content does not match its name.

Temporary names start with the writer's pid, so a cleaner can tell a crashed writer's leftovers from
a live writer's work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lamina.errors import FormatError, StoreError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")

Progress = Callable[[int], None]


def digest_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; raises FormatError for anything else (never a path)."""
    m = DIGEST_RE.match(digest)
    if not m:
        raise FormatError(f"unsupported or malformed digest: {digest!r}")
    return m.group(1)


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(tmp_dir: Path, suffix: str) -> Path:
    """A fresh name under ``tmp_dir`` that records our pid (see :func:`remove_stale_temps`)."""
    return tmp_dir / f"{os.getpid()}.{secrets.token_hex(6)}.{suffix}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(tmp_dir: Path, remove: Callable[[Path], None] | None = None) -> int:
    """Remove temporary entries whose writer has died; return how many were removed.

    ``remove`` deletes one entry (default :func:`remove_tree`); the runner passes one that falls back
    to a user namespace for files of subordinate ids."""
    removed = 0
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        pid_text = entry.name.split(".", 1)[0]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or pid_alive(int(pid_text))):
            continue
        try:
            (remove or remove_tree)(Path(entry.path))
        except OSError as e:
            # e.g. a crashed build's upper with files only a user namespace may remove: leave it
            # rather than fail the command that merely tidies up.
            log.info("cannot remove stale temporary %s: %s", entry.path, e.strerror or e)
            continue
        removed += 1
    return removed


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree, even one with read-only directories inside."""
    def make_writable_and_retry(func: Callable[..., object], p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
        if func in (os.open, os.scandir):
            # A directory that could not be entered: now that it is 0700, remove it whole (or say
            # why not, when it is somebody else's).
            if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
            shutil.rmtree(p, onerror=make_writable_and_retry)
            return
        func(p)

    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, onerror=make_writable_and_retry)


class HashingWriter:
    """A write-only file object that hashes what passes through and forwards it to ``sink``."""

    def __init__(self, sink: BinaryIO | HashingWriter | None) -> None:
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hasher.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def tell(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


class BlobStore:
    """``<directory>/<hex>``, with temporary files under ``tmp_dir`` (see :class:`lamina.layout.Layout`)."""

    def __init__(self, directory: Path, tmp_dir: Path) -> None:
        self.dir = directory
        self.tmp_dir = tmp_dir

    def path(self, digest: str) -> Path:
        return self.dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store (run `lamina system check`)") from None

    def all_digests(self) -> Iterator[str]:
        try:
            for entry in os.scandir(self.dir):
                if re.fullmatch(r"[0-9a-f]{64}", entry.name):
                    yield "sha256:" + entry.name
        except FileNotFoundError:
            return

    @contextlib.contextmanager
    def writer(self, expected_digest: str | None = None) -> Iterator[HashingWriter]:
        """Write a blob through the yielded writer; on clean exit it is verified and published.

        Resource handling: the temporary file is removed on any error. ``writer.digest`` holds the
        digest after the block. Error handling: a digest that does not match ``expected_digest``
        raises :class:`FormatError` and nothing is published.
        """
        if expected_digest is not None:
            digest_hex(expected_digest)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(self.tmp_dir, "blob")
        f = open(tmp, "xb")  # closed below on every path
        try:
            w = HashingWriter(f)
            yield w
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if expected_digest is not None and w.digest != expected_digest:
                raise FormatError(f"digest mismatch: expected {expected_digest}, got {w.digest}")
            self._publish(tmp, w.digest)
        finally:
            if not f.closed:
                # Closing flushes, and on a full disk fails again: the unlink below must still run.
                with contextlib.suppress(OSError):
                    f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _publish(self, tmp: Path, digest: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path(digest)
        if final.exists():
            return  # content-addressed: an existing blob with this name has this content
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)
        fsync_dir(self.dir)

    def put_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        with self.writer(expected_digest) as w:
            w.write(data)
        return w.digest

    def ingest(self, source: BinaryIO | Path | str, expected_digest: str | None = None,
               progress: Progress | None = None) -> str:
        """Copy a stream or a file into the store, verifying ``expected_digest``; return the digest."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.parent.resolve() == self.tmp_dir.resolve() and path.is_file() and not path.is_symlink():
                return self._adopt(path, expected_digest, progress)
            with open(path, "rb") as f:
                return self.ingest(f, expected_digest, progress)
        with self.writer(expected_digest) as w:
            while chunk := source.read(CHUNK):
                w.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        return w.digest

    def _adopt(self, path: Path, expected_digest: str | None, progress: Progress | None) -> str:
        """Publish a file already in our tmp directory by renaming it (no copy); it is consumed.

        It is hashed and fsynced first, so what lands under the digest's name is exactly that content.
        """
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                if progress is not None:
                    progress(len(chunk))
            os.fsync(f.fileno())
        digest = "sha256:" + h.hexdigest()
        if expected_digest is not None and digest != expected_digest:
            raise FormatError(f"digest mismatch: expected {expected_digest}, got {digest}")
        self._publish(path, digest)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still there only when an identical blob was already stored
        return digest

    def verify(self, digest: str) -> bool:
        return sha256_file(self.path(digest)) == digest

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
