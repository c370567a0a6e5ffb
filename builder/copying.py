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

from builder import dockerfile as df
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
from builder.remote import check, fetch
from lamina.bounded import InputTooLarge
from lamina.errors import BuildError, LaminaError
from runner.userdb import find_entry
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from builder.build import Builder, StageState


def copy_source(builder: Builder, state: StageState, inst: df.Copy) -> tuple[LayerView, str]:
    """The view to copy from and a key standing for its content."""
    assert inst.from_stage is not None
    if inst.from_stage.lower() in (state.stage.name, str(state.stage.index)):
        raise inst.error(f"circular dependency detected on stage: {inst.from_stage}")  # BuildKit's words
    src_state = builder.stage_by_name(inst.from_stage, before=state.stage.index)
    if src_state is not None:
        return src_state.view(), src_state.key
    image = builder.base_image(inst.from_stage, inst)
    return LayerView(LayerStack.from_bottom_up(layer.path for layer in image.layers)), image.id


def copy_digest(builder: Builder, state: StageState, inst: df.Copy | df.Add) -> str:
    if isinstance(inst, df.Copy) and inst.from_stage is not None:
        _, key = copy_source(builder, state, inst)
        return "from:" + key
    local = [s for s in inst.sources if not inst.heredoc_for(s) and not df.is_url(s)]
    urls = [s for s in inst.sources if df.is_url(s)]
    try:
        rels = [rel for source in local for rel in builder.context.resolve(source)]
        digest = builder.context.digest(rels) if rels else ""
    except BuildError as e:
        raise inst.error(f"{inst.keyword} failed: {e}") from None
    if urls:
        assert isinstance(inst, df.Add)
        # BuildKit's key: the content's digest (pinned by --checksum, else fetched), name and time.
        if inst.checksum is not None:
            digest += "|urls:" + inst.checksum
        for url in urls if inst.checksum is None else []:
            digest += f"|url:{url} {fetch(builder, url, inst).cache_text()}"
    return digest


def resolve_chown(state: StageState, spec: str | None, inst: df.Instruction) -> tuple[int | None, int | None]:
    """``--chown=user[:group]`` by name (the image's /etc/passwd and /etc/group) or number; a user
    without a group uses the same number as gid (Dockerfile reference)."""
    if spec is None:
        return None, None
    user, _, group = spec.partition(":")
    view = state.view()

    def lookup(db: str, name: str) -> int:
        if name.isdigit():
            return int(name)
        try:
            entry = find_entry(open_in_view(view, db), db, 3, lambda f: f[0] == name and f[2].isdigit())
        except InputTooLarge as e:
            raise inst.error(f"--chown={spec}: {e}") from None
        if entry is None:
            raise inst.error(f"--chown={spec}: no {'user' if db == '/etc/passwd' else 'group'} named "
                             f"{name!r} in the image's {db}")
        return int(entry[2])

    if not user:
        raise inst.error(f"--chown={spec}: missing user")
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


def copy_into_layer(builder: Builder, state: StageState, inst: df.Copy | df.Add, tmp: Path, diff: Path) -> None:
    view = state.view()
    uid, gid = resolve_chown(state, inst.chown, inst)
    chmod = int(inst.chmod, 8) if inst.chmod else None
    from_other = isinstance(inst, df.Copy) and inst.from_stage is not None
    # Context files belong to root unless --chown; files of another stage keep their owners.
    owner = Ownership(uid=uid if uid is not None else (None if from_other else 0),
                      gid=gid if gid is not None else (None if from_other else 0), chmod=chmod)
    dest = inst.dest
    if not dest.startswith("/"):
        dest = posixpath.join(state.image.workdir, dest)
    dest_is_dir_syntax = inst.dest.endswith("/") or inst.dest in (".", "..") or inst.dest.endswith("/.")
    dest = posixpath.normpath(dest)

    # Collect (kind, handle, basename) for every source after glob expansion.
    items: list[tuple[str, Any, str]] = []
    item_sources: list[str] = []  # the source each item came from (for --parents' pivot)
    last_source = ""
    try:
        for source in inst.sources:
            item_sources.extend([last_source] * (len(items) - len(item_sources)))
            last_source = source
            doc = inst.heredoc_for(source)
            if doc is not None:
                items.append(("heredoc", doc, doc.name))
            elif df.is_url(source):
                assert isinstance(inst, df.Add)
                items.append(("url", source, fetch(builder, source, inst).filename))
            elif from_other:
                src_view, _ = copy_source(builder, state, inst)  # type: ignore[arg-type]
                for match in _view_glob(src_view, source):
                    items.append(("view", (src_view, match), posixpath.basename(match.path) or "/"))
            else:
                for rel in builder.context.resolve(source):
                    items.append(("context", rel, posixpath.basename(rel) if rel != "." else "."))
        item_sources.extend([last_source] * (len(items) - len(item_sources)))
    except BuildError as e:
        raise inst.error(f"{inst.keyword} failed: {e}") from None
    parents = isinstance(inst, df.Copy) and inst.flags.boolean("parents")
    # --parents keeps each source's path under the destination, a directory whatever its spelling.
    dest_is_dir_syntax = dest_is_dir_syntax or parents
    many = len(items) > 1 or any(has_glob(s) for s in inst.sources if not inst.heredoc_for(s))
    dest_is_dir = dest_is_dir_syntax or view.exists_as_dir(dest)
    if many and not dest_is_dir:
        raise inst.error(f"When using {inst.keyword} with more than one source file, the destination "
                         "must be a directory and end with a /")
    parent = resolve_dir_in_image(view, dest if dest_is_dir else posixpath.dirname(dest))
    # BuildKit creates missing parents 0755, owned by the --chown owner (root without one).
    new_dir_owner = (uid if uid is not None else 0, gid if gid is not None else 0)
    dest_host_dir = ensure_parents(str(diff), view, parent, new_owner=new_dir_owner)
    settled = [parent]

    def file_target(basename: str) -> str:
        return os.path.join(dest_host_dir, basename if dest_is_dir else posixpath.basename(dest))

    def new_dir_target() -> str:
        # A directory source copied to a path that is not an existing directory: it becomes one,
        # made as BuildKit makes missing directories (0755, the --chown owner; --chmod is for the
        # copied contents only).
        target = file_target("")
        if not os.path.isdir(target):
            remove_existing(target)
            os.mkdir(target)
            set_owner_mode(target, new_dir_owner[0], new_dir_owner[1], stat.S_IFDIR | 0o755)
        settled.append(posixpath.join(parent, posixpath.basename(dest)))
        return target

    if parents:
        copy_keeping_parents(builder, list(zip(items, item_sources, strict=True)), dest_host_dir, owner)
        items = []
    for kind, handle, basename in items:
        if kind == "heredoc":
            _write_heredoc(file_target(basename), handle, owner)
        elif kind == "url":
            assert isinstance(inst, df.Add)
            download = fetch(builder, handle, inst)
            check(download, handle, inst.checksum, inst)
            target = file_target(basename)
            remove_existing(target)
            shutil.copyfile(download.path, target)
            u, g, mode = owner.resolve(0, 0, stat.S_IFREG | 0o600)
            set_owner_mode(target, u, g, mode)
            os.utime(target, (download.mtime, download.mtime))
        elif kind == "view":
            src_view, entry = handle
            if entry.is_dir:
                target = dest_host_dir if dest_is_dir else new_dir_target()
                for name, backing, cst, merged in src_view.list_dir(entry):
                    copy_view_entry(src_view, backing, cst, merged, os.path.join(target, name), owner)
            else:
                copy_view_entry(src_view, entry.backing, entry.st, (), file_target(basename), owner)
        else:
            rel = handle
            host = builder.context.root / rel if rel != "." else builder.context.root
            st = builder.context.source_stat(rel)
            if stat.S_ISDIR(st.st_mode):
                builder.context.copy_out(rel, dest_host_dir if dest_is_dir else new_dir_target(), owner)
            elif isinstance(inst, df.Add) and _is_archive(str(host)):
                into = dest_host_dir if dest_is_dir else new_dir_target()
                _extract(builder, str(host), into, tmp, owner if inst.chown else None, inst)
            else:
                builder.context.copy_out(rel, file_target(basename), owner)
    for container_dir in settled:
        settle_dir_times(str(diff), view, container_dir, new_dir_time_ns(builder.epoch))


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


def copy_keeping_parents(builder: Builder, items: list[tuple[tuple[str, Any, str], str]], into: str,
                         owner: Ownership) -> None:
    """``COPY --parents``: each source lands at its own path under the destination (the part after
    a ``/./`` pivot only). The parent directories it keeps, and a directory source itself, are
    copied with their source's mode and times (BuildKit's copier copies the parents it creates),
    owned as the copied files."""
    kept_dirs: dict[str, tuple[int, int, int, os.stat_result]] = {}

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
                keep_dir(host, builder.context.source_stat(prefix), 0, 0)
        target = os.path.join(into, *kept)
        if kind == "view":
            if kept or not entry.is_dir:
                copy_view_entry(src_view, entry.backing, entry.st, entry.lower_dirs, target, owner)
            else:
                for name, backing, cst, merged in src_view.list_dir(entry):
                    copy_view_entry(src_view, backing, cst, merged, os.path.join(into, name), owner)
            continue
        st = builder.context.source_stat(handle)
        if stat.S_ISDIR(st.st_mode):
            keep_dir(target, st, 0, 0)
        builder.context.copy_out(handle, target, owner)
    # Directory metadata last, deepest first, so a read-only directory does not stop the copy.
    for host in sorted(kept_dirs, key=lambda p: -p.count("/")):
        uid, gid, mode, st = kept_dirs[host]
        set_owner_mode(host, uid, gid, mode)
        copy_times(st, host)


def _write_heredoc(target: str, doc: df.Heredoc, owner: Ownership) -> None:
    """A heredoc source: a regular file 0644 of root (or --chown/--chmod), as BuildKit makes it."""
    remove_existing(target)
    with open(target, "w") as f:
        f.write(doc.body)
    u, g, mode = owner.resolve(0, 0, stat.S_IFREG | 0o644)
    set_owner_mode(target, u, g, mode)


def _extract(builder: Builder, archive: str, into: str, tmp: Path, owner: Ownership | None, inst: df.Add) -> None:
    """ADD of a local tar archive: unpack it (validated as hostile, by the store's unpacker)
    and merge it into ``into``."""
    from lamina.store.layer_unpack import unpack_layer

    staging = tmp / "archive"
    try:
        unpack_layer(Path(archive), staging, builder.store.root / "tmp")
    except LaminaError as e:
        raise inst.error(f"ADD failed: cannot extract {os.path.basename(archive)}: {e}") from None
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
