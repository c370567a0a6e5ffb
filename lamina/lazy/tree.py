"""The lazy layers' tree: every layer of an image as a directory built from its verified TOC.

No pyfuse3 here (the adapter is :mod:`lamina.lazy.fs`). The root directory holds one directory per
layer, named by its position from the bottom (``0``, ``1``, ...); each is the layer's tree exactly
as its tar holds it, in the OCI tar format (``.wh.NAME`` whiteout files, ``.wh..wh..opq`` opaque
markers), which unionfs reads as it reads any lower layer. The landmark and TOC entries of eStargz
are not shown: they are the format's, not the image's.

Truth. Every attribute comes from the TOC, which was verified against the manifest before the tree
was built, and the tree never changes afterwards: so names, types, modes, owners, sizes, link
targets and xattrs may be cached by the kernel for as long as it likes. Directories the TOC implies
but does not list (a tar without its parent entries) are given ``0755 root:root``, as lamina's
layer unpacker creates them. Contents are the only thing fetched later, and only verified bytes are
ever returned (:meth:`LazyTree.read` gets them through :class:`Chunks`).

Hard links share one node (one inode number, ``nlink`` = its names).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lamina.store.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Chunk, Entry, Toc, clean_name

ROOT_INODE = 1
_TYPE_BITS = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
              "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
HIDDEN = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})


class Chunks(Protocol):
    """Where verified chunk bytes come from (a :class:`lamina.lazy.remote.RemoteLayer`)."""

    def read_chunk(self, chunk: Chunk, name: str, start: int = 0, end: int | None = None) -> bytes: ...


@dataclass(frozen=True)
class Attributes:
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    rdev: int
    mtime: int


@dataclass
class Node:
    inode: int
    entry: Entry
    layer: int
    chunks: list[Chunk] = field(default_factory=list)
    children: dict[str, Node] | None = None  # directories only
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def attributes(self) -> Attributes:
        """What stat says of this node (the adapter copies it into pyfuse3's attributes)."""
        e = self.entry
        size = e.size if e.type == "reg" else len(os.fsencode(e.link_name)) if e.type == "symlink" else 0
        rdev = os.makedev(e.dev_major, e.dev_minor) if e.type in ("char", "block") else 0
        return Attributes(mode=_TYPE_BITS[e.type] | (e.mode & 0o7777), nlink=self.nlink, uid=e.uid, gid=e.gid,
                          size=size, blocks=-(-size // 512) if e.type == "reg" else 0, rdev=rdev, mtime=e.mtime)


def _directory(inode: int, name: str, layer: int) -> Node:
    return Node(inode, Entry(name=name, type="dir", mode=0o755, uid=0, gid=0), layer, children={})


class LazyTree:
    """The root and layers' nodes, by inode number; built once, never changed."""

    def __init__(self, tocs: Sequence[Toc], sources: Sequence[Chunks]) -> None:
        self.sources = sources
        self.nodes: dict[int, Node] = {}
        self.root = self._add(_directory(self._next_inode(), "", -1))
        assert self.root.inode == ROOT_INODE and self.root.children is not None
        for index, toc in enumerate(tocs):
            layer_root = self._add(_directory(self._next_inode(), "", index))
            self.root.children[str(index)] = layer_root
            self._fill(layer_root, toc, index)
        self.root.nlink = 2 + len(tocs)
        #: False when no file has an xattr: the adapter then tells the kernel so once, for good.
        self.has_xattrs = any(node.entry.xattrs for node in self.nodes.values())

    def _next_inode(self) -> int:
        return ROOT_INODE + len(self.nodes)

    def _add(self, node: Node) -> Node:
        self.nodes[node.inode] = node
        return node

    def _fill(self, layer_root: Node, toc: Toc, layer: int) -> None:
        by_path: dict[str, Node] = {"": layer_root}

        def directory(path: str) -> Node:
            node = by_path.get(path)
            if node is None or not node.is_dir:
                parent = directory(posixpath.dirname(path))
                node = self._add(_directory(self._next_inode(), path, layer))
                assert parent.children is not None
                parent.children[posixpath.basename(path)] = node
                by_path[path] = node
            return node

        for name, entry in toc.entries.items():
            if name in HIDDEN:
                continue
            parent = directory(posixpath.dirname(name))
            assert parent.children is not None
            if entry.type == "hardlink":
                target = by_path.get(clean_name(entry.link_name))
                if target is None or target.is_dir:
                    continue  # the TOC's checks name only regular targets; one not shown is dropped too
                target.nlink += 1
                parent.children[posixpath.basename(name)] = target
                continue
            existing = by_path.get(name)
            if entry.type == "dir" and existing is not None and existing.is_dir:
                existing.entry = entry  # an implied directory, now listed: its own attributes
                continue
            node = self._add(Node(self._next_inode(), entry, layer,
                                  chunks=toc.chunks_of(name) if entry.type == "reg" else [],
                                  children={} if entry.type == "dir" else None))
            parent.children[posixpath.basename(name)] = node
            by_path[name] = node
        for node in by_path.values():
            if node.is_dir:
                assert node.children is not None
                node.nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)

    # ----- what the adapter asks -----

    def node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise OSError(errno.ENOENT, "no such inode") from None

    def lookup(self, parent: int, name: str) -> Node:
        directory = self.node(parent)
        if directory.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        child = directory.children.get(name)
        if child is None:
            raise OSError(errno.ENOENT, "no such entry")
        return child

    def listing(self, inode: int) -> Iterator[tuple[str, Node]]:
        directory = self.node(inode)
        if directory.children is None:
            raise OSError(errno.ENOTDIR, "not a directory")
        yield from sorted(directory.children.items())

    def read(self, inode: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of a regular file, every one of them verified.

        Blocks on the network for chunks not yet cached. Error handling: whatever the chunk source
        raises (:class:`lamina.lazy.remote.ChunkUnavailable`) propagates; nothing partial is returned.
        """
        node = self.node(inode)
        if node.entry.type != "reg":
            raise OSError(errno.EINVAL, "not a regular file")
        end = min(offset + size, node.entry.size)
        pieces: list[bytes] = []
        for chunk in node.chunks:
            if chunk.chunk_offset + chunk.size <= offset or chunk.chunk_offset >= end:
                continue
            lo = max(offset, chunk.chunk_offset) - chunk.chunk_offset
            hi = min(end, chunk.chunk_offset + chunk.size) - chunk.chunk_offset
            pieces.append(self.sources[node.layer].read_chunk(chunk, node.entry.name, lo, hi))
        return b"".join(pieces)
