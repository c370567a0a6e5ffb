"""The build context: resolving COPY/ADD sources in it, hashing them for the cache, copying them out.

Sources are paths relative to the context root (a leading ``/`` changes nothing, ``..`` may not
climb out), optionally with wildcards (``*``, ``?``, ``[...]`` per path component, as Go's
``filepath.Match``). Files excluded by ``.dockerignore`` do not exist for COPY. A symlink named
directly as a source is followed, but only while it stays inside the context.

The cache key of a COPY/ADD includes :meth:`BuildContext.digest` of its sources: an xxhash (fast,
not cryptographic: it only has to notice changes) over every file's relative path, type, permission
bits, size, symlink target and content. Modification times, owners and inode numbers are left out,
as docker does, so a fresh checkout still hits the cache, and so does another machine sharing the
cache (``--cache-from``); so is a directory's size, which depends on the filesystem (ext4 never
shrinks a directory, tmpfs counts its entries) rather than on what the directory holds. To keep cached rebuilds fast, each file's content hash is remembered
in a small stat cache keyed by (path, size, mtime, inode, ctime), so unchanged files are not re-read.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from builder.dockerignore import IgnoreRules
from builder.fsops import Ownership, copy_times, remove_existing, set_owner_mode
from lamina.errors import BuildError

_GLOB_CHARS = set("*?[")


def has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


class BuildContext:
    """A context directory plus its ignore rules."""

    def __init__(self, root: Path, ignore: IgnoreRules, stat_cache: Path | None = None) -> None:
        self.root = root.resolve()
        self.ignore = ignore
        self._stat_cache_path = stat_cache
        self._stat_cache: dict[str, list[object]] | None = None
        self._stat_cache_dirty = False

    # --- resolution
    def _normalise(self, source: str) -> str:
        norm = posixpath.normpath(source)
        if norm == ".." or norm.startswith("../"):
            raise BuildError(f"forbidden path outside the build context: {source}")
        rel = posixpath.normpath("/" + source).lstrip("/")
        return rel or "."

    def host_path(self, rel: str) -> Path:
        """Where the context's ``rel`` (as :meth:`resolve` gives it) is on the host."""
        return self.root if rel == "." else self.root / rel

    def _abs(self, rel: str) -> str:
        return str(self.host_path(rel))

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def resolve(self, source: str) -> list[str]:
        """Relative paths (``.`` for the root) the source names; BuildError when nothing matches."""
        rel = self._normalise(source)
        if not has_glob(rel):
            path = self._abs(rel)
            if rel != "." and self.ignore.excluded(rel):
                raise BuildError(f"{source!r}: not found (excluded by .dockerignore)")
            if not os.path.lexists(path):
                raise BuildError(f"{source!r}: not found in the build context")
            if os.path.islink(path) and not self._inside(path):
                raise BuildError(f"{source!r}: symlink points outside the build context")
            return [rel]
        matches = [m for m in self._glob(rel.split("/")) if not self.ignore.excluded(m)]
        if not matches:
            raise BuildError(f"{source!r}: no source files were specified (nothing matches)")
        return sorted(matches)

    def _glob(self, parts: list[str], prefix: str = "") -> Iterator[str]:
        if not parts:
            yield prefix
            return
        head, rest = parts[0], parts[1:]
        base = self._abs(prefix or ".")
        if not has_glob(head):
            candidate = posixpath.join(prefix, head) if prefix else head
            if os.path.lexists(self._abs(candidate)):
                yield from self._glob(rest, candidate)
            return
        try:
            names = sorted(os.listdir(base))
        except (NotADirectoryError, FileNotFoundError):
            return
        for name in names:
            if fnmatch.fnmatchcase(name, head):
                yield from self._glob(rest, posixpath.join(prefix, name) if prefix else name)

    def source_stat(self, rel: str) -> os.stat_result:
        """The stat of a resolved source, following a top-level symlink (inside the context)."""
        path = self._abs(rel)
        if os.path.islink(path) and not self._inside(path):
            raise BuildError(f"{rel!r}: symlink points outside the build context")
        return os.stat(path)

    def walk(self, rel: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """(relative path, host path, lstat) of a source and everything below it, minus ignored."""
        path = self._abs(rel)
        st = self.source_stat(rel)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            yield from self._walk_dir(rel, os.path.realpath(path))

    def _walk_dir(self, rel: str, path: str) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise BuildError(f"cannot read {path}: {e.strerror}") from None
        for entry in entries:
            child_rel = entry.name if rel == "." else f"{rel}/{entry.name}"
            if self.ignore.excluded(child_rel):
                if self.ignore.may_skip_directory(child_rel):
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                # An excluded directory may still hold re-included (!) files: walk it, but skip
                # the directory entry itself unless something inside is kept.
                inner = list(self._walk_dir(child_rel, entry.path))
                if inner:
                    yield child_rel, entry.path, entry.stat(follow_symlinks=False)
                    yield from inner
                continue
            st = entry.stat(follow_symlinks=False)
            yield child_rel, entry.path, st
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk_dir(child_rel, entry.path)

    # --- hashing
    def digest(self, rels: list[str]) -> str:
        import xxhash

        h = xxhash.xxh3_128()
        for rel in rels:
            h.update(b"\0source\0" + rel.encode("utf-8", "surrogateescape"))
            top = rel
            for child_rel, path, st in self.walk(rel):
                name = child_rel[len(top):] if child_rel != top else ""
                kind = stat.S_IFMT(st.st_mode)
                size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
                h.update(f"\0{name}\0{kind:o}\0{stat.S_IMODE(st.st_mode):o}\0{size}\0".encode(
                    "utf-8", "surrogateescape"))
                if stat.S_ISLNK(st.st_mode):
                    h.update(os.fsencode(os.readlink(path)))
                elif stat.S_ISREG(st.st_mode):
                    h.update(self._file_hash(path, st).encode())
        self._save_stat_cache()
        return h.hexdigest()

    def _file_hash(self, path: str, st: os.stat_result) -> str:
        cache = self._load_stat_cache()
        key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        hit = cache.get(path)
        if hit is not None and hit[:4] == key:
            return str(hit[4])
        import xxhash

        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        value = h.hexdigest()
        cache[path] = [*key, value]
        self._stat_cache_dirty = True
        return value

    def _load_stat_cache(self) -> dict[str, list[object]]:
        if self._stat_cache is None:
            self._stat_cache = {}
            if self._stat_cache_path is not None:
                try:
                    with open(self._stat_cache_path) as f:
                        loaded = json.load(f)
                    if isinstance(loaded, dict):
                        self._stat_cache = loaded
                except (OSError, ValueError):
                    pass
        return self._stat_cache

    def _save_stat_cache(self) -> None:
        if not self._stat_cache_dirty or self._stat_cache_path is None or self._stat_cache is None:
            return
        tmp = self._stat_cache_path.with_name(f"{self._stat_cache_path.name}.{os.getpid()}.tmp")
        try:
            self._stat_cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(self._stat_cache, f)
            os.replace(tmp, self._stat_cache_path)
            self._stat_cache_dirty = False
        except OSError:
            # The stat cache only saves time; losing it is harmless.
            try:
                os.unlink(tmp)
            except OSError:
                pass

    # --- copying
    def copy_out(self, rel: str, dest: str, owner: Ownership) -> None:
        """Copy source ``rel`` to host path ``dest``. For a directory, its contents are copied into
        the existing directory ``dest`` (docker: "the directory itself is not copied, just its
        contents"), whose owner, mode and times stay as the caller made them (BuildKit's rule)."""
        top_path = self._abs(rel)
        top_st = self.source_stat(rel)
        if not stat.S_ISDIR(top_st.st_mode):
            remove_existing(dest)
            self._copy_one(top_path, top_st, dest, owner, follow_top=True)
            return
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise BuildError(f"internal error: copy destination {dest} is not a directory")
        dirs: list[tuple[str, os.stat_result]] = []
        prefix_len = 0 if rel == "." else len(rel) + 1
        for child_rel, path, st in self.walk(rel):
            if child_rel == rel:
                continue
            target = os.path.join(dest, child_rel[prefix_len:])
            if stat.S_ISDIR(st.st_mode):
                if not os.path.isdir(target) or os.path.islink(target):
                    remove_existing(target)
                    os.mkdir(target, 0o700)
                dirs.append((target, st))
            else:
                remove_existing(target)
                self._copy_one(path, st, target, owner, follow_top=False)
        # Directory metadata last, deepest first, so read-only directories do not stop the copy.
        for target, st in reversed(dirs):
            uid, gid, mode = owner.resolve(0, 0, st.st_mode)
            set_owner_mode(target, uid, gid, mode)
            copy_times(st, target)

    def _copy_one(self, path: str, st: os.stat_result, dest: str, owner: Ownership, follow_top: bool) -> None:
        import shutil

        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), dest)
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(path, dest, follow_symlinks=follow_top)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dest, 0o600)
        else:
            return
        uid, gid, mode = owner.resolve(0, 0, st.st_mode)
        set_owner_mode(dest, uid, gid, mode)
        copy_times(st, dest)
