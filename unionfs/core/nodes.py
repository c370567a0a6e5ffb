"""Nodes of the merged tree and the inode table.

The filesystem owns its inode numbers (they double as FUSE node ids). A node is identified by the
backing object that gives it its identity: the top lower copy for things that came from a lower layer
(so the number survives copy-up, and two lower hardlinks share one node), the upper object for things
created through the mount. The number encodes the layer slot and the backing st_ino, so it is the
same after a remount, and numbers of different layers never meet (the slot is part of them).

That holds only while no two live nodes can claim one identity, and the kernel keeps a node after
its last name went until it sends FORGET, which may come late (an O_PATH descriptor, a release still
in flight). Lower objects never go away, but a removed upper object's st_ino is free for the backing
filesystem to hand out again (ext4 does at once), and a new file would then find its number taken.
So a removed node the kernel still knows *pins* its upper object (an O_PATH descriptor, nothing on
disk, gone with the process) until it is forgotten: while a node lives, the object its identity
names lives, and an object found with that identity is that node's object -- another name of it
(a hardlink the kernel had not seen) brings the node back instead of making a second one. Pins are
bounded (``max_pins``); past that, or for a st_ino too big to encode, a number from a private
counter range is used, which a remount may not give again.

A node knows where it lives: ``in_upper`` (the upper has it at the node's merged path) and ``lowers``
(the lower copy of a non-directory, or every lower directory merged into a directory, top first).
Paths are computed from the parent chain, so renaming a directory moves everything below it at once.
"""

from __future__ import annotations

import os
import resource
import stat
from collections.abc import Callable
from typing import Any

from unionfs.core.backing import Layer, join

ROOT_INO = 1
_SLOT_SHIFT = 48
_FALLBACK_BASE = 0xFFFF << _SLOT_SHIFT
UPPER_SLOT = 0

Identity = tuple[int, int]  # (layer slot, backing st_ino)


# Node.owner_override before the backing object's xattr has been read.
OVERRIDE_UNKNOWN: Any = object()


class Node:
    """One object of the merged tree, as the kernel knows it."""

    __slots__ = (
        "ino", "kind", "parent", "name", "links", "lookups", "in_upper", "lowers", "opaque",
        "identities", "deleted", "fds", "children", "listing", "st_hint", "gone_stat", "lower_st", "pin",
        "owner_override",
    )

    def __init__(self, ino: int, kind: int, parent: Node | None, name: str) -> None:
        self.ino = ino
        self.kind = kind  # S_IFMT bits
        self.parent = parent
        self.name = name
        # Other names (hard links) this node is known under, besides (parent, name).
        self.links: list[tuple[Node, str]] = []
        self.lookups = 0
        self.in_upper = False
        self.lowers: list[tuple[Layer, str]] = []
        self.opaque = False  # directory: nothing below the upper copy merges in
        self.identities: list[Identity] = []
        self.deleted = False
        self.fds: list[int] = []  # open backing descriptors (stat of unlinked-but-open files)
        # Directory: children the kernel currently knows (name -> node); None for non-directories.
        self.children: dict[str, Node] | None = {} if kind == stat.S_IFDIR else None
        self.listing: Any = None  # directory: cached merged listing (list of DirEntry)
        self.st_hint: Any = None  # a fresh stat of the backing object from lookup (used once)
        self.gone_stat: Any = None  # last stat before its last name went (an open fifo still asks)
        # The lstat of its lower object from the lookup that found it: still true while the node
        # is not copied up, as lower layers never change.
        self.lower_st: Any = None
        # The owner override xattr of its backing object, decoded (None: it has none), or
        # OVERRIDE_UNKNOWN until read. Only lamina writes it, and it resets this when it does.
        self.owner_override: Any = OVERRIDE_UNKNOWN
        self.pin = -1  # removed but not forgotten: O_PATH descriptor of its upper object (see above)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    def path(self) -> str:
        """The merged path, relative to the root ('' for the root)."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def child_path(self, name: str) -> str:
        return join(self.path(), name)

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.path()!r} upper={self.in_upper} lowers={len(self.lowers)}>"


class InodeTable:
    """ino -> node, identity -> node, the kernel's lookup counts, and pins of removed nodes."""

    def __init__(self) -> None:
        self.by_ino: dict[int, Node] = {}
        self.by_identity: dict[Identity, Node] = {}
        self._fallback = _FALLBACK_BASE
        self.pins = 0
        # A quarter of the descriptors we may open: the rest stay for open files.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_pins = 1 << 16 if soft == resource.RLIM_INFINITY else soft // 4
        # Told of every node dropped from the table: its number may come back for another object,
        # so whoever keeps state by inode number (the adapter) must drop it too.
        self.on_drop: Callable[[Node], None] | None = None

    def new_root(self) -> Node:
        root = Node(ROOT_INO, stat.S_IFDIR, None, "")
        root.lookups = 1  # the kernel never forgets the root
        self.by_ino[ROOT_INO] = root
        return root

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def find(self, identity: Identity) -> Node | None:
        return self.by_identity.get(identity)

    def add(self, kind: int, parent: Node, name: str, identity: Identity | None) -> Node:
        """A new node for ``identity``; its number derives from the identity unless that collides."""
        ino = 0
        if identity is not None and identity[1] < (1 << _SLOT_SHIFT):
            ino = (identity[0] + 1) << _SLOT_SHIFT | identity[1]
            if ino in self.by_ino:
                ino = 0
        if not ino:
            self._fallback += 1
            ino = self._fallback
        node = Node(ino, kind, parent, name)
        self.by_ino[ino] = node
        if identity is not None:
            self.by_identity[identity] = node  # add_identity, inline: once per entry of a big listing
            node.identities.append(identity)
        return node

    def add_identity(self, node: Node, identity: Identity) -> None:
        self.by_identity[identity] = node
        node.identities.append(identity)

    def drop_identities(self, node: Node) -> None:
        for ident in node.identities:
            if self.by_identity.get(ident) is node:
                del self.by_identity[ident]
        node.identities.clear()

    def forget(self, node: Node, count: int) -> None:
        node.lookups = max(0, node.lookups - count)
        self.maybe_drop(node)

    @staticmethod
    def number_is_stable(node: Node) -> bool:
        """Whether the node's number comes from its identity, so that a node made again for the
        same object (after this one was dropped) gets the same number; a number from the private
        counter does not come back."""
        return node.ino < _FALLBACK_BASE

    @staticmethod
    def survives(node: Node) -> bool:
        """Whether the node must outlive its last name: the kernel or an open file refers to it."""
        return node.lookups > 0 or bool(node.fds) or node.ino == ROOT_INO

    @staticmethod
    def needs_pin(node: Node) -> bool:
        """Whether the node's number or identity comes from an upper object, which could be freed
        and its st_ino reused (lower objects stay)."""
        return node.ino >> _SLOT_SHIFT == UPPER_SLOT + 1 or any(slot == UPPER_SLOT for slot, _ in node.identities)

    def pin(self, node: Node, fd: int) -> None:
        self.unpin(node)
        node.pin = fd
        self.pins += 1

    def unpin(self, node: Node) -> None:
        if node.pin >= 0:
            os.close(node.pin)
            node.pin = -1
            self.pins -= 1

    def removed(self, node: Node) -> None:
        """``node`` lost its last name: keep its identity only while that is safe (see above)."""
        if node.pin < 0 and self.needs_pin(node):
            self.drop_identities(node)  # unpinned: its number may name a new object any time
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Drop a node nobody refers to any more (no kernel lookups, no open files), with the
        nodes below it that nobody refers to either; a node below that somebody does keeps it."""
        if self.survives(node) or (node.children and not self._drop_unreferenced_below(node)):
            return
        self._drop(node)

    def _drop_unreferenced_below(self, top: Node) -> bool:
        """Before directory ``top`` goes: drop the nodes below it that the kernel never looked up
        (made by listings, by a whole-tree copy-up, by a rename's checks), children first.
        Whether nothing is left below it.

        Left behind, such a node would keep its identity but have a parent that no longer exists:
        the node made again for ``top``'s object is another one, so a lookup under it finds the
        old child by identity with the wrong parent, and (a directory) makes a new node whose
        number is taken by the old one -- a counter number that a remount does not give again --
        or (a file) puts it under the new parent by a path through the dropped one."""
        survives = self.survives
        order: list[Node] = []
        pending = [top]
        while pending:  # no recursion: a path may be thousands of directories deep
            directory = pending.pop()
            order.append(directory)
            assert directory.children is not None
            pending.extend(child for child in directory.children.values()
                           if child.children and child.parent is directory and not survives(child))
        for directory in reversed(order):  # children before their parents
            assert directory.children is not None
            for child in list(directory.children.values()):
                if not child.children and not survives(child):
                    self._drop(child)
        return not top.children

    def _drop(self, node: Node) -> None:
        if self.by_ino.get(node.ino) is node:
            del self.by_ino[node.ino]
            if self.on_drop is not None:
                self.on_drop(node)
        self.drop_identities(node)
        self.unpin(node)
        for parent, name in [(node.parent, node.name), *node.links]:
            if parent is not None and parent.children is not None and parent.children.get(name) is node:
                del parent.children[name]

    def revive(self, node: Node, parent: Node, name: str) -> None:
        """A removed node found again under another name (a hardlink the kernel had not seen)."""
        node.deleted = False
        node.parent, node.name = parent, name
        node.gone_stat = None
        self.unpin(node)  # the new name keeps the object now

    def close_pins(self) -> None:
        for node in self.by_ino.values():
            self.unpin(node)

    def is_last_name(self, node: Node, parent: Node, name: str) -> bool:
        """Whether removing ``parent/name`` removes the last name of ``node`` we know."""
        return not node.links and node.parent is parent and node.name == name

    def unlink_name(self, node: Node, parent: Node, name: str) -> None:
        """Forget that ``node`` is known as ``parent/name`` (after unlink or rename away)."""
        if parent.children is not None and parent.children.get(name) is node:
            del parent.children[name]
        if node.parent is parent and node.name == name:
            if node.links:
                node.parent, node.name = node.links.pop(0)
            else:
                node.deleted = True
        else:
            try:
                node.links.remove((parent, name))
            except ValueError:
                pass
