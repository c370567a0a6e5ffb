"""The differential test's lower layers: generated from a seed, in the kernel's on-disk format, and
the conversions a candidate may get (OCI-format markers, user.* xattrs). See tests/fsops.py."""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

# The harness itself opens, writes and truncates paths as root through both mounts, and those calls
# follow symlinks like any program's. An absolute target must therefore never name a real host file
# (an earlier "/etc/passwd" here rewrote the host's copy): this directory does not exist, and
# ensure_dangling_target_absent() refuses to run if someone creates it.
ABSOLUTE_DANGLING_TARGET = "/nonexistent-lamina-fsops/target"


def ensure_dangling_target_absent() -> None:
    if os.path.lexists(os.path.dirname(ABSOLUTE_DANGLING_TARGET)):
        raise RuntimeError(f"{os.path.dirname(ABSOLUTE_DANGLING_TARGET)} exists: fsops would write through it")


NAMES = ["a", "b", "c", "d"]
NEW_NAMES = ["n", "m", "a", "b", "c", "d"]
OWNERS = [0, 1000, 1001]
PAST = 1_500_000_000  # every generated time lies between PAST and PAST + 10^8 (before any run)
PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "security.")


# --- generated lower layers ----------------------------------------------------------------------


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def merged_kinds(layers_top_first: list[Path]) -> dict[str, str]:
    """What the kernel would show for these lower layers: relative path -> "dir"/"other".

    A small model of overlayfs lookup, used only to decide where the generator puts whiteouts and
    opaque directories so that they hide something.
    """
    result: dict[str, str] = {}

    def visit(rel: str, stack: list[Path]) -> None:
        decided: dict[str, tuple[int, os.stat_result]] = {}
        for i, layer in enumerate(stack):
            for name in os.listdir(layer / rel if rel else layer):
                if name not in decided:
                    decided[name] = (i, os.lstat(layer / rel / name))
        for name, (i, st) in sorted(decided.items()):
            if _is_whiteout(st):
                continue
            child = f"{rel}/{name}" if rel else name
            if not stat.S_ISDIR(st.st_mode):
                result[child] = "other"
                continue
            result[child] = "dir"
            sub: list[Path] = []
            for layer in stack[i:]:
                try:
                    lst = os.lstat(layer / child)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(lst.st_mode):
                    break
                sub.append(layer)
                if _get_xattr(layer / child, "trusted.overlay.opaque") == b"y":
                    break
            visit(child, sub)

    visit("", layers_top_first)
    return result


def _get_xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def generate_lowers(rng: random.Random, base: Path, nlayers: int, entries: int = 22) -> list[Path]:
    """Create ``nlayers`` kernel-format lower layers under ``base``; returns them top first."""
    layers: list[Path] = []  # bottom first while building
    for index in range(nlayers):
        layer = base / f"layer{index}"
        layer.mkdir(parents=True)
        below = merged_kinds(list(reversed(layers))) if layers else {}
        for _ in range(entries):
            _generate_entry(rng, layer, below, index)
        _randomize_times(rng, layer)
        layers.append(layer)
    return list(reversed(layers))


def _random_rel(rng: random.Random, below: dict[str, str]) -> str:
    if below and rng.random() < 0.5:
        return rng.choice(sorted(below))
    return "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 3)))


def _ensure_parents(rng: random.Random, layer: Path, rel: str) -> bool:
    parent = layer
    for part in rel.split("/")[:-1]:
        parent = parent / part
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            os.mkdir(parent)
            os.chmod(parent, rng.choice([0o755, 0o755, 0o2775, 0o1777, 0o700]))
            os.lchown(parent, rng.choice(OWNERS), rng.choice(OWNERS))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _generate_entry(rng: random.Random, layer: Path, below: dict[str, str], index: int) -> None:
    rel = _random_rel(rng, below)
    path = layer / rel
    if not _ensure_parents(rng, layer, rel) or os.path.lexists(path):
        return
    kinds = ["file"] * 6 + ["dir"] * 3 + ["symlink", "fifo", "hardlink", "suid"] * 1
    if index > 0:
        kinds += ["whiteout"] * 3 + ["opaque"] * 2
    kind = rng.choice(kinds)
    owner = (rng.choice(OWNERS), rng.choice(OWNERS))
    if kind == "whiteout":
        # Only over something: the kernel lists a whiteout in a directory that merges with nothing
        # (readdir shows it, lookup says ENOENT), a quirk no other overlay needs to copy; the same
        # inside an opaque directory of the same layer, where a whiteout is pointless anyway.
        ancestors = [layer.joinpath(*rel.split("/")[:k]) for k in range(1, rel.count("/") + 1)]
        if rel in below and not any(_get_xattr(a, "trusted.overlay.opaque") for a in ancestors):
            _whiteout(path)
        return
    if kind in ("dir", "opaque"):
        os.mkdir(path)
        os.chmod(path, rng.choice([0o755, 0o2775, 0o1777, 0o750]))
        if kind == "opaque":
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        for name in rng.sample(NAMES, rng.randint(0, 2)):
            (path / name).write_bytes(rng.randbytes(rng.randint(0, 300)))
    elif kind in ("file", "suid"):
        path.write_bytes(rng.randbytes(rng.choice([0, 10, 1000, 70000])))
        mode = rng.choice([0o4755, 0o2755, 0o6755]) if kind == "suid" else rng.choice([0o644, 0o600, 0o755, 0o444])
        os.lchown(path, *owner)
        os.chmod(path, mode)  # after chown, which clears setuid bits
        if rng.random() < 0.3:
            os.setxattr(path, "user.gen", rng.randbytes(8))
        return
    elif kind == "symlink":
        os.symlink(rng.choice(["a", "../b", ABSOLUTE_DANGLING_TARGET, "nowhere/x"]), path)
    elif kind == "fifo":
        os.mkfifo(path, 0o640)
    elif kind == "hardlink":
        files = [p for p in layer.rglob("*") if p.is_file() and not p.is_symlink() and p != path]
        if not files:
            return
        os.link(rng.choice(sorted(files)), path)
        return
    os.lchown(path, *owner)


def _randomize_times(rng: random.Random, layer: Path) -> None:
    # Deepest first, so setting a child's time does not change its parent's afterwards.
    paths = sorted(layer.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [layer]
    for p in paths:
        t = PAST + rng.randint(0, 10**8)
        os.utime(p, ns=(t * 10**9, t * 10**9 + rng.randint(0, 10**9 - 1)), follow_symlinks=False)


def convert_to_oci_format(rng: random.Random, layers: list[Path], fraction: float = 0.5) -> int:
    """Rewrite some kernel-format markers as ``.wh.`` files (what layer tars carry). Returns how many."""
    converted = 0
    for layer in layers:
        for dirpath, dirnames, filenames in os.walk(layer):
            d = Path(dirpath)
            dst = os.lstat(d)  # restored at the end: the conversion must not touch the layer's times
            for name in filenames:
                if _is_whiteout(os.lstat(d / name)) and rng.random() < fraction:
                    os.unlink(d / name)
                    (d / f".wh.{name}").touch()
                    converted += 1
            for name in dirnames:
                sub = d / name
                if _get_xattr(sub, "trusted.overlay.opaque") == b"y" and rng.random() < fraction:
                    sst = os.lstat(sub)
                    os.removexattr(sub, "trusted.overlay.opaque")
                    (sub / ".wh..wh..opq").touch()
                    os.utime(sub, ns=(sst.st_atime_ns, sst.st_mtime_ns))
                    converted += 1
            os.utime(d, ns=(dst.st_atime_ns, dst.st_mtime_ns))
    return converted


def convert_to_user_xattrs(layers: list[Path]) -> None:
    """trusted.overlay.opaque -> user.overlay.opaque (what a user namespace can read and the kernel
    reads with -o userxattr)."""
    for layer in layers:
        for dirpath, dirnames, _ in os.walk(layer):
            for name in dirnames:
                sub = Path(dirpath) / name
                if _get_xattr(sub, "trusted.overlay.opaque") == b"y":
                    sst = os.lstat(sub)
                    os.removexattr(sub, "trusted.overlay.opaque")
                    os.setxattr(sub, "user.overlay.opaque", b"y")
                    os.utime(sub, ns=(sst.st_atime_ns, sst.st_mtime_ns))


def copy_layers(layers: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    out = []
    for layer in layers:
        target = dest / layer.name
        # cp -a keeps hardlinks, owners, modes, times, and (as root) trusted.* xattrs.
        subprocess.run(["cp", "-a", str(layer), str(target)], check=True)
        out.append(target)
    return out
