"""The differential test's operations: one runner (apply_op), one chooser (generate_op) and the
whole-tree snapshot both sides are compared by. See tests/fsops.py."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsops_lowers import ABSOLUTE_DANGLING_TARGET, NEW_NAMES, OWNERS, PAST, PRIVATE_XATTRS

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

Result = tuple[Any, ...]


# --- operations ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc_fallocate = _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def classify_time(ns: int, t0_ns: int) -> int | str:
    return ns if ns < t0_ns else "recent"


def describe(path: str, t0_ns: int) -> Result:
    """lstat of a path, reduced to what two faithful overlays must agree on."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return (oct(st.st_mode), st.st_uid, st.st_gid, size, nlink, classify_time(st.st_mtime_ns, t0_ns),
            kind)


def _content(path: str) -> str:
    # O_NONBLOCK: the sequence may well read a FIFO, which must not hang the run.
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def visible_xattrs(path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        if name.startswith(PRIVATE_XATTRS):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False).hex()))
        except OSError as e:
            out.append((name, "E" + errno.errorcode.get(e.errno or 0, "?")))
    return tuple(out)


def _ino_stable(fn: Callable[[], Any], path: str) -> Any:
    """Run ``fn``; report whether ``path``'s inode number stayed the same (copy-up must keep it)."""
    before = os.lstat(path).st_ino if os.path.lexists(path) else None
    value = fn()
    after = os.lstat(path).st_ino if os.path.lexists(path) else None
    return (value, before is None or after is None or before == after)


INO_CHECKED_OPS = ("write", "append", "truncate", "chmod", "chown", "utime", "setxattr")


def _strip_stable(res: Any) -> Any:
    return [res[0], res[1][0]] if res[0] == "ok" else res


def _stable(res: Result) -> bool:
    return res[0] != "ok" or bool(res[1][1])


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08
FALLOC_FL_ZERO_RANGE, FALLOC_FL_INSERT_RANGE = 0x10, 0x20
# The kernel's FUSE module refuses collapse and insert range for every FUSE filesystem
# (fuse_file_fallocate: EOPNOTSUPP before any request), so only a kernel candidate gets those.
FUSE_FALLOCATE_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
KERNEL_FALLOCATE_MODES = (*FUSE_FALLOCATE_MODES, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE)
# "on" or "off" forces the fallocate operations in or out; unset: in when the candidate supports
# fallocate(2) at all (probed on a scratch mount, see fallocate_supported).
FALLOCATE_SWITCH = "LAMINA_DIFF_FALLOCATE"


def _fallocate(path: str, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        if _libc_fallocate(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _append(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _append_after_listing(path: str, data: bytes) -> int:
    """List the parent, then append with nothing between that would make the kernel ask for the
    file's attributes: the write lands where the listing told the kernel the file ends."""
    with contextlib.suppress(OSError):
        os.listdir(os.path.dirname(path))
    return _append(path, data)


def _list_uncached(directory: str) -> None:
    """List ``directory`` after dropping the listing the kernel may keep in its page cache, so
    that the filesystem answers it (with whatever attributes it sends along)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.listdir(fd)
        finally:
            os.close(fd)


def _append_while_listing(root: str, path: str, data: bytes) -> str | None:
    """Append ``data`` in four opens after a listing of the parent and while another thread
    lists it without pause; the file's content after, when it lies inside ``root`` (a symlink
    such as "../b" leads out of the mount, to one file both sides write)."""
    stop = threading.Event()
    _list_uncached(os.path.dirname(path))

    def list_repeatedly() -> None:
        while not stop.is_set():
            _list_uncached(os.path.dirname(path))

    lister = threading.Thread(target=list_repeatedly)
    lister.start()
    try:
        quarter = max(1, len(data) // 4)
        for start in range(0, max(len(data), 1), quarter):
            _append(path, data[start:start + quarter])
    finally:
        stop.set()
        lister.join()
    inside = os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    return _content(path) if inside else None


def _open_rdonly_trunc(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_TRUNC)
    try:
        return os.read(fd, 64).hex()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Call:
    """One operation to run: its name, its arguments, the mount it runs on."""

    name: str
    args: list[Any]
    root: str
    t0_ns: int

    def p(self, index: int) -> str:
        """Argument ``index`` as a path under the root ("" is the root itself)."""
        rel = self.args[index]
        return os.path.join(self.root, rel) if rel else self.root


def _create(c: _Call) -> int:
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CREAT | (os.O_EXCL if c.name == "create_excl" else os.O_TRUNC)
    fd = os.open(c.p(0), flags, c.args[1])
    try:
        return os.write(fd, bytes.fromhex(c.args[2]))
    finally:
        os.close(fd)


def _write(c: _Call) -> Any:
    def do_write() -> int:
        flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if c.name == "append" else 0)
        fd = os.open(c.p(0), flags)
        try:
            data = bytes.fromhex(c.args[-1])
            return os.write(fd, data) if c.name == "append" else os.pwrite(fd, data, c.args[1])
        finally:
            os.close(fd)
    return _ino_stable(do_write, c.p(0))


def _rmtree_mkdir(c: _Call) -> Result:
    # `rm -rf d; mkdir d`: the results of both halves, as a shell would see them.
    try:
        if stat.S_ISFIFO(os.lstat(c.p(0)).st_mode):
            # What rmtree says of any non-directory, without its open(), which would wait
            # for a writer forever (Python 3.11 opens without O_NONBLOCK).
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        shutil.rmtree(c.p(0))
        first: Result = ("ok",)
    except OSError as e:
        first = ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))
    os.mkdir(c.p(0), 0o755)
    return first


def _unlinked_open(c: _Call) -> tuple[int, int, str]:
    # An open file outlives its name: still readable and writable, fstat's nlink drops.
    fd = os.open(c.p(0), os.O_RDWR | os.O_NONBLOCK)
    try:
        os.unlink(c.p(0))
        os.pwrite(fd, b"after unlink", 3)
        st = os.fstat(fd)
        return (st.st_nlink, st.st_size, os.pread(fd, 64, 0).hex())
    finally:
        os.close(fd)


def _replaced_open(c: _Call) -> tuple[int, str]:
    # rename over a file that is open: the open descriptor keeps the old file's data. (Not
    # its link count: the kernel reports a lower file's own count, 1, where 0 is right.)
    fd = os.open(c.p(1), os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.rename(c.p(0), c.p(1))
        return (stat.S_IFMT(os.fstat(fd).st_mode), os.pread(fd, 64, 0).hex())
    finally:
        os.close(fd)


def _while_held(c: _Call) -> list[Result]:
    # Other operations while a descriptor (O_PATH: no open request reaches the filesystem)
    # keeps the kernel's node of a path alive, so its FORGET comes only after them: the
    # filesystem sees the name removed while the node lives on, whatever the timing.
    fd = os.open(c.p(0), os.O_PATH | os.O_NOFOLLOW)
    try:
        return [apply_op(c.root, sub, c.t0_ns) for sub in c.args[1]]
    finally:
        os.close(fd)


def _open_rdonly(c: _Call) -> None:
    fd = os.open(c.p(0), os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)


# What each operation does; its return value is the "ok" result's value.
_OPERATIONS: dict[str, Callable[[_Call], Any]] = {
    "create": _create,
    "create_excl": _create,
    "write": _write,
    "append": _write,
    "truncate": lambda c: _ino_stable(lambda: os.truncate(c.p(0), c.args[1]), c.p(0)),
    "read": lambda c: _content(c.p(0)),
    "unlink": lambda c: os.unlink(c.p(0)),
    "rmdir": lambda c: os.rmdir(c.p(0)),
    "mkdir": lambda c: os.mkdir(c.p(0), c.args[1]),
    "rename": lambda c: os.rename(c.p(0), c.p(1)),
    "rename_noreplace": lambda c: renameat2(c.p(0), c.p(1), RENAME_NOREPLACE),
    "rename_exchange": lambda c: renameat2(c.p(0), c.p(1), RENAME_EXCHANGE),
    "symlink": lambda c: os.symlink(c.args[0], c.p(1)),
    "link": lambda c: os.link(c.p(0), c.p(1), follow_symlinks=False),
    "chmod": lambda c: _ino_stable(lambda: os.chmod(c.p(0), c.args[1]), c.p(0)),
    "chown": lambda c: _ino_stable(lambda: os.lchown(c.p(0), c.args[1], c.args[2]), c.p(0)),
    "utime": lambda c: _ino_stable(lambda: os.utime(c.p(0), ns=(c.args[1], c.args[2]), follow_symlinks=False),
                                   c.p(0)),
    "setxattr": lambda c: _ino_stable(lambda: os.setxattr(c.p(0), c.args[1], bytes.fromhex(c.args[2]),
                                                          follow_symlinks=False), c.p(0)),
    "removexattr": lambda c: os.removexattr(c.p(0), c.args[1], follow_symlinks=False),
    "getxattr": lambda c: os.getxattr(c.p(0), c.args[1], follow_symlinks=False).hex(),
    "listxattr": lambda c: visible_xattrs(c.p(0)),
    "mkfifo": lambda c: os.mkfifo(c.p(0), c.args[1]),
    "rmtree_mkdir": _rmtree_mkdir,
    "unlinked_open": _unlinked_open,
    "replaced_open": _replaced_open,
    "mknod": lambda c: os.mknod(c.p(0), stat.S_IFCHR | 0o640, os.makedev(1, 3)),
    "while_held": _while_held,
    "stat": lambda c: describe(c.p(0), c.t0_ns),
    "readdir": lambda c: sorted(os.listdir(c.p(0))),
    "readlink": lambda c: os.readlink(c.p(0)),
    "open_rdonly": _open_rdonly,
    "open_rdonly_trunc": lambda c: _open_rdonly_trunc(c.p(0)),
    "append_after_listing": lambda c: _append_after_listing(c.p(0), bytes.fromhex(c.args[1])),
    "append_while_listing": lambda c: _append_while_listing(c.root, c.p(0), bytes.fromhex(c.args[1])),
    "fallocate": lambda c: _fallocate(c.p(0), c.args[1], c.args[2], c.args[3]),
}


def apply_op(root: str, op: list[Any], t0_ns: int) -> Result:
    """Run one operation under ``root``; returns ("ok", value) or ("err", ERRNO_NAME)."""
    call = _Call(op[0], op[1:], root, t0_ns)
    run = _OPERATIONS.get(call.name)
    if run is None:
        raise ValueError(f"unknown operation {call.name}")
    try:
        return ("ok", run(call))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


def list_tree(root: str) -> tuple[list[str], list[str]]:
    """All paths under root (relative) and the directories among them, sorted."""
    paths: list[str] = []
    dirs: list[str] = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        for n in dirnames + filenames:
            paths.append(os.path.join(rel, n) if rel else n)
        for n in dirnames:
            dirs.append(os.path.join(rel, n) if rel else n)
    return sorted(paths), sorted(dirs)


class _Picker:
    """Random paths from the oracle's current tree (most operations should hit existing names)."""

    def __init__(self, rng: random.Random, oracle_root: str) -> None:
        self.rng = rng
        self.paths, self.dirs = list_tree(oracle_root)
        self.everything = [""] + self.paths
        self.non_dirs = sorted(set(self.paths) - set(self.dirs))

    def existing(self) -> str:
        return self.rng.choice(self.paths) if self.paths else self.rng.choice(NEW_NAMES)

    def existing_file(self) -> str:
        # Mostly non-directories, so that file operations mostly do something.
        return self.rng.choice(self.non_dirs) if self.non_dirs and self.rng.random() < 0.85 else self.existing()

    def fresh(self) -> str:
        parent = self.rng.choice(self.dirs)
        name = self.rng.choice(NEW_NAMES)
        return f"{parent}/{name}" if parent else name

    def any_path(self) -> str:
        return self.existing() if self.rng.random() < 0.7 else self.fresh()

    def data(self) -> str:
        return self.rng.randbytes(self.rng.choice([0, 1, 100, 3000, 9000])).hex()


def generate_op(rng: random.Random, oracle_root: str, userns: bool = False,
                fallocate_modes: tuple[int, ...] = ()) -> list[Any]:
    """Choose the next operation from the oracle's current tree.

    ``userns``: the candidate runs in a user namespace, where trusted.* xattrs are out of reach for
    everybody (the kernel oracle, as real root, would allow them). ``fallocate_modes``: the
    fallocate(2) modes to try (none: no fallocate operations).
    """
    pick = _Picker(rng, oracle_root)
    weights = {
        "create": 7, "create_excl": 2, "write": 6, "append": 5, "truncate": 5, "read": 5,
        "unlink": 6, "rmdir": 4, "mkdir": 6, "rename": 12, "rename_noreplace": 2,
        "rename_exchange": 2, "symlink": 3, "link": 4, "chmod": 4, "chown": 3, "utime": 3,
        "setxattr": 4, "removexattr": 2, "getxattr": 1, "listxattr": 2, "mkfifo": 2,
        "rmtree_mkdir": 3, "stat": 5, "readdir": 5, "readlink": 1, "open_rdonly": 2,
        "unlinked_open": 2, "replaced_open": 2, "mknod": 0 if userns else 1,
        "open_rdonly_trunc": 2, "append_after_listing": 4, "append_while_listing": 2,
        "fallocate": 4 if fallocate_modes else 0,
    }
    name = rng.choices(list(weights), weights=list(weights.values()))[0]
    op = _file_op(name, pick, oracle_root, fallocate_modes)
    return op if op is not None else _tree_op(name, pick, userns)


def _file_op(name: str, pick: _Picker, oracle_root: str, fallocate_modes: tuple[int, ...]) -> list[Any] | None:
    """The arguments of an operation on a file's content, or None for another kind of operation."""
    rng = pick.rng
    if name in ("create", "create_excl"):
        return [name, pick.existing_file() if rng.random() < 0.3 else pick.fresh(),
                rng.choice([0o644, 0o600, 0o4755]), pick.data()]
    if name == "write":
        return [name, pick.existing_file(), rng.choice([0, 5, 4096, 70000]), pick.data()]
    if name in ("append", "append_after_listing", "append_while_listing"):
        return [name, pick.existing_file(), pick.data()]
    if name == "open_rdonly_trunc":
        return [name, pick.existing_file()]
    if name == "fallocate":
        # Collapse and insert need block-aligned ranges (EINVAL otherwise, on both sides alike).
        return [name, pick.existing_file(), rng.choice(fallocate_modes), rng.choice([0, 100, 4096, 8192]),
                rng.choice([1, 4096, 10000, 8192])]
    if name == "truncate":
        target = pick.existing_file()
        try:
            same = os.lstat(os.path.join(oracle_root, target)).st_size
        except OSError:
            same = 0
        return [name, target, rng.choice([0, 7, 5000, 100000, same, same])]
    if name == "replaced_open":
        return [name, pick.existing_file(), pick.existing_file()]
    if name == "mknod":
        return [name, pick.any_path()]
    if name in ("read", "unlink", "readlink", "open_rdonly", "unlinked_open"):
        return [name, pick.existing_file()]
    return None


def _tree_op(name: str, pick: _Picker, userns: bool) -> list[Any]:
    """The arguments of an operation on names, metadata or xattrs."""
    rng, dirs, everything = pick.rng, pick.dirs, pick.everything
    if name in ("rmdir", "stat", "listxattr"):
        return [name, pick.existing()]
    if name == "readdir":
        return [name, rng.choice(dirs)]
    if name == "mkdir":
        return [name, pick.any_path(), rng.choice([0o755, 0o700, 0o2775, 0o1777])]
    if name in ("rename", "rename_noreplace"):
        src = rng.choice(dirs[1:]) if len(dirs) > 1 and rng.random() < 0.35 else pick.existing()
        return [name, src, pick.any_path()]
    if name == "rename_exchange":
        return [name, pick.existing(), pick.existing()]
    if name == "symlink":
        return [name, rng.choice(["a", "../b", ABSOLUTE_DANGLING_TARGET, "x/y/z", "n"]), pick.any_path()]
    if name == "link":
        return [name, pick.existing_file(), pick.any_path()]
    if name == "chmod":
        return [name, rng.choice(everything), rng.choice([0o644, 0o755, 0o4755, 0o2755, 0o6711, 0o1777, 0o000])]
    if name == "chown":
        return [name, rng.choice(everything), rng.choice(OWNERS + [-1]), rng.choice(OWNERS + [-1])]
    if name == "utime":
        t = PAST + rng.randint(0, 10**8)
        return [name, pick.existing(), t * 10**9, t * 10**9 + rng.randint(0, 10**9 - 1)]
    if name in ("setxattr", "removexattr", "getxattr"):
        xname = rng.choice(["user.a", "user.b", "user.gen"] + ([] if userns else ["trusted.t"]))
        if name == "setxattr":
            return [name, rng.choice(everything), xname, rng.randbytes(rng.randint(0, 20)).hex()]
        return [name, pick.existing(), xname]
    if name == "mkfifo":
        return [name, pick.any_path(), 0o644]
    if name == "rmtree_mkdir":
        return [name, rng.choice(dirs[1:]) if len(dirs) > 1 else pick.fresh()]
    raise AssertionError(name)


# --- whole-tree comparison -----------------------------------------------------------------------


def snapshot(root: str, t0_ns: int) -> tuple[dict[str, Result], dict[str, int], list[str]]:
    """The merged tree as comparable values; also each path's st_ino and invariant violations.

    Invariants checked on one side only: readdir's d_ino equals lstat's st_ino, and two paths with
    one inode number are one file (same attributes and content).
    """
    tree: dict[str, Result] = {}
    inos: dict[str, int] = {}
    problems: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            d = describe(full, t0_ns)
            st = os.lstat(full)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = _content(full)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            xattrs = visible_xattrs(full)
            tree[rel or "."] = (*d, extra, xattrs)
            inos[rel or "."] = st.st_ino
        except OSError as e:
            tree[rel or "."] = ("err", errno.errorcode.get(e.errno or 0, "?"))
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(full) as it:
                    entries = list(it)
            except OSError as e:
                tree[(rel or ".") + "/<readdir>"] = ("err", errno.errorcode.get(e.errno or 0, "?"))
                continue
            for entry in entries:
                child = os.path.join(rel, entry.name) if rel else entry.name
                try:
                    if entry.inode() != os.lstat(entry.path).st_ino:
                        problems.append(f"{child}: readdir d_ino {entry.inode()} != st_ino "
                                        f"{os.lstat(entry.path).st_ino}")
                except OSError as e:
                    problems.append(f"{child}: listed by readdir but lstat fails: {e}")
                stack.append(child)
    by_ino: dict[int, list[str]] = {}
    for rel, ino in inos.items():
        by_ino.setdefault(ino, []).append(rel)
    for ino, rels in by_ino.items():
        if len(rels) > 1 and len({tree[r] for r in rels}) > 1:
            problems.append(f"inode {ino} shared by different files: {sorted(rels)}")
    return tree, inos, problems


def diff_trees(a: dict[str, Result], b: dict[str, Result], a_name: str, b_name: str,
               limit: int = 6) -> list[str]:
    out = []
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            out.append(f"{rel}: {a_name}={a.get(rel)} {b_name}={b.get(rel)}")
            if len(out) >= limit:
                out.append("...")
                break
    return out
