"""Plain directory entries (name, type, inode number; no attributes) in pyfuse3's listings.

The kernel asks a FUSE filesystem for listings with READDIRPLUS, and pyfuse3 3.5 answers only that
way: every entry carries a node id and attributes, and the kernel makes (or refreshes) an inode
from them. Attributes sent that way must be true for as long as the kernel keeps them (see
unionfs.fuse_ops), so an entry needs a stat of its backing object -- for ``ls`` or ``find`` over a
big directory, a stat per entry that nobody asked for. The kernel has the cheaper answer built in:
an entry whose node id is 0 is a plain READDIR entry (``fuse_direntplus_link`` ignores it: no inode,
no dentry, no lookup counted), and the name, type and inode number reach the caller all the same.

pyfuse3 cannot say that: ``EntryAttributes.st_ino`` sets both the node id and the ``d_ino`` of the
entry, and a ``d_ino`` of 0 makes glibc skip the entry. :func:`bare_entry_writer` writes only the
node id of one EntryAttributes object to 0, through the object's memory: a pyfuse3
``EntryAttributes`` is ``PyObject_HEAD`` followed by libfuse's ``struct fuse_entry_param``
(``fuse_ino_t ino`` first, then ``generation``, then ``struct stat attr``, whose ``st_ino`` follows
``st_dev``). A self-test checks that layout on a probe object before anything is written; anything
unexpected (another architecture, another object size, a field where it should not be) leaves
pyfuse3 alone, and listings then carry true attributes for every entry.

Switch: ``LAMINA_UNIONFS_BARE_ENTRIES=off`` (or 0/no/false) in the server's environment turns this
off, and so does ``LAMINA_NO_PATCHES=1``, the switch for every change lamina makes to another
library at run time (:mod:`unionfs.startup`); listings then always carry true attributes (the tests
run both ways).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

from unionfs import startup

log = logging.getLogger(__name__)

SWITCH = "LAMINA_UNIONFS_BARE_ENTRIES"
_OFF_VALUES = {"off", "0", "no", "false"}

_HEAD = 16  # PyObject_HEAD on 64-bit: reference count, type pointer
_STAT_SIZE = 144  # struct stat on x86_64
# fuse_entry_param: ino, generation, struct stat, attr_timeout, entry_timeout; then pyfuse3's pointer
_OBJECT_SIZE = _HEAD + 8 + 8 + _STAT_SIZE + 8 + 8 + 8
_WORDS = 6  # ino, generation, st_dev, st_ino, st_nlink, st_mode|st_uid


class _Unsupported(Exception):
    pass


def enabled_by_environment() -> bool:
    return startup.patches_enabled() and os.environ.get(SWITCH, "").strip().lower() not in _OFF_VALUES


def bare_entry_writer(entry_type: Any) -> Callable[[Any], None] | None:
    """A function that makes one ``entry_type`` (pyfuse3.EntryAttributes) object a plain entry
    (node id 0; ``d_ino`` and type unchanged), or None when that cannot be done safely here.

    The function must be called after every ``st_ino`` assignment (which sets the node id again).
    """
    if not enabled_by_environment():
        log.debug("bare entries: off (%s or %s)", SWITCH, startup.NO_PATCHES_ENV)
        return None
    try:
        _check_layout(entry_type)
    except (_Unsupported, AttributeError, TypeError, ValueError, OverflowError) as e:
        log.debug("bare entries: not used: %s", e)
        return None

    def make_bare(entry: Any) -> None:
        ctypes.c_uint64.from_address(id(entry) + _HEAD).value = 0

    return make_bare


def _check_layout(entry_type: Any) -> None:
    if struct.calcsize("P") != 8 or os.uname().machine != "x86_64":
        raise _Unsupported("not x86_64")
    if getattr(entry_type, "__basicsize__", None) != _OBJECT_SIZE:
        raise _Unsupported(f"object size {getattr(entry_type, '__basicsize__', None)}, expected {_OBJECT_SIZE}")
    probe = entry_type()
    ino, generation, mode = 0x1122334455667788, 0x0102030405060708, 0o100644
    probe.st_ino = ino
    probe.generation = generation
    probe.st_mode = mode
    words = (ctypes.c_uint64 * _WORDS).from_address(id(probe) + _HEAD)
    if (words[0], words[1], words[3], words[5] & 0xFFFFFFFF) != (ino, generation, ino, mode):
        raise _Unsupported("EntryAttributes does not hold fuse_entry_param where expected")
    words[0] = 0
    if (probe.st_ino, probe.generation, words[3], probe.st_mode) != (0, generation, ino, mode):
        raise _Unsupported("writing the node id changed something else")
