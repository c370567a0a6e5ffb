"""A client for the OCI distribution API (the protocol of Docker registries), standard library only.

It deals in bytes, files and digests and knows nothing of the image store: ``lamina.store.transfer``
glues the two together for ``lamina pull`` and ``lamina push``.

Trust. Everything a registry sends is hostile until proven otherwise. Digests are parsed strictly
(``sha256:`` and 64 lowercase hex digits) before any of them can name a file; a blob is streamed into a
temporary file while its sha256 is computed, and the file is handed back only when the digest and
the declared size match; a manifest fetched by digest must hash to that digest, and a manifest fetched
by tag must hash to the ``Docker-Content-Digest`` the registry announces, if it announces one.
Manifests and configs are read into memory only up to a size limit.

Its transport (connections, TLS, proxies, authentication, bounded reads) is
``store.registry_http``; this module is what is asked of the registry.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from lamina.bounded import JSON_LIMIT
from lamina.errors import RegistryError
from lamina.store.platforms import choose_manifest, host_platform, offered
from lamina.store.registry_http import (
    MAX_ERROR_BYTES,
    READ_SIZE,
    LowSpeedLimit,
    Readable,
    RegistrySession,
    SpeedWatch,
    TransientRegistryError,
    parse_www_authenticate,
    proxy_for,
)
from lamina.store.registry_manifest import (
    DOCKER_SCHEMA1,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MAX_CONFIG_BYTES,
    Manifest,
    Platform,
    check_digest,
    manifest_media_type,
    sha256_digest,
)

__all__ = ["LowSpeedLimit", "RegistryClient", "TransientRegistryError", "parse_www_authenticate", "proxy_for"]

log = logging.getLogger(__name__)

# Limits on what we hold in memory; real manifests are a few KiB (containers/image's limits).
MAX_MANIFEST_BYTES = JSON_LIMIT

# Blobs up to this size go up in one PUT; larger ones in PATCH chunks of CHUNK_SIZE.
MONOLITHIC_LIMIT = 32 * 1024 * 1024
CHUNK_SIZE = 16 * 1024 * 1024
# A blob download cut short is resumed (HTTP Range) at most this many times.
MAX_RESUMES = 3
# Image indexes followed through other indexes at most this deep.
MAX_INDEX_DEPTH = 4

# The distribution spec's grammar for repository names and tags.
REPOSITORY_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

ProgressCallback = Callable[[int], None]



class RegistryClient(RegistrySession):
    """One registry host (``host[:port]``), spoken to over the OCI distribution API.

    Resource handling: keeps at most one open HTTP(S) connection, reused across requests;
    :meth:`close` (or leaving a ``with`` block) closes it.

    Error handling: every failure (unreachable host, refused credentials, HTTP error, a wrong
    digest or size) raises :class:`RegistryError` with a one-line message naming the request.
    """

    # ----- manifests -----

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """Fetch a manifest or index by tag or digest, and verify its digest."""
        _check_repository(repository)
        by_digest = reference.startswith("sha256:")
        if by_digest:
            check_digest(reference, "manifest digest")
        elif not TAG_RE.fullmatch(reference):
            raise RegistryError(f"invalid tag {reference!r}")
        response = self._request("GET", f"/v2/{repository}/manifests/{reference}",
                                 scope=f"repository:{repository}:pull", headers={"Accept": MANIFEST_ACCEPT})
        if response.status == 404:
            self._read_limited(response, MAX_ERROR_BYTES)
            raise RegistryError(f"{self.registry}/{repository}:{reference}: manifest unknown")
        if response.status != 200:
            raise self._fail(f"GET manifest {repository}:{reference}", response)
        data = self._read_limited(response, MAX_MANIFEST_BYTES, what=f"manifest {repository}:{reference}")
        digest = sha256_digest(data)
        announced = response.getheader("Docker-Content-Digest")
        if by_digest and digest != reference:
            raise RegistryError(f"registry {self.registry} sent a manifest for {repository}@{reference} "
                                f"whose content has digest {digest}: refused")
        if announced and announced.startswith("sha256:") and announced != digest:
            raise RegistryError(f"registry {self.registry} announced manifest digest {announced} for "
                                f"{repository}:{reference} but the content has digest {digest}: refused")
        media_type = manifest_media_type(data, response.getheader("Content-Type"))
        if media_type in DOCKER_SCHEMA1:
            raise RegistryError(f"{repository}:{reference} is a Docker schema 1 manifest, which lamina does not read")
        if media_type not in IMAGE_MANIFEST_TYPES and media_type not in INDEX_TYPES:
            raise RegistryError(f"{repository}:{reference}: unsupported manifest type {media_type!r}")
        return Manifest(data, media_type, digest)

    def get_image_manifest(self, repository: str, reference: str,
                           want: Platform | None = None) -> tuple[Manifest, Manifest | None]:
        """The image manifest for ``reference``, going through an index to the host's platform.

        Returns ``(manifest, index)``; ``index`` is None when the reference named a manifest directly.
        """
        first = self.get_manifest(repository, reference)
        if not first.is_index:
            return first, None
        manifest = first
        want = want or host_platform()
        # An index may name an index for the platform (as containerd, followed a few levels deep).
        for _depth in range(MAX_INDEX_DEPTH):
            entries = manifest.index().manifests
            entry = choose_manifest(entries, want)
            if entry is None:
                raise RegistryError(f"the image index has no manifest for {want} (it offers: {offered(entries)})")
            manifest = self.get_manifest(repository, entry.digest)
            if not manifest.is_index:
                return manifest, first
        raise RegistryError(f"{repository}:{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep")

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under a tag (or its digest); returns its digest."""
        _check_repository(repository)
        if not reference.startswith("sha256:") and not TAG_RE.fullmatch(reference):
            raise RegistryError(f"invalid tag {reference!r}")
        response = self._request("PUT", f"/v2/{repository}/manifests/{reference}",
                                 scope=f"repository:{repository}:pull,push",
                                 headers={"Content-Type": media_type, "Content-Length": str(len(data))},
                                 body=data)
        if response.status not in (200, 201, 202):
            raise self._fail(f"PUT manifest {repository}:{reference}", response)
        self._read_limited(response, MAX_ERROR_BYTES)
        digest = sha256_digest(data)
        announced = response.getheader("Docker-Content-Digest")
        if announced and announced != digest:
            raise RegistryError(f"registry stored manifest {repository}:{reference} as {announced}, expected {digest}")
        return digest

    # ----- blobs -----

    def has_blob(self, repository: str, digest: str) -> bool:
        """``HEAD`` a blob: True if the registry has it in this repository."""
        _check_repository(repository)
        check_digest(digest)
        response = self._request("HEAD", f"/v2/{repository}/blobs/{digest}",
                                 scope=f"repository:{repository}:pull")
        response.read()
        if response.status == 200:
            return True
        if response.status == 404:
            return False
        raise self._fail(f"HEAD blob {digest}", response)

    def fetch_blob(self, repository: str, digest: str, directory: Path, *, size: int | None = None,
                   max_size: int | None = None, progress: ProgressCallback | None = None) -> Path:
        """Download a blob into a new temporary file under ``directory``, verified; return its path.

        The file is returned only if its sha256 is ``digest`` and, when ``size`` is given, its length is
        ``size``; otherwise it is removed and RegistryError raised. The caller owns the returned file.
        A download cut short is resumed where it stopped (``Range``) up to MAX_RESUMES times, or started
        again when the registry does not do ranges.
        """
        _check_repository(repository)
        check_digest(digest)
        url = f"/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull"
        response = self._request("GET", url, scope=scope)
        if response.status != 200:
            if response.status == 404:
                self._read_limited(response, MAX_ERROR_BYTES)
                raise RegistryError(f"{self.registry}/{repository}: blob {digest} unknown")
            raise self._fail(f"GET blob {digest}", response)
        limit = size if size is not None else max_size
        hasher = hashlib.sha256()
        received = 0
        resumes = 0
        # The store's temporary-file convention: a name starting with our pid, so that a cleaner can
        # tell a crashed pull's leftovers from a live one's.
        path = directory / f"{os.getpid()}.{secrets.token_hex(6)}.pull"
        speed = self.low_speed.watch(f"GET blob {digest} from {self.registry}")
        try:
            with open(path, "xb") as out:
                while True:
                    chunk, interruption = _next_chunk(response, received, speed)
                    if interruption is not None:
                        response.close()
                        self.close()
                        if resumes == MAX_RESUMES or not received:
                            raise TransientRegistryError(f"GET blob {digest}: {interruption}")
                        resumes += 1
                        log.info("download of %s: %s; resuming", digest, interruption)
                        response = self._request("GET", url, scope=scope, headers={"Range": f"bytes={received}-"})
                        if response.status == 206 and (response.getheader("Content-Range") or "").startswith(
                                f"bytes {received}-"):
                            continue
                        if response.status != 200:
                            raise self._fail(f"GET blob {digest} from byte {received}", response)
                        # No ranges here: the whole blob again.
                        out.seek(0)
                        out.truncate()
                        hasher, received = hashlib.sha256(), 0
                        continue
                    if not chunk:
                        break
                    received += len(chunk)
                    if limit is not None and received > limit:
                        raise RegistryError(f"registry {self.registry} sent more than {limit} bytes for blob "
                                            f"{digest}: refused")
                    hasher.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise RegistryError(f"registry {self.registry} sent blob {digest} whose content has digest "
                                    f"{actual}: refused")
            if size is not None and received != size:
                raise RegistryError(f"blob {digest} is {received} bytes, the manifest says {size}: refused")
            return path
        except BaseException:
            path.unlink(missing_ok=True)
            self.close()  # the response may be half read
            raise
        finally:
            response.close()

    def fetch_blob_range(self, repository: str, digest: str, start: int, end: int, *, deadline: float) -> bytes:
        """Bytes ``[start, end)`` of a blob (an HTTP ``Range`` request), all read by ``deadline``
        (a ``time.monotonic()`` value). The caller verifies them: a range has no digest of its own.

        Error handling: RegistryError when the registry does not answer with exactly that range
        (no 206, another Content-Range, fewer bytes); TransientRegistryError when the deadline passes.
        """
        _check_repository(repository)
        check_digest(digest)
        if not 0 <= start < end:
            raise ValueError(f"empty or negative range {start}-{end}")
        what = f"GET blob {digest[7:19]} bytes {start}-{end - 1}"
        response = self._request("GET", f"/v2/{repository}/blobs/{digest}", scope=f"repository:{repository}:pull",
                                 headers={"Range": f"bytes={start}-{end - 1}"})
        try:
            if response.status != 206:
                if response.status == 200:
                    self.close()  # the whole blob is coming: drop it rather than read it
                    raise RegistryError(f"{what}: registry {self.registry} does not serve ranges")
                raise self._fail(what, response)
            content_range = response.getheader("Content-Range") or ""
            if not content_range.startswith(f"bytes {start}-{end - 1}/"):
                self.close()
                raise RegistryError(f"{what}: registry answered range {content_range!r}")
            chunks: list[bytes] = []
            received = 0
            while received < end - start:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise TransientRegistryError(f"{what}: no answer within the deadline")
                if self._conn is not None and self._conn.sock is not None:
                    self._conn.sock.settimeout(left)
                try:
                    chunk = response.read1(min(READ_SIZE, end - start - received))
                except TimeoutError:
                    self.close()
                    raise TransientRegistryError(f"{what}: no answer within the deadline") from None
                except (OSError, http.client.HTTPException) as e:
                    self.close()
                    raise TransientRegistryError(f"{what}: {e}") from None
                if not chunk:
                    self.close()
                    raise TransientRegistryError(f"{what}: connection closed after {received} bytes")
                chunks.append(chunk)
                received += len(chunk)
            if response.length:
                self.close()  # more body than the range: do not read it
            elif self._conn is not None and self._conn.sock is not None:
                self._conn.sock.settimeout(self.timeout)
                response.read()
            return b"".join(chunks)
        finally:
            response.close()

    def fetch_small_blob(self, repository: str, digest: str, directory: Path, *,
                         size: int | None = None, max_size: int = MAX_CONFIG_BYTES) -> bytes:
        """A verified blob small enough to keep in memory (an image config)."""
        path = self.fetch_blob(repository, digest, directory, size=size, max_size=max_size)
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def upload_blob(self, repository: str, digest: str, path: Path, *, mount_from: str | None = None,
                    chunk_size: int = CHUNK_SIZE, monolithic_limit: int = MONOLITHIC_LIMIT,
                    progress: ProgressCallback | None = None) -> bool:
        """Upload the file ``path`` as blob ``digest``: one PUT if small, PATCH chunks if large.

        With ``mount_from`` (another repository on the same registry) the registry is first asked to
        mount the blob from there, which costs no upload when it can. Returns True if it did.
        """
        _check_repository(repository)
        check_digest(digest)
        scope = f"repository:{repository}:pull,push"
        if mount_from:
            _check_repository(mount_from)
            scope += f" repository:{mount_from}:pull"
            query = urllib.parse.urlencode({"mount": digest, "from": mount_from})
        else:
            query = ""
        response = self._request("POST", f"/v2/{repository}/blobs/uploads/" + (f"?{query}" if query else ""),
                                 scope=scope, headers={"Content-Length": "0"}, body=b"")
        if response.status in (201, 202):
            self._read_limited(response, MAX_ERROR_BYTES)
        if response.status == 201 and mount_from:
            log.debug("blob %s mounted from %s", digest, mount_from)
            return True
        if response.status != 202:
            raise self._fail(f"POST blob upload {digest}", response)
        location = self._upload_location(response)
        size = path.stat().st_size
        with open(path, "rb") as src:
            if size <= monolithic_limit:
                url = _with_query(location, digest=digest)
                body: Readable = _ProgressReader(src, progress) if progress is not None else src
                response = self._request("PUT", url, scope=scope, body=body, follow_redirects=False,
                                         headers={"Content-Type": "application/octet-stream",
                                                  "Content-Length": str(size)})
            else:
                offset = 0
                while offset < size:
                    chunk = src.read(chunk_size)
                    end = offset + len(chunk) - 1
                    response = self._request("PATCH", location, scope=scope, body=chunk, follow_redirects=False,
                                             headers={"Content-Type": "application/octet-stream",
                                                      "Content-Length": str(len(chunk)),
                                                      "Content-Range": f"{offset}-{end}"})
                    if response.status != 202:
                        raise self._fail(f"PATCH blob {digest} bytes {offset}-{end}", response)
                    self._read_limited(response, MAX_ERROR_BYTES)
                    location = self._upload_location(response)
                    offset += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                response = self._request("PUT", _with_query(location, digest=digest), scope=scope,
                                         body=b"", follow_redirects=False, headers={"Content-Length": "0"})
        if response.status not in (201, 204):
            raise self._fail(f"PUT blob {digest}", response)
        self._read_limited(response, MAX_ERROR_BYTES)
        return False

    def _upload_location(self, response: http.client.HTTPResponse) -> str:
        location = response.getheader("Location")
        if not location:
            raise RegistryError(f"registry {self.registry} started an upload without a Location")
        url = urllib.parse.urljoin(self._base_url() + "/", location)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.registry} sent an unusable upload location {location!r}")
        return url


def _next_chunk(response: http.client.HTTPResponse, received: int, speed: SpeedWatch) -> tuple[bytes, str | None]:
    """The next part of a blob's body, or why the download stopped before its end."""
    try:
        # read1: what has arrived, so that a trickle is measured as it comes.
        chunk = response.read1(READ_SIZE)
        speed.received(len(chunk))
    except (OSError, http.client.HTTPException) as e:
        return b"", f"download interrupted: {e}"
    if not chunk and response.length:
        # http.client's short read: the peer hung up before the end.
        return b"", f"connection closed after {received} bytes, {response.length} missing"
    return chunk, None


class _ProgressReader(io.RawIOBase):
    """A file wrapper that reports how much http.client has read from it (for the progress bar)."""

    def __init__(self, raw: Readable, progress: ProgressCallback) -> None:
        super().__init__()
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.progress(len(data))
        return data


def _check_repository(repository: str) -> None:
    if not REPOSITORY_RE.fullmatch(repository) or len(repository) > 255:
        raise RegistryError(f"invalid repository name {repository!r}")


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
