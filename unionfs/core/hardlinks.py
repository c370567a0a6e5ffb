"""The hard-link index: what lamina keeps in WORK/lamina-index, across mounts.

Three kinds of record live there, all about lower objects and their upper copies:

* ``SLOT-INO``: a hard link to the upper copy of lower object ``INO`` of layer ``SLOT``, made when a
  lower file with several names is copied up (like the kernel's index=on), so its other names find
  the copy instead of the stale lower data. Its ``*.overlay.lamina.nlink`` xattr holds the file's
  link count in the merged view (the upper's own count includes the index link and misses lower
  names not linked up yet), as the kernel keeps it in trusted.overlay.nlink.
* ``nSLOT-INO``: the link count of a lower hardlink that lost a name without being copied up.
  When one name of a lower hardlink is removed, the others must count one name less, in this mount
  and after a remount. The kernel copies the file up to have an index entry to keep that count in;
  lamina keeps just the count, a symlink whose target is the decimal count, written after the
  removal; the data stays in the lower until a write copies it up (copy-up then moves the count
  onto the index entry and drops the record). The upper is the same as the kernel's (a whiteout);
  only the kernel's count differs, as it does for any index lamina keeps.
* ``uINO``: where upper object ``INO`` came from (``SLOT:INO``), for copies that cannot carry the
  origin xattr (user.* is refused on symlinks, fifos and devices). Removed with the object, so the
  next object to get the number does not inherit a lower object's inode number.

Records are symlinks where they hold a value: made in one step (no data block, nothing
half-written after a crash) and read in one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from unionfs.core import fsat
from unionfs.core.backing import exists_at, getxattr_at, setxattr_at
from unionfs.core.nodes import Node

# The index's directory in WORK (kept across mounts, like the kernel's index=on).
INDEX_SUBDIR = "lamina-index"


def index_entry_name(slot: int, ino: int) -> str:
    """The name in WORK/lamina-index of the upper copy of lower object ``ino`` of layer ``slot``
    (a link-count record of it adds an "n" in front)."""
    return f"{slot}-{ino}"


class HardlinkIndex:
    """Index entries, link-count records and origin records of one mount's workdir.

    Resource handling: ``fd`` (WORK/lamina-index, -1 for a read-only union) and ``work_fd`` are
    owned by whoever opened them (see unionfs.core.dirs); this object only uses them.
    """

    def __init__(self, fd: int, work_fd: int, nlink_xattr: str, used: bool,
                 tmp_name: Callable[[], str]) -> None:
        self.fd = fd
        self.work_fd = work_fd  # scratch directory for records replaced in one rename
        self._tmp_name = tmp_name  # a fresh name in it
        self.nlink_xattr = nlink_xattr
        # Whether the index holds anything: most mounts never make an entry, and then no lookup
        # needs to ask it.
        self.used = used

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def has_entry(self, slot: int, ino: int) -> bool:
        return self.used and exists_at(self.fd, index_entry_name(slot, ino))

    @staticmethod
    def has_one_lower_name(node: Node) -> bool:
        """A lower-only object known to have a single name: no index entry or link-count record
        can exist for it, as both are made only for lower objects with several names."""
        st = node.lower_st
        return st is not None and not node.in_upper and st.st_nlink == 1

    def key(self, node: Node) -> str | None:
        """The index entry of a copied-up lower hardlink, if it has one."""
        if node.is_dir or self.fd < 0 or not self.used or self.has_one_lower_name(node):
            return None
        for slot, ino in node.identities:
            if slot:
                key = index_entry_name(slot, ino)
                if exists_at(self.fd, key):
                    return key
        return None

    def link_copy(self, upper_fd: int, upper_path: str, slot: int, ino: int) -> None:
        """Make the index entry of a lower hardlink just copied up to ``upper_path``."""
        try:
            fsat.link(upper_path, index_entry_name(slot, ino), src_dir_fd=upper_fd, dst_dir_fd=self.fd,
                      follow_symlinks=False)
        except FileExistsError:
            pass
        self.used = True

    # --- link counts of lower hardlinks that lost a name ------------------------------------------

    @staticmethod
    def _link_count_record(node: Node) -> str | None:
        for slot, ino in node.identities:
            if slot:
                return "n" + index_entry_name(slot, ino)
        return None

    def recorded_link_count(self, node: Node) -> int | None:
        """The merged link count of a lower hardlink that lost names without being copied up."""
        if self.fd < 0 or not self.used:
            return None
        name = self._link_count_record(node)
        if name is None:
            return None
        try:
            return int(os.readlink(name, dir_fd=self.fd))
        except (FileNotFoundError, ValueError):
            return None

    def record_link_count(self, node: Node, count: int) -> None:
        """Keep ``count`` as the link count of the lower hardlink ``node``."""
        name = self._link_count_record(node)
        if name is None or self.fd < 0:
            return
        value = str(max(count, 0))
        try:
            fsat.symlink(value, name, dir_fd=self.fd)
        except FileExistsError:
            tmp = self._tmp_name()  # in the scratch directory, emptied at mount if we crash here
            fsat.symlink(value, tmp, dir_fd=self.work_fd)
            fsat.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=self.fd)
        self.used = True

    def drop_link_count_record(self, node: Node) -> None:
        name = self._link_count_record(node)
        if name is not None and self.used:
            try:
                fsat.unlink(name, dir_fd=self.fd)
            except FileNotFoundError:
                pass

    def lower_hardlink_count(self, node: Node, lower_nlink: Callable[[Node], int]) -> int | None:
        """For a lower-only file with several names (that are counted, see ``nlink``): how many
        it has now; ``lower_nlink`` gives the lower object's own count. None for anything else."""
        if node.is_dir or self.fd < 0 or self.has_one_lower_name(node):
            return None
        recorded = self.recorded_link_count(node)
        if recorded is not None:
            return recorded
        count = lower_nlink(node)
        return count if count > 1 else None

    # --- link counts of indexed copies ------------------------------------------------------------

    def nlink(self, node: Node, st: os.stat_result, *, removed: bool = False) -> int:
        """The link count of a non-merged object as callers see it.

        ``removed``: ``st`` is an fstat of a file open after its last known name went. The kernel
        reports the upper object's own count then (0, or what its other upper names keep), and for
        an indexed hardlink the merged count, where the index's own link may be the only one left.
        """
        if not node.in_upper and not node.is_dir and st.st_nlink > 1 and self.used:
            recorded = self.recorded_link_count(node)
            return st.st_nlink if recorded is None else recorded
        if node.is_dir or not node.in_upper or self.fd < 0 or (st.st_nlink < 2 and not removed):
            return st.st_nlink
        key = self.key(node)
        if key is None:
            return st.st_nlink
        return self._indexed_count(key, st.st_nlink)

    def _indexed_count(self, key: str, index_nlink: int) -> int:
        raw = getxattr_at(self.fd, key, self.nlink_xattr)
        try:
            return int(raw) if raw else index_nlink - 1
        except ValueError:
            return index_nlink - 1

    def adjust_nlink(self, node: Node, delta: int) -> None:
        """An indexed hardlink gained (+1) or lost (-1) a name."""
        key = self.key(node)
        if key is None:
            return
        st = fsat.stat(key, dir_fd=self.fd, follow_symlinks=False)
        current = self._indexed_count(key, st.st_nlink)
        setxattr_at(self.fd, key, self.nlink_xattr, str(max(current + delta, 0)).encode())

    # --- origins of upper objects that cannot carry the origin xattr ------------------------------

    def origin_of(self, upper_ino: int) -> bytes | None:
        """The recorded origin (``SLOT:INO``) of upper object ``upper_ino``, if any."""
        if not self.used:
            return None
        try:
            return os.fsencode(fsat.readlink(f"u{upper_ino}", dir_fd=self.fd))
        except OSError:
            return None

    def record_origin(self, upper_ino: int, origin: str) -> None:
        name = f"u{upper_ino}"
        try:
            fsat.unlink(name, dir_fd=self.fd)  # a stale entry of a removed file with the same number
        except FileNotFoundError:
            pass
        fsat.symlink(origin, name, dir_fd=self.fd)
        self.used = True

    def drop_origin(self, upper_ino: int) -> None:
        """Remove the record of where upper object ``upper_ino`` came from: that object is gone, and
        the next object to get the number must not inherit its origin (and with it a lower object's
        inode number). Also run for every new object, for records a crash left between removing an
        object and its record."""
        if self.used:
            try:
                fsat.unlink(f"u{upper_ino}", dir_fd=self.fd)
            except FileNotFoundError:
                pass
