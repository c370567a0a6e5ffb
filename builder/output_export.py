"""``lamina build --output``: the built image's files, merged, written out (BuildKit's exporters).

- ``type=local,dest=DIR`` (or ``-o DIR``): the files into ``DIR`` (created if missing), owned by the
  user who runs the build, as BuildKit's local exporter does; permission bits and times as in the
  image. Device nodes are left out (an unprivileged user cannot make them).
- ``type=tar,dest=FILE`` (or ``-o -``, ``dest=-``: standard output): one tar of the merged files,
  with the owners, modes and times the image records.

Only what the final stage shows is written: whiteouts and opaque directories are already resolved
by the merged view (:class:`builder.fsops.LayerView`). Writing into ``DIR`` never follows a symlink
that is already there or that the image brings: an existing entry in the way is replaced.
"""

from __future__ import annotations

import csv
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from builder.fsops import Entry, LayerView, intended_owner, remove_existing
from lamina.errors import UsageError
from unionfs.core import ondisk


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # local or tar
    dest: str  # a directory, a file, or "-" (standard output, tar only)


def parse_output(text: str) -> OutputSpec:
    """``type=local,dest=DIR``, ``type=tar,dest=FILE|-``, ``DIR`` or ``-`` (buildx's forms)."""
    flag = f"--output {text}"
    if text == "-":
        return OutputSpec("tar", "-")
    if "=" not in text:
        return OutputSpec("local", text)
    try:
        items = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise UsageError(f"{flag}: expected type=local,dest=DIR or type=tar,dest=FILE") from None
    fields = {}
    for item in items:
        key, has_value, value = item.partition("=")
        if not has_value:
            raise UsageError(f"{flag}: invalid field {item!r}: must be a key=value pair")
        fields[key.strip().lower()] = value
    kind = fields.pop("type", "")
    if kind not in ("local", "tar"):
        raise UsageError(f"{flag}: unsupported output type {kind!r} (lamina writes type=local and type=tar; "
                         "the image itself always goes to the store)")
    dest = fields.pop("dest", "")
    if not dest:
        raise UsageError(f"{flag}: dest= is required")
    if dest == "-" and kind == "local":
        raise UsageError(f"{flag}: a local output needs a directory, not standard output")
    if fields:
        raise UsageError(f"{flag}: unexpected key {sorted(fields)[0]!r}")
    return OutputSpec(kind, dest)


def _children(view: LayerView, entry: Entry) -> Iterator[Entry]:
    for name, backing, st, merged in view.list_dir(entry):
        yield Entry(f"{entry.path.rstrip('/')}/{name}", backing, st, merged)


def _name(entry: Entry) -> str:
    return entry.path.rsplit("/", 1)[1]


def _mode(entry: Entry) -> int:
    return intended_owner(entry.backing, entry.st)[2]


def write_local(view: LayerView, dest: str) -> None:
    """The merged files into the directory ``dest``."""
    os.makedirs(dest, exist_ok=True)
    root = view.lookup("/")
    assert root is not None
    directories: list[tuple[str, Entry]] = []
    pending = [(os.path.join(dest, _name(child)), child) for child in _children(view, root)]
    while pending:
        target, entry = pending.pop()
        mode = entry.st.st_mode
        if stat.S_ISDIR(mode):
            if not os.path.isdir(target) or os.path.islink(target):
                remove_existing(target)
                os.mkdir(target, 0o700)
            directories.append((target, entry))
            pending.extend((os.path.join(target, _name(child)), child) for child in _children(view, entry))
            continue
        if ondisk.device_placeholder(entry.backing, entry.st) is not None or not (
                stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISFIFO(mode)):
            continue
        remove_existing(target)
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry.backing), target)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, 0o600)
        else:
            shutil.copyfile(entry.backing, target, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(target, _mode(entry) & 0o7777)
        os.utime(target, ns=(entry.st.st_atime_ns, entry.st.st_mtime_ns), follow_symlinks=False)
    # Directories last, deepest first: a read-only one must not stop what goes inside it.
    for target, entry in reversed(directories):
        os.chmod(target, (_mode(entry) & 0o7777) | 0o700)
        os.utime(target, ns=(entry.st.st_atime_ns, entry.st.st_mtime_ns), follow_symlinks=False)


def write_tar(view: LayerView, out: IO[bytes]) -> None:
    """The merged files as one tar stream on ``out``."""
    root = view.lookup("/")
    assert root is not None
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        pending = list(reversed(list(_children(view, root))))
        while pending:
            entry = pending.pop()
            info = tarfile.TarInfo(entry.path.lstrip("/"))
            uid, gid, mode = intended_owner(entry.backing, entry.st)
            info.uid, info.gid, info.mode = uid, gid, mode & 0o7777
            info.mtime = entry.st.st_mtime
            device = ondisk.device_placeholder(entry.backing, entry.st)
            kind = device[0] if device is not None else stat.S_IFMT(entry.st.st_mode)
            if device is not None:
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(device[1]), os.minor(device[1])
                tar.addfile(info)
            elif stat.S_ISDIR(kind):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                pending.extend(reversed(list(_children(view, entry))))
            elif stat.S_ISLNK(kind):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.backing)
                tar.addfile(info)
            elif stat.S_ISREG(kind):
                info.size = entry.st.st_size
                with open(entry.backing, "rb") as f:
                    tar.addfile(info, f)
            elif stat.S_ISFIFO(kind):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(entry.st.st_rdev), os.minor(entry.st.st_rdev)
                tar.addfile(info)


def write_output(view: LayerView, spec: OutputSpec, stdout: IO[bytes]) -> None:
    if spec.kind == "local":
        write_local(view, spec.dest)
    elif spec.dest == "-":
        write_tar(view, stdout)
        stdout.flush()
    else:
        with open(spec.dest, "wb") as out:
            write_tar(view, out)
