"""The eStargz layer format: writing it, and reading its footer, TOC and chunks (no network here).

eStargz (stargz-snapshotter's ``docs/estargz.md``) is a gzip tar layer laid out so that one file
can be read without the rest: every non-empty regular file's payload starts a new gzip member
(large files are cut into chunks, each its own member), the last tar entry is a JSON table of
contents, ``stargz.index.json`` (the TOC), in a member of its own, and a 51-byte empty gzip member
closes the blob, with the TOC's offset in its extra field. The TOC lists every entry's metadata
and, for every payload chunk, where its member starts in the blob (``offset``), where the chunk
sits in the file (``chunkOffset``, ``chunkSize``) and the sha256 of its bytes (``chunkDigest``).
The layer descriptor carries the sha256 of the TOC JSON (``containerd.io/snapshot/stargz/
toc.digest``), so a verified manifest vouches for the TOC, and the TOC for every chunk.

Because the concatenation of gzip members is a gzip stream, an eStargz blob is still an ordinary
``tar+gzip`` layer for podman or docker. It is not the same tar as the plain layer, though: the TOC
and a landmark file are tar entries of their own, so the layer's diff_id changes (an image pushed
as eStargz gets a new config, as with stargz-snapshotter's converter).

Writing. Entries keep their tar headers byte for byte (a header lands at the end of the previous
member, as in the reference writer); only their order may change: the files named as
*prioritized* come first (with their parent directories, link targets and opaque markers, in
their original relative order), then the ``.prefetch.landmark`` entry, then the rest. With no
prioritized file, a ``.no.prefetch.landmark`` entry comes first.

Reading. :func:`parse_footer` finds the TOC; :func:`parse_toc` checks its digest before parsing a
byte of it and refuses a TOC whose entries are not a consistent layout of the blob (chunks
contiguous from 0 to the file's size, offsets inside the blob and increasing, names without
``..``); :func:`decode_chunk` turns the compressed bytes of one chunk into its payload and refuses
it unless its sha256 is the chunk digest. Every size read is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
import re
import struct
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from lamina.errors import FormatError, LayerError

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
FOOTER_SIZE = 51
# The reference writer's default chunk size.
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
# What a reader accepts from a blob it did not write.
MAX_TOC_BYTES = 64 * 1024 * 1024
MAX_TOC_ENTRIES = 1_000_000
MAX_CHUNK_SIZE = 64 * 1024 * 1024
BLOCK = 512
OPAQUE_MARKER = ".wh..wh..opq"

_TAR_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}
TOC_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk"})


def clean_name(name: str) -> str:
    """A tar or TOC entry name as a path relative to the root: no empty or ``.`` components.

    ``..`` components are kept, for the callers to refuse (:func:`usable_name`).
    """
    if "//" in name or "/." in name or name.startswith(("/", "./")) or name.endswith("/") or name == ".":
        return "/".join(part for part in name.split("/") if part not in ("", "."))
    return name  # already clean (the common case, and a TOC has thousands)


def usable_name(raw: str, where: str) -> str:
    """``clean_name(raw)``, or FormatError for a name that climbs out (``..``) or holds a NUL."""
    name = clean_name(raw)
    if (".." in name and ".." in name.split("/")) or "\0" in name:
        raise FormatError(f"{where}: unusable name {raw!r}")
    return name


# ----- writing -----


@dataclass(frozen=True)
class EStargzBlob:
    """What :func:`write_estargz` wrote: the blob's digest and size, its diff_id and TOC digest."""

    digest: str
    size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int

    def annotations(self) -> dict[str, str]:
        """The annotations its layer descriptor must carry."""
        return {TOC_DIGEST_ANNOTATION: self.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size)}


class _MemberWriter:
    """Writes gzip members to ``out``, one after another, hashing both what goes in and what comes out."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self.out = out
        self.level = level
        self.offset = 0  # compressed bytes written so far
        self.uncompressed = 0
        self.diff_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self._member: Any = None

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.blob_hash.update(data)
            self.offset += len(data)

    def write(self, data: bytes) -> None:
        if self._member is None:
            self._member = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.diff_hash.update(data)
        self.uncompressed += len(data)
        self._emit(self._member.compress(data))

    def close_member(self) -> int:
        """End the open member (if any); returns the offset where the next member will start."""
        if self._member is not None:
            self._emit(self._member.flush(zlib.Z_FINISH))
            self._member = None
        return self.offset

    def write_raw(self, data: bytes) -> None:
        """Bytes that are already a gzip member (the footer)."""
        self.close_member()
        self._emit(data)


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte footer: an empty gzip member whose extra field says where the TOC starts."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    # FLG=FEXTRA, MTIME=0, XFL=0, OS=255 (unknown); then an empty stored deflate block, CRC32 0, ISIZE 0.
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def _modtime(info: tarfile.TarInfo) -> str | None:
    mtime = int(info.mtime)
    if mtime <= 0:
        return None
    try:
        return datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def _toc_entry(info: tarfile.TarInfo, name: str) -> dict[str, Any]:
    kind = _TAR_TYPES.get(info.type)
    if kind is None:
        raise LayerError(f"{name}: tar entry type {info.type!r} cannot be written as eStargz")
    entry: dict[str, Any] = {"name": name + "/" if kind == "dir" else name, "type": kind}
    if kind == "reg":
        entry["size"] = info.size
    modtime = _modtime(info)
    if modtime:
        entry["modtime"] = modtime
    if kind in ("symlink", "hardlink"):
        entry["linkName"] = info.linkname
    entry.update(mode=info.mode, uid=info.uid, gid=info.gid)
    if info.uname:
        entry["userName"] = info.uname
    if info.gname:
        entry["groupName"] = info.gname
    if kind in ("char", "block"):
        entry.update(devMajor=info.devmajor, devMinor=info.devminor)
    xattrs = {key[len("SCHILY.xattr."):]: base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
              for key, value in info.pax_headers.items() if key.startswith("SCHILY.xattr.")}
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


def _ordered(members: list[tarfile.TarInfo], prioritized: Sequence[str]) -> tuple[list[tarfile.TarInfo], list[tarfile.TarInfo]]:
    """(prioritized entries with what they need, the rest), each in the tar's original order."""
    wanted = {clean_name(p) for p in prioritized} - {""}
    if not wanted:
        return [], members
    by_name = {clean_name(m.name): m for m in members}
    needed: set[str] = set()
    pending = [name for name in wanted if name in by_name]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        parent = posixpath.dirname(name)
        while parent:
            needed.add(parent)
            if posixpath.join(parent, OPAQUE_MARKER) in by_name:
                needed.add(posixpath.join(parent, OPAQUE_MARKER))
            parent = posixpath.dirname(parent)
        if by_name[name].islnk():
            target = clean_name(by_name[name].linkname)
            if target in by_name:
                pending.append(target)
    first = [m for m in members if clean_name(m.name) in needed]
    rest = [m for m in members if clean_name(m.name) not in needed]
    return first, rest


def _landmark(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = len(LANDMARK_CONTENTS), 0o644, tarfile.REGTYPE
    return info, info.tobuf(tarfile.PAX_FORMAT)


class _Emitter:
    """Appends tar entries to an eStargz blob and collects their TOC entries."""

    def __init__(self, members: _MemberWriter, chunk_size: int) -> None:
        self.members = members
        self.chunk_size = chunk_size
        self.entries: list[dict[str, Any]] = []

    def entry(self, info: tarfile.TarInfo, header: bytes, payload: BinaryIO | None) -> None:
        name = clean_name(info.name)
        if info.issparse():
            raise LayerError(f"{name}: sparse tar entries cannot be written as eStargz")
        if name == TOC_NAME:
            raise LayerError(f"the layer already holds a {TOC_NAME}: it is eStargz already")
        entry = _toc_entry(info, name)
        self.members.write(header)
        if entry["type"] != "reg" or info.size == 0 or payload is None:
            self.entries.append(entry)
            return
        whole = hashlib.sha256()
        first = entry
        done = 0
        while done < info.size:
            size = min(self.chunk_size, info.size - done)
            data = payload.read(size)
            if len(data) != size:
                raise LayerError(f"{name}: the tar ends inside the entry's data")
            if done:
                entry = {"name": name, "type": "chunk"}
            entry["offset"] = self.members.close_member()
            entry["chunkOffset"] = done
            if size < info.size - done or done:
                # The spec: every chunk but the last states its size; the last (and an unchunked file) says 0.
                entry["chunkSize"] = size if size < info.size - done else 0
            self.members.write(data)
            whole.update(data)
            entry["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
            self.entries.append(entry)
            done += size
        first["digest"] = "sha256:" + whole.hexdigest()
        self.members.write(b"\0" * (-info.size % BLOCK))

    def landmark(self, name: str) -> None:
        info, header = _landmark(name)
        self.entry(info, header, io.BytesIO(LANDMARK_CONTENTS))


def write_estargz(tar_file: BinaryIO, out: BinaryIO, *, prioritized: Sequence[str] = (),
                  chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = 6) -> EStargzBlob:
    """Write the plain, seekable layer tar ``tar_file`` as an eStargz blob to ``out``.

    ``prioritized`` names the files to put first (before the prefetch landmark).

    Error handling: LayerError naming the entry for a tar eStargz cannot hold (a sparse file, an
    unknown entry type, a layer that already holds a TOC); what was written to ``out`` is then
    the caller's to discard.
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} out of range")
    try:
        archive = tarfile.open(fileobj=tar_file, mode="r:")
        members = archive.getmembers()
    except (tarfile.TarError, EOFError) as e:
        raise LayerError(f"not a tar archive: {e}") from None
    writer = _MemberWriter(out, level)
    emitter = _Emitter(writer, chunk_size)
    first, rest = _ordered(members, prioritized)
    if not first:
        emitter.landmark(NO_PREFETCH_LANDMARK)
    for group, landmark in ((first, PREFETCH_LANDMARK), (rest, None)):
        for info in group:
            tar_file.seek(info.offset)
            header = tar_file.read(info.offset_data - info.offset)
            tar_file.seek(info.offset_data)
            emitter.entry(info, header, tar_file if info.isreg() else None)
        if landmark and first:
            emitter.landmark(landmark)
    toc_offset = writer.close_member()
    toc_json = json.dumps({"version": 1, "entries": emitter.entries}, indent="\t").encode()
    toc_info = tarfile.TarInfo(TOC_NAME)
    toc_info.size, toc_info.mode = len(toc_json), 0o444
    writer.write(toc_info.tobuf(tarfile.PAX_FORMAT) + toc_json + b"\0" * (-len(toc_json) % BLOCK) + b"\0" * (2 * BLOCK))
    writer.write_raw(footer_bytes(toc_offset))
    return EStargzBlob(digest="sha256:" + writer.blob_hash.hexdigest(), size=writer.offset,
                       diff_id="sha256:" + writer.diff_hash.hexdigest(),
                       toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
                       uncompressed_size=writer.uncompressed)


# ----- reading -----


def parse_footer(footer: bytes, blob_size: int) -> int:
    """The TOC's offset from the blob's last 51 bytes; FormatError if they are not an eStargz footer."""
    if len(footer) != FOOTER_SIZE or footer[:4] != b"\x1f\x8b\x08\x04":
        raise FormatError("not an eStargz layer (no footer)")
    xlen, = struct.unpack_from("<H", footer, 10)
    si, sublen = footer[12:14], struct.unpack_from("<H", footer, 14)[0]
    subfield = footer[16:38]
    if xlen != 26 or si != b"SG" or sublen != 22 or subfield[16:] != b"STARGZ":
        raise FormatError("not an eStargz layer (footer without the STARGZ field)")
    try:
        offset = int(subfield[:16], 16)
    except ValueError:
        raise FormatError("eStargz footer: the TOC offset is not hexadecimal") from None
    if not 0 <= offset < blob_size - FOOTER_SIZE:
        raise FormatError(f"eStargz footer: TOC offset {offset} is outside the blob")
    return offset


def inflate(data: bytes, limit: int, what: str) -> bytes:
    """Decompress concatenated gzip members in ``data``, up to ``limit`` output bytes (the rest ignored).

    FormatError if ``data`` is not gzip or ends before ``limit`` bytes and the end of its last member.
    """
    out: list[bytes] = []
    produced = 0
    rest = data
    try:
        while rest and produced < limit:
            inflater = zlib.decompressobj(31)
            chunk = inflater.decompress(rest, limit - produced)
            out.append(chunk)
            produced += len(chunk)
            if produced >= limit:
                break
            if not inflater.eof:
                raise FormatError(f"{what}: compressed data ends early")
            rest = inflater.unused_data
    except zlib.error as e:
        raise FormatError(f"{what}: not valid gzip ({e})") from None
    return b"".join(out)


def toc_json_from_member(member: bytes) -> bytes:
    """The TOC JSON inside the compressed TOC member (TOC tar header + JSON + tar end)."""
    head = inflate(member, BLOCK * 8, "eStargz TOC")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(head), mode="r:")
        info = archive.next()
    except (tarfile.TarError, EOFError):
        info = None
    if info is None or info.name != TOC_NAME or not info.isreg():
        raise FormatError(f"eStargz: the entry at the TOC offset is not {TOC_NAME}")
    if info.size > MAX_TOC_BYTES:
        raise FormatError(f"eStargz: the TOC is {info.size} bytes, more than {MAX_TOC_BYTES}")
    data = inflate(member, info.offset_data + info.size, "eStargz TOC")
    if len(data) < info.offset_data + info.size:
        raise FormatError("eStargz: the TOC is cut short")
    return data[info.offset_data:info.offset_data + info.size]


@dataclass(frozen=True)
class Chunk:
    """One verified-to-be-consistent piece of a file's payload and where to find it in the blob."""

    offset: int        # the member's start in the blob
    end: int           # where the next member that starts a payload (or the TOC) begins
    inner_offset: int  # where the chunk starts in the decompressed stream from ``offset``
    chunk_offset: int  # where the chunk starts in the file
    size: int
    digest: str


@dataclass
class Entry:
    """A file of the layer as its TOC describes it (hard links resolved to their target's chunks)."""

    name: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    link_name: str = ""
    mtime: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Toc:
    """A parsed, checked TOC: the entries by cleaned name, in the blob's order."""

    entries: dict[str, Entry]
    digest: str
    toc_offset: int

    def chunks_of(self, name: str) -> list[Chunk]:
        entry = self.entries[name]
        if entry.type == "hardlink":
            entry = self.entries[clean_name(entry.link_name)]
        return entry.chunks


def _int(raw: dict[str, Any], key: str, where: str, default: int | None = 0) -> int:
    value = raw.get(key, default)
    if type(value) is not int or value < 0:  # not bool, not None
        raise FormatError(f"eStargz TOC: {where}: {key!r} is not a non-negative integer")
    return value


def _str(raw: dict[str, Any], key: str, where: str, default: str | None = "") -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise FormatError(f"eStargz TOC: {where}: {key!r} is not a string")
    return value


def _parse_mtime(text: str) -> int:
    if not text:
        return 0
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except (ValueError, OverflowError):
        return 0


def _entry(raw: dict[str, Any], where: str) -> Entry:
    kind = _str(raw, "type", where, None)
    if kind not in TOC_TYPES:
        raise FormatError(f"eStargz TOC: {where}: unknown type {kind!r}")
    get = raw.get
    mode, uid, gid, size = get("mode", 0), get("uid", 0), get("gid", 0), get("size", 0)
    major, minor, name = get("devMajor", 0), get("devMinor", 0), get("name")
    link_name, modtime = get("linkName", ""), get("modtime", "")
    # The checks of _int and _str, written out: this runs once per entry of every TOC.
    if not (type(mode) is int and type(uid) is int and type(gid) is int and type(size) is int
            and type(major) is int and type(minor) is int and mode >= 0 and uid >= 0 and gid >= 0
            and size >= 0 and major >= 0 and minor >= 0 and type(name) is str and type(link_name) is str
            and type(modtime) is str):
        return _checked_entry(raw, kind, where)
    xattrs: dict[str, bytes] = {}
    if get("xattrs"):
        xattrs = _xattrs(raw, where)
    return Entry(name=usable_name(name, f"eStargz TOC: {where}"), type=kind, mode=mode & 0o7777, uid=uid, gid=gid,
                 size=size, link_name=link_name, mtime=_parse_mtime(modtime), dev_major=major, dev_minor=minor,
                 xattrs=xattrs)


def _xattrs(raw: dict[str, Any], where: str) -> dict[str, bytes]:
    xattrs_raw = raw.get("xattrs") or {}
    if not isinstance(xattrs_raw, dict):
        raise FormatError(f"eStargz TOC: {where}: 'xattrs' is not an object")
    try:
        return {str(k): base64.b64decode(v, validate=True) for k, v in xattrs_raw.items()}
    except (ValueError, TypeError):
        raise FormatError(f"eStargz TOC: {where}: an xattr value is not base64") from None


def _checked_entry(raw: dict[str, Any], kind: str, where: str) -> Entry:
    """:func:`_entry` field by field, for the entry whose error it must name."""
    xattrs = _xattrs(raw, where)
    return Entry(name=usable_name(_str(raw, "name", where, None), f"eStargz TOC: {where}"), type=kind,
                 mode=_int(raw, "mode", where) & 0o7777, uid=_int(raw, "uid", where), gid=_int(raw, "gid", where),
                 size=_int(raw, "size", where), link_name=_str(raw, "linkName", where),
                 mtime=_parse_mtime(_str(raw, "modtime", where)), dev_major=_int(raw, "devMajor", where),
                 dev_minor=_int(raw, "devMinor", where), xattrs=xattrs)


def entry_from_tar(info: tarfile.TarInfo) -> Entry:
    """The TOC entry a tar header would get, as the reader parses it (one rule for both sides).

    FormatError for a name that climbs out of the layer (``..``), LayerError for a type eStargz
    has no name for.
    """
    return _entry(_toc_entry(info, usable_name(info.name, "layer entry")), info.name)


_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _digest(raw: dict[str, Any], where: str) -> str:
    digest = _str(raw, "chunkDigest", where)
    if _SHA256_DIGEST.fullmatch(digest) is None:
        raise FormatError(f"eStargz TOC: {where}: no sha256 chunkDigest")
    return digest


def parse_toc(toc_json: bytes, expected_digest: str, toc_offset: int) -> Toc:
    """The TOC, once its sha256 is ``expected_digest`` (from the verified layer descriptor).

    Error handling: FormatError for a TOC whose digest differs (nothing of it is parsed) or that does
    not describe a consistent layout of a blob whose TOC starts at ``toc_offset``.
    """
    actual = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    if actual != expected_digest:
        raise FormatError(f"eStargz TOC digest is {actual}, the manifest says {expected_digest}: refused")
    try:
        document = json.loads(toc_json)
    except (ValueError, RecursionError):
        raise FormatError("eStargz TOC is not valid JSON") from None
    if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(document.get("entries"), list):
        raise FormatError("eStargz TOC: not a version 1 TOC with an entries list")
    raws = document["entries"]
    if len(raws) > MAX_TOC_ENTRIES:
        raise FormatError(f"eStargz TOC: more than {MAX_TOC_ENTRIES} entries")
    return Toc(_collect(raws, toc_offset), expected_digest, toc_offset)


def _collect(raws: Iterable[object], toc_offset: int) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    # (entry, raw chunk fields) in blob order; ends are filled in once every offset is known.
    pieces: list[tuple[Entry, int, int, int, int, str]] = []
    current: Entry | None = None
    for index, raw in enumerate(raws):
        where = f"entry {index}"
        if not isinstance(raw, dict):
            raise FormatError(f"eStargz TOC: {where} is not an object")
        kind = raw.get("type")
        if kind == "chunk":
            if current is None or current.type != "reg":
                raise FormatError(f"eStargz TOC: {where}: a chunk that follows no regular file")
        else:
            current = _entry(raw, where)
            if current.name in ("", TOC_NAME):
                if current.name == "" and current.type == "dir":
                    continue
                raise FormatError(f"eStargz TOC: {where}: unusable name {current.name!r}")
            entries[current.name] = current
            if current.type != "reg" or current.size == 0:
                continue
        assert current is not None
        pieces.append((current, _int(raw, "offset", where, None), _int(raw, "innerOffset", where),
                       _int(raw, "chunkOffset", where), _int(raw, "chunkSize", where), _digest(raw, where)))
    _place_chunks(pieces, toc_offset)
    for entry in entries.values():
        if entry.type == "hardlink" and entries.get(clean_name(entry.link_name), entry).type != "reg":
            raise FormatError(f"eStargz TOC: hard link {entry.name} names no regular file")
    return entries


def _place_chunks(pieces: list[tuple[Entry, int, int, int, int, str]], toc_offset: int) -> None:
    """Give each file its chunks, with the end of each chunk's compressed range; check they tile it."""
    ends = [0] * len(pieces)
    next_start = toc_offset
    for index in range(len(pieces) - 1, -1, -1):
        shares_member = index + 1 < len(pieces) and pieces[index + 1][1] == pieces[index][1]
        ends[index] = ends[index + 1] if shares_member else next_start
        next_start = pieces[index][1]
    previous = (-1, -1)
    for (entry, offset, inner, chunk_offset, size, digest), end in zip(pieces, ends, strict=True):
        if (offset, inner) <= previous or not offset < end <= toc_offset:
            raise FormatError(f"eStargz TOC: {entry.name}: chunk offset {offset} out of order or outside the blob")
        previous = (offset, inner)
        expected = entry.chunks[-1].chunk_offset + entry.chunks[-1].size if entry.chunks else 0
        if chunk_offset != expected:
            raise FormatError(f"eStargz TOC: {entry.name}: chunk at {chunk_offset}, expected {expected}")
        size = size or entry.size - chunk_offset
        if not 0 < size <= MAX_CHUNK_SIZE or chunk_offset + size > entry.size:
            raise FormatError(f"eStargz TOC: {entry.name}: chunk of {size} bytes at {chunk_offset} does not fit")
        entry.chunks.append(Chunk(offset, end, inner, chunk_offset, size, digest))
    for entry, *_ in pieces:
        if sum(c.size for c in entry.chunks) != entry.size:
            raise FormatError(f"eStargz TOC: {entry.name}: chunks do not cover its {entry.size} bytes")


def compressed_bound(chunk: Chunk) -> int:
    """The most compressed bytes from ``chunk.offset`` that can be needed to decode it.

    zlib's compressBound for the decompressed bytes up to the chunk's end, plus room for a gzip
    header with a name or comment; the range never goes past ``chunk.end``.
    """
    plain = chunk.inner_offset + chunk.size
    return min(chunk.end - chunk.offset, plain + (plain >> 12) + (plain >> 14) + (plain >> 25) + 13 + 4096)


def decode_chunk(compressed: bytes, chunk: Chunk, what: str) -> bytes:
    """The chunk's payload from the compressed bytes of ``[chunk.offset, chunk.end)``, verified.

    Error handling: FormatError if they do not decompress to a payload whose sha256 is the chunk's
    digest; no byte of an unverified chunk is returned.
    """
    data = inflate(compressed, chunk.inner_offset + chunk.size, what)[chunk.inner_offset:]
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if len(data) != chunk.size or actual != chunk.digest:
        raise FormatError(f"{what}: chunk at {chunk.chunk_offset} has digest {actual}, the TOC says {chunk.digest}")
    return data
