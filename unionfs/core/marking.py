"""Whiteouts and opaque/redirect markers written into the upper, in the overlayfs format.

The format itself (names, xattrs, what counts as a whiteout) is unionfs.core.ondisk's; this module
decides how this mount writes it. Whiteouts are char 0/0 devices where mknod works (hard links to a
shared one in the workdir, as the kernel makes them), else ``.wh.NAME`` files. Markers go in the one
xattr namespace this mount may write (trusted.* as root in the initial namespace, user.* otherwise),
both probed once at mount.

Replacing an upper entry by a whiteout is atomic: the whiteout is built in the workdir and renamed
(or, over a directory, exchanged) into place, so the name never shows the lower object in between.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from unionfs.core import fsat, ondisk
from unionfs.core.backing import (
    RENAME_EXCHANGE,
    Layer,
    getxattr_at,
    join,
    lstat_at,
    open_dir_at,
    remove_tree_at,
    renameat2,
    setxattr_at,
)
from unionfs.core.nodes import Node

log = logging.getLogger(__name__)

# In WORK/work: the char 0/0 device that whiteouts are hard links to (see make_char_whiteout).
SHARED_WHITEOUT = "whiteout"


def probe_xattr_namespace(upper: Layer | None, work_fd: int) -> ondisk.XattrNamespace:
    """trusted.* when we may write it (root in the initial namespace), user.* otherwise.

    Probed, not guessed from the uid map: a user namespace mapping every id still lacks
    CAP_SYS_ADMIN over the initial namespace, which trusted.* needs.
    """
    guess = ondisk.XattrNamespace.for_current_user()
    if upper is None or guess is ondisk.XattrNamespace.USER:
        return guess
    probe = "xattr-probe"
    fsat.mkdir(probe, 0o700, dir_fd=work_fd)
    try:
        setxattr_at(work_fd, probe, ondisk.TRUSTED_OPAQUE, b"y")
    except OSError:
        return ondisk.XattrNamespace.USER
    finally:
        fsat.rmdir(probe, dir_fd=work_fd)
    return ondisk.XattrNamespace.TRUSTED


def probe_whiteout_style(upper: Layer | None, work_fd: int) -> ondisk.WhiteoutStyle:
    """Char 0/0 whiteouts where mknod works; the probe stays as the shared whiteout."""
    if upper is None:
        return ondisk.WhiteoutStyle.CHAR_DEVICE
    try:
        fsat.mknod(SHARED_WHITEOUT, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=work_fd)
    except PermissionError:
        return ondisk.WhiteoutStyle.WH_FILE
    return ondisk.WhiteoutStyle.CHAR_DEVICE


class Marking:
    """Writes whiteouts and directory markers into the upper of one mount.

    Resource handling: uses the upper's and the scratch directory's descriptors, owned by
    unionfs.core.dirs.UnionDirs; owns nothing.
    """

    def __init__(self, upper: Layer | None, work_fd: int, xattr_ns: ondisk.XattrNamespace,
                 whiteout_style: ondisk.WhiteoutStyle, tmp_name: Callable[[], str],
                 emit: Callable[[str], None]) -> None:
        self.upper_fd = upper.fd if upper is not None else -1
        self.work_fd = work_fd
        self.xattr_ns = xattr_ns
        self.whiteout_style = whiteout_style
        self.tmp_name = tmp_name
        self.emit = emit

    def _upper(self) -> int:
        if self.upper_fd < 0:
            raise OSError(errno.EROFS, "read-only union")
        return self.upper_fd

    # --- whiteouts -------------------------------------------------------------------------------

    def make_char_whiteout(self, dir_fd: int, path: str) -> None:
        """A char 0/0 whiteout at ``path`` under ``dir_fd`` (upper or workdir).

        A hard link to the workdir's shared whiteout, as the kernel's overlayfs makes them: a new
        name only, where mknod would also allocate an inode (14 µs instead of 55 on this ext4).
        Where linking is refused (the link limit, a filesystem without hard links) a new device
        node is made instead; FileExistsError goes to the caller either way.
        """
        try:
            fsat.link(SHARED_WHITEOUT, path, src_dir_fd=self.work_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return
        except FileExistsError:
            raise
        except OSError as e:
            log.debug("whiteout /%s: no link to the shared one (%s)", path, e.strerror)
            refused = e.errno
        fsat.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        if refused in (errno.EMLINK, errno.ENOENT):
            # Start a fresh shared whiteout for the next ones (the full one keeps its links).
            tmp = self.tmp_name()
            try:
                fsat.mknod(tmp, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=self.work_fd)
                fsat.rename(tmp, SHARED_WHITEOUT, src_dir_fd=self.work_fd, dst_dir_fd=self.work_fd)
            except OSError as e2:
                log.debug("no new shared whiteout: %s", e2.strerror)

    def whiteout(self, parent: Node, name: str, *, upper_vacant: bool = False) -> None:
        """Replace whatever the upper has at ``parent/name`` with a whiteout. ``upper_vacant``: the
        caller knows the upper has nothing there (the name shows a lower object)."""
        ufd = self._upper()
        ppath = parent.path()
        path = join(ppath, name)
        st = None if upper_vacant else lstat_at(ufd, path)
        if self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE and st is None:
            # nothing to replace: creating the whiteout is one atomic step already
            self.make_char_whiteout(ufd, path)
        elif self.whiteout_style is ondisk.WhiteoutStyle.CHAR_DEVICE:
            tmp = self.tmp_name()
            self.make_char_whiteout(self.work_fd, tmp)
            if st is not None and stat.S_ISDIR(st.st_mode):
                renameat2(self.work_fd, tmp, ufd, path, RENAME_EXCHANGE)
                remove_tree_at(self.work_fd, tmp)
            else:
                fsat.rename(tmp, path, src_dir_fd=self.work_fd, dst_dir_fd=ufd)
        else:
            pfd = open_dir_at(ufd, ppath)
            try:
                if not ondisk.whiteout_file_at(pfd, name):
                    ondisk.make_whiteout(pfd, name, ondisk.WhiteoutStyle.WH_FILE)
            finally:
                os.close(pfd)
            if st is not None:
                remove_tree_at(ufd, path)
        self.emit(f"whiteout /{path}")

    def upper_whiteout_at(self, ppath: str, name: str) -> str | None:
        """'char' or 'file' when the upper holds a whiteout for ``name``; None otherwise."""
        ufd = self._upper()
        st = lstat_at(ufd, join(ppath, name))
        if st is not None and ondisk.is_whiteout_stat(st):
            return "char"
        if ondisk.whiteout_file_at(ufd, join(ppath, name)):
            return "file"
        return None

    def drop_whiteout_file(self, ppath: str, name: str) -> None:
        """Remove the ``.wh.NAME`` whiteout (if any) of a name that now shows an upper object."""
        ondisk.remove_whiteout_file_at(self._upper(), join(ppath, name))

    def drop_whiteouts(self, path: str) -> None:
        """Remove the whiteouts below an upper directory that now holds everything it shows and
        becomes opaque: the kernel lists a pure upper directory as it is, whiteouts included."""
        ufd = self._upper()
        dfd = fsat.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
        try:
            with os.scandir(dfd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                           for e in it]
            dst: os.stat_result | None = None
            for name, is_dir, is_file in entries:
                if is_dir:
                    self.drop_whiteouts(join(path, name))
                elif (ondisk.whited_out_name(name) is not None and is_file) or \
                        (not is_file and ondisk.is_whiteout_stat(fsat.stat(name, dir_fd=dfd, follow_symlinks=False))):
                    if dst is None:
                        dst = os.fstat(dfd)
                    fsat.unlink(name, dir_fd=dfd)
            if dst is not None:
                # What the directory shows did not change: neither do its times (as with copy-up).
                os.utime(dfd, ns=(dst.st_atime_ns, dst.st_mtime_ns))
        finally:
            os.close(dfd)

    # --- directory markers -----------------------------------------------------------------------

    def set_opaque(self, fd: int, path: str) -> None:
        """Mark a directory opaque without a trace line (one built in the workdir)."""
        ondisk.set_marker_at(fd, path, self.xattr_ns, opaque=True)

    def mark_opaque(self, path: str) -> None:
        self.set_opaque(self._upper(), path)
        self.emit(f"opaque /{path}")

    def set_redirect(self, path: str, target: str) -> None:
        """Point upper directory ``path`` at lower path ``target`` (absolute, from a layer root)."""
        ufd = self._upper()
        current = getxattr_at(ufd, path, self.xattr_ns.redirect_xattr)
        if current != os.fsencode(target):
            ondisk.set_marker_at(ufd, path, self.xattr_ns, redirect=target)

    def redirect_of(self, path: str) -> str | None:
        """The redirect of upper directory ``path`` (in either namespace), if it has one."""
        return ondisk.redirect_at(self._upper(), path)

    def remove_redirect(self, path: str) -> None:
        """Remove the redirect of upper directory ``path`` (in both namespaces)."""
        ondisk.clear_redirect_at(self._upper(), path)
