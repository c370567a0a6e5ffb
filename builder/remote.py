"""``ADD URL``: a remote file fetched once per step, with BuildKit's rules (source/http).

- The file's name: the destination's when it names a file; else the ``Content-Disposition``
  filename (its base name); else the last component of the URL's path; else ``download``.
- Its time: the server's ``Last-Modified``, else the Unix epoch; its mode 0600 unless ``--chmod``.
- The step's cache key holds the content's sha256, the name and the ``Last-Modified`` time, so a
  rebuild downloads again but reuses the cache when the server gives the same file (with
  ``--checksum``, the given digest stands for the content and nothing is fetched on a hit).

The server is untrusted: the download has a 60 s timeout for each network operation, the
low-speed limit of ``pull`` and the layer size cap, and goes to the store's ``tmp/``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lamina.bounded import describe_size

if TYPE_CHECKING:
    from builder.instructions import Instruction
    from builder.workspace import Workspace

TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Download:
    path: Path
    filename: str
    mtime: int  # seconds since the epoch (Last-Modified, else 0)
    digest: str  # "sha256:..."

    def cache_text(self) -> str:
        return f"{self.digest} name={self.filename} mtime={self.mtime}"


def file_name(url: str, content_disposition: str | None) -> str:
    """BuildKit's getFileName without a manual name: Content-Disposition, URL path, ``download``."""
    if content_disposition:
        header = Message()
        header["Content-Disposition"] = content_disposition
        given = header.get_param("filename", header="Content-Disposition")
        if isinstance(given, str) and given and not given.endswith("/"):
            base = posixpath.basename(given.replace("\\", "/"))
            if base not in ("", ".", ".."):
                return base
    base = posixpath.basename(urlparse(url).path)
    return base if base not in ("", ".", "..", "/") else "download"


class Downloads:
    """The current step's remote files: each URL fetched on first use, then reused, until
    :meth:`release` removes them (when the step ends)."""

    def __init__(self, workspace: Workspace) -> None:
        self._workspace = workspace
        self._found: dict[str, Download] = {}
        self._dirs: list[Path] = []

    def fetch(self, url: str, inst: Instruction) -> Download:
        """The step's copy of ``url``; errors name ``inst``'s line."""
        found = self._found.get(url)
        if found is not None:
            return found
        directory = self._workspace.new_temp_dir("url")
        self._dirs.append(directory)
        download = _download(url, directory / "content", inst)
        self._found[url] = download
        return download

    @property
    def pending(self) -> bool:
        return bool(self._dirs)

    def release(self) -> None:
        """Forget the step's downloads and remove their files."""
        self._found.clear()
        for directory in self._dirs:
            self._workspace.cleaner.mark_plain(directory)
            self._workspace.cleaner.remove(directory)
        self._dirs.clear()


def _download(url: str, target: Path, inst: Instruction) -> Download:
    from lamina.store.layer_unpack import Limits
    from lamina.store.registry import LowSpeedLimit

    digest = hashlib.sha256()
    limit = Limits().max_total_bytes
    speed = LowSpeedLimit.from_environment().watch(f"ADD failed: downloading {url}")
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, \
                open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            while chunk := response.read1(1 << 20):
                speed.received(len(chunk))
                received += len(chunk)
                if received > limit:
                    raise inst.error(f"ADD failed: {url} is larger than {describe_size(limit)} "
                                     "(set LAMINA_MAX_LAYER_BYTES to allow more)")
                digest.update(chunk)
                f.write(chunk)
            modified = response.headers.get("Last-Modified")
            name = file_name(url, response.headers.get("Content-Disposition"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise inst.error(f"ADD failed: cannot download {url}: {e}") from None
    mtime = 0
    if modified:
        try:
            mtime = int(parsedate_to_datetime(modified).timestamp())
        except (TypeError, ValueError, OverflowError):
            mtime = 0
    return Download(target, name, mtime, "sha256:" + digest.hexdigest())


def check(download: Download, url: str, checksum: str | None, inst: Instruction) -> None:
    """``--checksum``: the content must have that digest (one line naming the Dockerfile's line)."""
    if checksum is not None and download.digest != checksum:
        raise inst.error(f"ADD failed: checksum mismatch for {url}: expected {checksum}, "
                         f"got {download.digest}")
