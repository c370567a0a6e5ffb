"""COPY and ADD: sources resolved (context, heredocs, URLs, other stages or images) and written
straight into a fresh layer directory, following docker's rules.

Destination rules: a destination ending in ``/`` (or an existing directory of the image) receives
the sources by name; otherwise it names the copy itself. Several sources, or a wildcard, need a
directory destination. A source directory's *contents* are copied. A relative destination is
relative to WORKDIR; symlinks of the image along the destination are resolved inside the image.
Owners: context files and heredocs belong to root unless ``--chown``; files of another stage keep
their owners. ADD extracts local tar archives (validated by the store's unpacker) and downloads
URLs (checked against ``--checksum`` when given).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from builder.context import has_glob
from builder.fsops import (
    LayerView,
    Ownership,
    copy_times,
    copy_view_entry,
    ensure_parents,
    intended_owner,
    remove_existing,
    resolve_dir_in_image,
    set_owner_mode,
    settle_dir_times,
)
from builder.remote import check
from lamina.bounded import InputTooLarge
from lamina.errors import BuildError, LaminaError
from runner.userdb import find_entry

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from builder.layer_instructions import CopyStep
    from builder.lines import Heredoc
    from builder.step import StepContext


def resolve_chown(view: LayerView, step: CopyStep) -> tuple[int | None, int | None]:
    """``--chown=user[:group]`` by name (the image's /etc/passwd and /etc/group) or number; a user
    without a group uses the same number as gid (Dockerfile reference)."""
    spec = step.chown
    if spec is None:
        return None, None
    user, _, group = spec.partition(":")

    def lookup(db: str, name: str) -> int:
        if name.isdigit():
            return int(name)
        try:
            entry = find_entry(open_in_view(view, db), db, 3, lambda f: f[0] == name and f[2].isdigit())
        except InputTooLarge as e:
            raise step.error(f"--chown={spec}: {e}") from None
        if entry is None:
            raise step.error(f"--chown={spec}: no {'user' if db == '/etc/passwd' else 'group'} named "
                             f"{name!r} in the image's {db}")
        return int(entry[2])

    if not user:
        raise step.error(f"--chown={spec}: missing user")
    uid = lookup("/etc/passwd", user)
    gid = lookup("/etc/group", group) if group else uid
    return uid, gid


def open_in_view(view: LayerView, path: str) -> IO[bytes] | None:
    """The regular file ``path`` of an image, opened for the bounded user database parser."""
    entry = view.lookup(path)
    if entry is None or not stat.S_ISREG(entry.st.st_mode):
        return None
    return open(entry.backing, "rb")


def resolve_user(view: LayerView, spec: str) -> tuple[int, int]:
    """USER's ``user[:group]`` as numbers, for directories WORKDIR creates (BuildKit makes them the
    user's): names from the image's /etc/passwd and /etc/group; an unknown name falls back to root."""
    user, _, group = spec.partition(":")
    uid, gid = 0, 0
    fields = find_entry(open_in_view(view, "/etc/passwd"), "/etc/passwd", 3,
                        lambda f: f[0] == user or f[2] == user)
    if fields is not None:
        uid = int(fields[2]) if fields[2].isdigit() else 0
        gid = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else 0
    else:
        uid = int(user) if user.isdigit() else 0
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = find_entry(open_in_view(view, "/etc/group"), "/etc/group", 3,
                               lambda f: f[0] == group and f[2].isdigit())
            gid = int(found[2]) if found is not None else 0
    return uid, gid


# One source after glob expansion: (kind, handle, basename). Kinds: "heredoc" (a Heredoc),
# "url" (the URL), "view" ((LayerView, Entry) of another stage or image), "context" (a relative path).
Item = tuple[str, Any, str]


def make_workdir(path: str, ctx: StepContext, diff: Path) -> None:
    """WORKDIR's missing directory ``path``: made 0755, owned by USER's ids (as BuildKit does)."""
    view = ctx.view()
    user = ctx.image.user
    owner = resolve_user(view, user) if user else (0, 0)
    resolved = resolve_dir_in_image(view, path)
    ensure_parents(str(diff), view, resolved, new_owner=owner)
    settle_dir_times(str(diff), view, resolved, new_dir_time_ns(ctx.epoch))


def _collect_items(step: CopyStep, ctx: StepContext) -> tuple[list[Item], list[str]]:
    """Every source after glob expansion, and the source each item came from (``--parents``' pivot)."""
    items: list[Item] = []
    item_sources: list[str] = []
    last_source = ""
    try:
        for source in step.sources:
            item_sources.extend([last_source] * (len(items) - len(item_sources)))
            last_source = source
            doc = step.heredoc_for(source)
            if doc is not None:
                items.append(("heredoc", doc, doc.name))
            elif step.is_remote(source):
                items.append(("url", source, ctx.services.downloads.fetch(source, step.instruction).filename))
            elif step.from_stage is not None:
                src_view = step.source_stage(ctx).view
                for match in _view_glob(src_view, source):
                    items.append(("view", (src_view, match), posixpath.basename(match.path) or "/"))
            else:
                for rel in ctx.services.context.resolve(source):
                    items.append(("context", rel, posixpath.basename(rel) if rel != "." else "."))
        item_sources.extend([last_source] * (len(items) - len(item_sources)))
    except BuildError as e:
        raise step.error(f"{step.instruction.keyword} failed: {e}") from None
    return items, item_sources


def copy_into_layer(step: CopyStep, ctx: StepContext, tmp: Path, diff: Path) -> None:
    """COPY or ADD: write ``step``'s sources into the layer directory ``diff`` (docker's rules, see
    the module docstring); ``tmp`` is the step's scratch directory."""
    view = ctx.view()
    uid, gid = resolve_chown(view, step)
    chmod = int(step.chmod, 8) if step.chmod else None
    from_other = step.from_stage is not None
    # Context files belong to root unless --chown; files of another stage keep their owners.
    owner = Ownership(uid=uid if uid is not None else (None if from_other else 0),
                      gid=gid if gid is not None else (None if from_other else 0), chmod=chmod)
    dest = step.dest
    if not dest.startswith("/"):
        dest = posixpath.join(ctx.image.workdir, dest)
    # --parents keeps each source's path under the destination, a directory whatever its spelling.
    dest_is_dir_syntax = (step.dest.endswith("/") or step.dest in (".", "..") or step.dest.endswith("/.")
                          or step.keeps_parents)
    dest = posixpath.normpath(dest)
    items, item_sources = _collect_items(step, ctx)
    many = len(items) > 1 or any(has_glob(s) for s in step.sources if not step.heredoc_for(s))
    dest_is_dir = dest_is_dir_syntax or view.exists_as_dir(dest)
    if many and not dest_is_dir:
        raise step.error(f"When using {step.instruction.keyword} with more than one source file, the "
                         "destination must be a directory and end with a /")
    parent = resolve_dir_in_image(view, dest if dest_is_dir else posixpath.dirname(dest))
    # BuildKit creates missing parents 0755, owned by the --chown owner (root without one).
    new_dir_owner = (uid if uid is not None else 0, gid if gid is not None else 0)
    target = _Target(ensure_parents(str(diff), view, parent, new_owner=new_dir_owner), dest_is_dir,
                     posixpath.basename(dest), parent, new_dir_owner)
    if step.keeps_parents:
        copy_keeping_parents(ctx, list(zip(items, item_sources, strict=True)), target.dir, owner)
        items = []
    for item in items:
        _copy_item(step, ctx, item, target, owner, tmp)
    for container_dir in target.settled:
        settle_dir_times(str(diff), view, container_dir, new_dir_time_ns(ctx.epoch))


class _Target:
    """Where the items of one COPY or ADD go, in the layer directory."""

    def __init__(self, host_dir: str, is_dir: bool, dest_name: str, parent: str,
                 new_dir_owner: tuple[int, int]) -> None:
        self.dir = host_dir  # the destination directory (or the one holding the destination file)
        self.is_dir = is_dir
        self.dest_name = dest_name
        self.parent = parent
        self.new_dir_owner = new_dir_owner
        self.settled = [parent]  # image directories whose times are settled at the end

    def file(self, basename: str) -> str:
        return os.path.join(self.dir, basename if self.is_dir else self.dest_name)

    def directory(self) -> str:
        """Where a directory source's contents go. Copied to a path that is not an existing
        directory, it becomes one, made as BuildKit makes missing directories (0755, the --chown
        owner; --chmod is for the copied contents only)."""
        if self.is_dir:
            return self.dir
        target = self.file("")
        if not os.path.isdir(target):
            remove_existing(target)
            os.mkdir(target)
            set_owner_mode(target, self.new_dir_owner[0], self.new_dir_owner[1], stat.S_IFDIR | 0o755)
        self.settled.append(posixpath.join(self.parent, self.dest_name))
        return target


def _copy_item(step: CopyStep, ctx: StepContext, item: Item, target: _Target, owner: Ownership,
               tmp: Path) -> None:
    kind, handle, basename = item
    if kind == "heredoc":
        _write_heredoc(target.file(basename), handle, owner)
    elif kind == "url":
        download = ctx.services.downloads.fetch(handle, step.instruction)
        check(download, handle, step.checksum, step.instruction)
        path = target.file(basename)
        remove_existing(path)
        shutil.copyfile(download.path, path)
        u, g, mode = owner.resolve(0, 0, stat.S_IFREG | 0o600)
        set_owner_mode(path, u, g, mode)
        os.utime(path, (download.mtime, download.mtime))
    elif kind == "view":
        src_view, entry = handle
        if entry.is_dir:
            into = target.directory()
            for name, backing, cst, merged in src_view.list_dir(entry):
                copy_view_entry(src_view, backing, cst, merged, os.path.join(into, name), owner)
        else:
            copy_view_entry(src_view, entry.backing, entry.st, (), target.file(basename), owner)
    else:
        rel = handle
        context = ctx.services.context
        host = context.host_path(rel)
        st = context.source_stat(rel)
        if stat.S_ISDIR(st.st_mode):
            context.copy_out(rel, target.directory(), owner)
        elif step.extracts_archives and _is_archive(str(host)):
            _extract(ctx, str(host), target.directory(), tmp, owner if step.chown else None, step)
        else:
            context.copy_out(rel, target.file(basename), owner)


def _pivot_depth(source: str) -> int:
    """How many leading components of a source's matches ``COPY --parents`` drops: those before a
    ``/./`` pivot (rsync's --relative rule, as the Dockerfile reference shows), else none."""
    parts = source.split("/")
    while parts and parts[0] in ("", "."):
        parts.pop(0)
    if "." not in parts:
        return 0
    prefix = posixpath.normpath("/".join(parts[:parts.index(".")]) or ".")
    return 0 if prefix == "." else len(prefix.split("/"))


def copy_keeping_parents(ctx: StepContext, items: list[tuple[Item, str]], into: str,
                         owner: Ownership) -> None:
    """``COPY --parents``: each source lands at its own path under the destination (the part after
    a ``/./`` pivot only). The parent directories it keeps, and a directory source itself, are
    copied with their source's mode and times (BuildKit's copier copies the parents it creates),
    owned as the copied files."""
    kept_dirs: dict[str, tuple[int, int, int, os.stat_result]] = {}
    context = ctx.services.context

    def keep_dir(host: str, st: os.stat_result, src_uid: int, src_gid: int) -> None:
        if not os.path.isdir(host) or os.path.islink(host):
            remove_existing(host)
            os.mkdir(host, 0o700)
        if host != into and host not in kept_dirs:
            kept_dirs[host] = (*owner.resolve(src_uid, src_gid, st.st_mode), st)

    for (kind, handle, basename), source in items:
        if kind == "heredoc":
            _write_heredoc(os.path.join(into, basename), handle, owner)
            continue
        if kind == "view":
            src_view, entry = handle
            parts = [p for p in entry.path.split("/") if p]
        else:
            parts = [] if handle == "." else handle.split("/")
        depth = _pivot_depth(source)
        kept = parts[depth:]
        for number in range(len(kept) - 1):
            host = os.path.join(into, *kept[:number + 1])
            prefix = "/".join(parts[:depth + number + 1])
            if kind == "view":
                parent = src_view.lookup("/" + prefix)
                if parent is not None:
                    keep_dir(host, parent.st, *intended_owner(parent.backing, parent.st)[:2])
            else:
                keep_dir(host, context.source_stat(prefix), 0, 0)
        target = os.path.join(into, *kept)
        if kind == "view":
            if kept or not entry.is_dir:
                copy_view_entry(src_view, entry.backing, entry.st, entry.lower_dirs, target, owner)
            else:
                for name, backing, cst, merged in src_view.list_dir(entry):
                    copy_view_entry(src_view, backing, cst, merged, os.path.join(into, name), owner)
            continue
        st = context.source_stat(handle)
        if stat.S_ISDIR(st.st_mode):
            keep_dir(target, st, 0, 0)
        context.copy_out(handle, target, owner)
    # Directory metadata last, deepest first, so a read-only directory does not stop the copy.
    for host in sorted(kept_dirs, key=lambda p: -p.count("/")):
        uid, gid, mode, st = kept_dirs[host]
        set_owner_mode(host, uid, gid, mode)
        copy_times(st, host)


def _write_heredoc(target: str, doc: Heredoc, owner: Ownership) -> None:
    """A heredoc source: a regular file 0644 of root (or --chown/--chmod), as BuildKit makes it."""
    remove_existing(target)
    with open(target, "w") as f:
        f.write(doc.body)
    u, g, mode = owner.resolve(0, 0, stat.S_IFREG | 0o644)
    set_owner_mode(target, u, g, mode)


def _extract(ctx: StepContext, archive: str, into: str, tmp: Path, owner: Ownership | None,
             step: CopyStep) -> None:
    """ADD of a local tar archive: unpack it (validated as hostile, by the store's unpacker)
    and merge it into ``into``."""
    from lamina.store.layer_unpack import unpack_layer

    staging = tmp / "archive"
    try:
        unpack_layer(Path(archive), staging, ctx.services.workspace.tmp_root)
    except LaminaError as e:
        raise step.error(f"ADD failed: cannot extract {os.path.basename(archive)}: {e}") from None
    _merge_tree(str(staging), into, owner)
    shutil.rmtree(staging, ignore_errors=True)


def _merge_tree(src: str, dest: str, owner: Ownership | None) -> None:
    for name in sorted(os.listdir(src)):
        s = os.path.join(src, name)
        d = os.path.join(dest, name)
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode) and os.path.isdir(d) and not os.path.islink(d):
            _merge_tree(s, d, owner)
            continue
        remove_existing(d)
        os.rename(s, d)
    if owner is not None:
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                u, g, mode = owner.resolve(0, 0, st.st_mode)
                set_owner_mode(p, u, g, mode)


def new_dir_time_ns(epoch: int | None) -> int:
    """The time of a directory a step makes with no source to take it from (WORKDIR, missing
    parents): ``SOURCE_DATE_EPOCH`` when set, else the Unix epoch, so such steps are reproducible."""
    return (epoch or 0) * 1_000_000_000


def _is_archive(path: str) -> bool:
    """Whether ADD extracts ``path``: a tar archive, plain or compressed (gzip, bzip2, xz, zstd).
    Like docker's and BuildKit's check, a compressed file is an archive only when what it
    decompresses to starts with a valid tar header; anything else (a gzipped text) is copied."""
    import lzma
    import tarfile

    import zstandard

    from lamina.store.compression import open_decompressed

    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            stream, _kind = open_decompressed(f)
            head = b""
            while len(head) < tarfile.BLOCKSIZE and (chunk := stream.read(tarfile.BLOCKSIZE - len(head))):
                head += chunk
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        return True
    except (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError, tarfile.TarError) as e:
        log.debug("ADD: %s is not a tar archive: %s", path, e)
        return False


def _view_glob(view: LayerView, pattern: str) -> list[Any]:
    import fnmatch

    from builder.context import has_glob

    norm = posixpath.normpath("/" + pattern)
    if not has_glob(norm):
        entry = view.lookup(norm)
        if entry is None:
            raise BuildError(f"{pattern!r}: not found")
        return [entry]
    parts = [p for p in norm.split("/") if p]
    root = view.lookup("/")
    current = [root] if root is not None else []
    for part in parts:
        following = []
        for entry in current:
            if not entry.is_dir:
                continue
            if not has_glob(part):
                child = view.lookup(posixpath.join(entry.path, part))
                if child is not None:
                    following.append(child)
                continue
            for name, _b, _s, _m in view.list_dir(entry):
                if fnmatch.fnmatchcase(name, part):
                    child = view.lookup(posixpath.join(entry.path, name), follow=False)
                    if child is not None:
                        following.append(child)
        current = following
    result = current
    if not result:
        raise BuildError(f"{pattern!r}: no source files were specified (nothing matches)")
    return result
