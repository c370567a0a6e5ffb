"""A layer of a lazy image that is not eStargz: fetched whole, then served like an eStargz one.

A plain gzip (or zstd, or uncompressed) layer has no TOC and no chunk digests, so nothing of it can
be trusted before all of it is: the blob is downloaded and verified against its digest (as a pull
does), decompressed once into ``ROOT/lazy/tars/HEX.tar`` and indexed with the same entry rules as
an eStargz TOC (:func:`lamina.store.estargz.entry_from_tar`). Every regular file is then one
"chunk" whose bytes are read from the tar at their offset: verified already, as part of the blob.

The tar is written under a temporary name and renamed, so one that exists is whole.
"""

from __future__ import annotations

import logging
import os
import secrets
import tarfile
from collections.abc import Callable
from pathlib import Path

from lamina.errors import FormatError
from lamina.lazy.remote import FetchStats
from lamina.store.compression import decompress_file
from lamina.store.estargz import MAX_TOC_ENTRIES, Chunk, Entry, Toc, entry_from_tar
from lamina.store.image_schema import Descriptor
from lamina.store.layer_unpack import Limits
from lamina.store.registry import RegistryClient

log = logging.getLogger(__name__)


class WholeLayer:
    """A non-eStargz layer blob in ``repository``, read through ``client`` (which this object owns).

    Resource handling: :meth:`close` closes the client and the tar.
    Error handling: :meth:`open_toc` raises RegistryError (download, digest), FormatError or
    LayerError (a tar that cannot be indexed).
    """

    def __init__(self, client: RegistryClient, repository: str, descriptor: Descriptor, directory: Path,
                 trace: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.repository = repository
        self.descriptor = descriptor
        self.directory = directory
        self.trace = trace
        self.stats = FetchStats()
        self._fd: int | None = None

    @property
    def label(self) -> str:
        return self.descriptor.digest[7:19]

    def close(self) -> None:
        self.client.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _tar(self) -> Path:
        path = self.directory / f"{self.descriptor.digest.removeprefix('sha256:')}.tar"
        if path.exists():
            return path
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        blob = self.client.fetch_blob(self.repository, self.descriptor.digest, self.directory,
                                      size=self.descriptor.size)
        self.stats.requests += 1
        self.stats.bytes += self.descriptor.size
        tmp = self.directory / f"{os.getpid()}.{secrets.token_hex(6)}.tar.tmp"
        try:
            with open(blob, "rb") as source:
                decompress_file(source, tmp, Limits().max_total_bytes, f"layer {self.label}")
            os.replace(tmp, path)
        finally:
            blob.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        if self.trace:
            self.trace(f"fetch layer {self.label} whole ({self.descriptor.size} bytes): not eStargz")
        return path

    def open_toc(self) -> Toc:
        """Fetch (unless cached) and index the layer; its entries as a TOC would give them."""
        path = self._tar()
        entries: dict[str, Entry] = {}
        try:
            with tarfile.open(path, mode="r:") as archive:
                for index, info in enumerate(archive):
                    if index >= MAX_TOC_ENTRIES:
                        raise FormatError(f"layer {self.label}: more than {MAX_TOC_ENTRIES} entries")
                    entry = entry_from_tar(info)
                    if not entry.name:
                        continue
                    if entry.type == "reg" and entry.size:
                        entry.chunks.append(Chunk(info.offset_data, info.offset_data + info.size, 0, 0, info.size,
                                                  self.descriptor.digest))
                    entries[entry.name] = entry
        except (tarfile.TarError, EOFError) as e:
            raise FormatError(f"layer {self.label}: not a tar archive: {e}") from None
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return Toc(entries, self.descriptor.digest, 0)

    def read_chunk(self, chunk: Chunk, name: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes of a file of the (verified) tar."""
        assert self._fd is not None, "open_toc first"
        end = chunk.size if end is None else end
        data = os.pread(self._fd, end - start, chunk.offset + start)
        if len(data) != end - start:
            raise FormatError(f"layer {self.label}: {name} is cut short in {self.directory}")
        return data
