"""The store is private to its owner: nobody else may reach image or container content through it.

Layers hold what images say, and an image may say "a setuid-root shell", "a file with
security.capability" or "a 0666 device node for /dev/mem". Unpacked as root (or as the user, for
their own ids), those files are real; any local user who can walk to them can run or open them
(``STORE/layers/<hex>/diff/suid`` printed euid=0 for another user when the store was 0755). So, as
containers-storage (``/var/lib/containers/storage`` and its layer directories are 0700) and docker
(``/var/lib/docker`` 0710, its layer directories 0710) do:

* the store root and every directory directly below it that holds content (``Layout.CONTENT_DIRS``)
  are 0700, and so is each layer (``layers/<hex>``), container (``containers/<id>``), mount
  (``mounts/<id>``) and anonymous volume (``volumes/<id>``) directory, so content stays
  unreachable even if a parent is opened by hand. An existing root is changed only when it holds
  nothing but the store: ``--root /tmp`` must not close /tmp, and the content directories are what
  keep others out. 0700, not docker's 0710: every process that walks the store is the owner's own
  (lamina, its unionfs servers, and root of its user namespace, which is the owner's uid), and
  containers reach their files through the union mount and bind mounts, not through these paths;
* a store made before this (0755 everywhere) is tightened by the next lamina command that touches
  it (:func:`tighten`, one ``lstat`` per top-level directory); ``lamina system check`` reports
  what was tightened (an open store is a finding: its content may have been reached already) and
  closes the per-object directories too (:func:`tighten_objects`).

The directory *inside* a layer (``diff/``) keeps the mode the image gives its root, since that is
the container's ``/``: it is protected by its parents.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from lamina.layout import Layout

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o700
# realpath of a store root -> what tighten() changed there in this process.
_TIGHTENED: dict[str, list[str]] = {}


def make_private_dir(path: Path) -> None:
    """Create ``path`` (its parent must exist) as 0700, whatever the umask; an existing one is left."""
    try:
        os.mkdir(path, PRIVATE_MODE)
    except FileExistsError:
        return
    os.chmod(path, PRIVATE_MODE)


def _tighten_one(path: Path) -> str | None:
    """Make one directory 0700 when others can reach it; a description of the change, or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(st.st_mode) or not st.st_mode & 0o077:
        return None
    os.chmod(path, PRIVATE_MODE)
    return f"{path}: was mode {stat.S_IMODE(st.st_mode):04o}, open to other users; made {PRIVATE_MODE:04o}"


def _holds_only_the_store(root: Path) -> bool:
    """True when ``root`` is lamina's alone, so its mode is ours to change.

    ``--root /tmp`` or ``--root ~`` must not make /tmp or a home directory private: there only the
    content directories are closed (which is what keeps others out), not the directory itself.
    """
    try:
        st = os.lstat(root)
        names = set(os.listdir(root))
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_ISVTX and names <= Layout.ENTRIES


def tighten(where: Layout | Path) -> list[str]:
    """Close the store root and its content directories to other users; what was changed.

    Error handling: a directory we may not chmod (not ours) raises PermissionError.
    """
    root = Layout.of(where).root
    targets = [root / d for d in Layout.CONTENT_DIRS]
    if _holds_only_the_store(root):
        targets.insert(0, root)
    changed = [c for c in map(_tighten_one, targets) if c]
    for change in changed:
        log.warning("the store was open to other users: %s", change)
    _TIGHTENED.setdefault(os.path.realpath(root), []).extend(changed)
    return changed


def tightened_by_this_process(where: Layout | Path) -> list[str]:
    """What :func:`tighten` changed in the store since this process started (for ``system check``)."""
    return list(_TIGHTENED.get(os.path.realpath(Layout.of(where).root), []))


def tighten_if_present(where: Layout | Path) -> None:
    """:func:`tighten` an existing store; do nothing where there is none (or it is not ours)."""
    try:
        tighten(where)
    except PermissionError:
        log.debug("cannot tighten the store %s: not its owner", Layout.of(where).root)


def foreign_owner(where: Layout | Path) -> list[str]:
    """A problem for ``system check`` when the store belongs to someone else (who could change it)."""
    root = Layout.of(where).root
    owner = os.lstat(root).st_uid
    if owner == os.geteuid():
        return []
    return [f"{root}: owned by uid {owner}, not by the user running lamina ({os.geteuid()})"]


def tighten_objects(where: Layout | Path) -> int:
    """Make every layer, container and mount directory 0700 (a second wall behind the root's);
    the number changed. An older lamina made them 0755; :func:`tighten` already closed their parents,
    so this is hardening, not a finding."""
    root = Layout.of(where).root
    changed = 0
    for top in Layout.PER_OBJECT_DIRS:
        try:
            entries = list(os.scandir(root / top))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
                os.chmod(entry.path, PRIVATE_MODE)
                changed += 1
    if changed:
        log.info("made %d layer, container and mount directories private", changed)
    return changed
