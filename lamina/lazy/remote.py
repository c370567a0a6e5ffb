"""One eStargz layer in a registry, read by HTTP ranges: its TOC, then its chunks on demand.

Trust. The manifest naming the layer is verified by the registry client (as for a pull); the TOC is
fetched (footer first, then the TOC member) and accepted only if its sha256 is the descriptor's
``containerd.io/snapshot/stargz/toc.digest`` annotation; every chunk is accepted only if its sha256
is the ``chunkDigest`` the verified TOC gives. A chunk that fails is fetched once more (a flipped
bit on the way, a cache that lied), then refused: the reader gets an error, never the bytes.

Cache. Verified chunks are kept in ``ROOT/lazy/chunks/HEX`` named by their digest, written to a
temporary name and renamed, so a chunk file is whole and verified or absent; the directory is
private to the store's owner like the rest of the store. A chunk read from the cache is checked
against its digest again (cheap next to a network fetch) and dropped if it does not match. TOCs are
kept the same way in ``ROOT/lazy/tocs/HEX`` (HEX: the layer blob's digest; the TOC's offset on its
first line), and verified against the manifest's annotation again whenever they are used: a second
mount of a layer costs no round trip for it, and garbage collection can tell which chunks a live
mount's layers name (:mod:`lamina.lazy.state`).

Trace. With a trace callback, every fetch is narrated as one line: the layer, the file, the bytes of
it the chunk holds, where the chunk sits in the blob, and whether it verified (``verified``,
``does not verify: fetching again``, ``... not served``, or the registry's error).

Failure. Every request has a deadline (:data:`REQUEST_DEADLINE_S`): a registry that stops answering
mid-read gives an error after at most that long, not a hang. Requests of one layer go one at a
time over the layer's own connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import FormatError, LaminaError, RegistryError
from lamina.store.estargz import (
    FOOTER_SIZE,
    MAX_TOC_BYTES,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    Chunk,
    Toc,
    compressed_bound,
    decode_chunk,
    parse_footer,
    parse_toc,
    toc_json_from_member,
)
from lamina.store.image_schema import Descriptor
from lamina.store.registry import RegistryClient

log = logging.getLogger(__name__)

REQUEST_DEADLINE_S = float(os.environ.get("LAMINA_LAZY_DEADLINE", "20"))
# A chunk refused (fetched twice, never verified) is refused again without a fetch for this long:
# the kernel retries a failed read page by page, and each retry would fetch twice and log again.
REFUSED_CHUNK_HOLD_S = 5.0


class ChunkUnavailable(LaminaError):
    """A chunk could not be fetched or did not verify; the message names the layer, file and offset."""


class ChunkCache:
    """Verified chunks by digest, in one directory."""

    def __init__(self, directory: Path, tocs: Path | None = None) -> None:
        self.directory = directory
        self.tocs = tocs

    def _path(self, digest: str) -> Path:
        return self.directory / digest.removeprefix("sha256:")

    def get(self, chunk: Chunk) -> bytes | None:
        path = self._path(chunk.digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == chunk.size and "sha256:" + hashlib.sha256(data).hexdigest() == chunk.digest:
            return data
        log.warning("cached chunk %s does not match its digest; dropped", path)
        path.unlink(missing_ok=True)
        return None

    def read_slice(self, chunk: Chunk, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of a cached chunk this process has verified already (no hashing)."""
        try:
            with open(self._path(chunk.digest), "rb") as f:
                data = os.pread(f.fileno(), end - start, start)
        except FileNotFoundError:
            return None
        return data if len(data) == end - start else None

    def put(self, chunk: Chunk, data: bytes) -> None:
        """Keep a verified chunk; a full disk only costs the cache."""
        _write_whole(self._path(chunk.digest), data)

    def get_toc(self, blob_digest: str, expected_digest: str) -> Toc | None:
        """A kept TOC of the blob, if there is one and it still verifies against ``expected_digest``."""
        if self.tocs is None:
            return None
        path = self.tocs / blob_digest.removeprefix("sha256:")
        try:
            offset_line, toc_json = path.read_bytes().split(b"\n", 1)
            return parse_toc(toc_json, expected_digest, int(offset_line))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, FormatError) as e:
            log.warning("kept TOC %s is unusable (%s); dropped", path, e)
            path.unlink(missing_ok=True)
            return None

    def put_toc(self, blob_digest: str, toc_json: bytes, toc_offset: int) -> None:
        if self.tocs is not None:
            _write_whole(self.tocs / blob_digest.removeprefix("sha256:"), b"%d\n" % toc_offset + toc_json)


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, so the file is whole or absent; a full
    disk only costs the cache."""
    tmp = path.with_name(f"{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(tmp, "xb") as out:
            out.write(data)
        os.replace(tmp, path)
    except OSError as e:
        log.info("cannot keep %s: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass
class FetchStats:
    """What one layer cost: requests and bytes from the registry, chunks served from the cache."""

    requests: int = 0
    bytes: int = 0
    cached: int = 0


def has_toc(descriptor: Descriptor) -> bool:
    return TOC_DIGEST_ANNOTATION in descriptor.annotations


class RemoteLayer:
    """An eStargz layer blob in ``repository``, read through ``client`` (which this object owns).

    Resource handling: :meth:`close` closes the client's connection.
    Error handling: :meth:`open_toc` raises RegistryError or FormatError for a layer that cannot be
    read or verified; :meth:`read_chunk` raises :class:`ChunkUnavailable`.
    """

    #: Given the compressed bytes of each chunk fetched and verified (blob offset, bytes): the fill
    #: of a lazy image keeps them (:mod:`lamina.lazy.partial`).
    keep: Callable[[int, bytes], None] | None = None

    def __init__(self, client: RegistryClient, repository: str, descriptor: Descriptor, cache: ChunkCache,
                 trace: Callable[[str], None] | None = None) -> None:
        if not has_toc(descriptor):
            raise FormatError(f"layer {descriptor.digest} has no {TOC_DIGEST_ANNOTATION} annotation")
        self.client = client
        self.repository = repository
        self.descriptor = descriptor
        self.cache = cache
        self.trace = trace
        self.stats = FetchStats()
        self._lock = threading.Lock()
        # Chunks whose cache file this process has checked: later reads take slices of it.
        self._verified: set[str] = set()
        # Chunks refused lately, by digest: when (monotonic) they were.
        self._refused: dict[str, float] = {}

    def close(self) -> None:
        self.client.close()

    @property
    def label(self) -> str:
        return self.descriptor.digest[7:19]

    def _range(self, start: int, end: int) -> bytes:
        with self._lock:
            data = self.client.fetch_blob_range(self.repository, self.descriptor.digest, start, end,
                                                deadline=time.monotonic() + REQUEST_DEADLINE_S)
            self.stats.requests += 1
            self.stats.bytes += len(data)
        return data

    def open_toc(self) -> Toc:
        """The TOC, verified against the descriptor's annotation: kept from an earlier fetch, else
        fetched (the footer, then the TOC member) and kept."""
        expected = self.descriptor.annotations[TOC_DIGEST_ANNOTATION]
        kept = self.cache.get_toc(self.descriptor.digest, expected)
        if kept is not None:
            if self.trace:
                self.trace(f"layer {self.label}: TOC from the store, {len(kept.entries)} entries, verified")
            return kept
        size = self.descriptor.size
        if size <= FOOTER_SIZE:
            raise FormatError(f"layer {self.label}: {size} bytes is too small for eStargz")
        for attempt in (1, 2):
            try:
                toc_offset = parse_footer(self._range(size - FOOTER_SIZE, size), size)
                if size - FOOTER_SIZE - toc_offset > MAX_TOC_BYTES:
                    raise FormatError(f"layer {self.label}: its TOC is more than {MAX_TOC_BYTES} bytes")
                member = self._range(toc_offset, size - FOOTER_SIZE)
                toc_json = toc_json_from_member(member)
                toc = parse_toc(toc_json, expected, toc_offset)
            except FormatError as e:
                # As for a chunk: once more (a flipped bit on the way), then refused.
                self._narrate(f"layer {self.label}: TOC does not verify{': fetching again' if attempt == 1 else ' again'}")
                if attempt == 1:
                    log.info("layer %s: %s; fetching it again", self.label, e)
                    continue
                log.warning("layer %s: %s (fetched twice)", self.label, e)
                raise
            self.cache.put_toc(self.descriptor.digest, toc_json, toc_offset)
            self._narrate(f"layer {self.label}: TOC {len(member)} bytes at {toc_offset}, {len(toc.entries)} entries, "
                          f"verified")
            return toc
        raise AssertionError("unreachable")

    def _narrate(self, line: str) -> None:
        if self.trace:
            self.trace(line)

    def prefetch(self, toc: Toc, stop: threading.Event) -> int:
        """Fetch into the cache every chunk of the files before the prefetch landmark (the ones the
        image's author marked as read first); returns how many bytes that took from the registry.

        Stops early when ``stop`` is set or a chunk cannot be had (the reader will try again and
        get the error then, not now).
        """
        if PREFETCH_LANDMARK not in toc.entries:
            return 0
        before = self.stats.bytes
        for name, entry in toc.entries.items():
            if name == PREFETCH_LANDMARK:
                break
            for chunk in entry.chunks if entry.type == "reg" else []:
                if stop.is_set():
                    return self.stats.bytes - before
                try:
                    self._whole_chunk(chunk, name)
                except ChunkUnavailable as e:
                    log.info("prefetch of layer %s stopped: %s", self.label, e)
                    return self.stats.bytes - before
        if self.trace:
            self.trace(f"prefetch layer {self.label}: {self.stats.bytes - before} bytes")
        return self.stats.bytes - before

    def read_chunk(self, chunk: Chunk, name: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the chunk, verified: from the cache, else from the registry
        (fetched at most twice)."""
        end = chunk.size if end is None else end
        if chunk.digest in self._verified:
            piece = self.cache.read_slice(chunk, start, end)
            if piece is not None:
                self.stats.cached += 1
                return piece
        return self._whole_chunk(chunk, name)[start:end]

    def _whole_chunk(self, chunk: Chunk, name: str) -> bytes:
        cached = self.cache.get(chunk)
        if cached is not None:
            self.stats.cached += 1
            self._verified.add(chunk.digest)
            return cached
        where = f"layer {self.label}: {name} at {chunk.chunk_offset}"
        refused = self._refused.get(chunk.digest)
        if refused is not None and time.monotonic() - refused < REFUSED_CHUNK_HOLD_S:
            raise ChunkUnavailable(f"{where}: does not match its digest; not served")
        what = f"fetch layer {self.label} {name} bytes {chunk.chunk_offset}+{chunk.size} (blob offset {chunk.offset}"
        for attempt in (1, 2):
            compressed = b""
            try:
                compressed = self._range(chunk.offset, chunk.offset + compressed_bound(chunk))
                data = decode_chunk(compressed, chunk, where)
            except FormatError as e:
                if attempt == 1:
                    log.info("%s; fetching it again", e)
                    self._narrate(f"{what}, {len(compressed)} compressed): does not verify: fetching again")
                    continue
                log.warning("%s (fetched twice): not served", e)
                self._refused[chunk.digest] = time.monotonic()
                self._narrate(f"{what}, {len(compressed)} compressed): does not verify again: not served")
                raise ChunkUnavailable(f"{where}: does not match its digest; not served") from None
            except RegistryError as e:
                self._narrate(f"{what}): failed: {e}")
                raise ChunkUnavailable(f"{where}: {e}") from None
            self._narrate(f"{what}, {len(compressed)} compressed): verified {chunk.digest[:19]}")
            self.cache.put(chunk, data)
            self._verified.add(chunk.digest)
            if self.keep is not None:
                self.keep(chunk.offset, compressed)
            return data
        raise AssertionError("unreachable")
