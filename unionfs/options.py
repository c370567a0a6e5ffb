"""Command-line options of lamina-unionfs, fuse-overlayfs's syntax (no heavy imports here)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Options passed through to FUSE, or accepted for compatibility with mount(8) and fuse-overlayfs.
_FLAG_OPTIONS = {
    "allow_other", "default_permissions", "layer_xattr", "acl", "noacl", "rw", "ro", "suid", "nosuid",
    "dev", "nodev", "exec", "noexec", "noatime", "relatime", "auto_unmount",
}
_VALUE_OPTIONS = {"lowerdir", "upperdir", "workdir", "fsname", "subtype", "redirect_dir"}


class OptionError(Exception):
    """A bad command line; the message is one line for the user."""


@dataclass
class ServerOptions:
    """What the command line asks for: the layers, the mount point and the FUSE options."""

    lowers: list[str]
    upper: str | None
    work: str | None
    mountpoint: str
    flags: set[str] = field(default_factory=set)
    fsname: str = "lamina-unionfs"
    foreground: bool = False
    debug: bool = False
    trace: str | None = None  # "-" for stderr
    redirect_dir: bool | None = None  # None: on when trusted xattrs can be written


    @property
    def layer_xattr(self) -> bool:
        return "layer_xattr" in self.flags

    @property
    def enable_acl(self) -> bool:
        return "acl" in self.flags

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.fsname}", "subtype=lamina"}
        for flag in ("allow_other", "default_permissions", "noatime", "auto_unmount"):
            if flag in self.flags:
                opts.add(flag)
        if os.geteuid() == 0:
            if "nosuid" not in self.flags:
                opts.add("suid")
            if "nodev" not in self.flags:
                opts.add("dev")
        return opts


_ESCAPABLE = ":\\,"


def _split_unescaped(value: str, separator: str) -> list[str]:
    r"""Split on ``separator`` where it is not escaped (``\:``, ``\,``, ``\\``); the escapes stay, for
    :func:`_unescape` once a value is known to be one path."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPABLE:
            cur.append(value[i:i + 2])
            i += 2
            continue
        if c == separator:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p for p in parts if p]


def _unescape(value: str) -> str:
    r"""Undo ``\,``, ``\:`` and ``\\`` in a single path value."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPABLE:
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def split_colons(value: str) -> list[str]:
    r"""Split a lowerdir list on ':' where ``\:`` escapes a colon inside a path."""
    return [_unescape(part) for part in _split_unescaped(value, ":")]


def _split_commas(value: str) -> list[str]:
    r"""Split ``-o`` values on ',' (``\,`` escapes a comma; escapes are undone per value later)."""
    return _split_unescaped(value, ",")


USAGE = ("usage: lamina-unionfs [-f] [-d] [--trace[=FILE]] -o lowerdir=L1:L2,upperdir=U,workdir=W[,opts] "
         "[SOURCE] MOUNTPOINT")


def parse_args(argv: list[str]) -> ServerOptions:
    opts: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    trace: str | None = None
    it = iter(argv)
    for arg in it:
        if arg in ("-f", "--foreground"):
            foreground = True
        elif arg == "-d":
            debug = foreground = True
        elif arg == "--trace":
            trace = "-"
        elif arg.startswith("--trace="):
            trace = arg.split("=", 1)[1] or "-"
        elif arg == "-o":
            value = next(it, None)
            if value is None:
                raise OptionError("-o needs a value")
            opts.extend(_split_commas(value))
        elif arg.startswith("-o") and len(arg) > 2:
            opts.extend(_split_commas(arg[2:]))
        elif arg in ("-h", "--help"):
            raise OptionError(USAGE)
        elif arg.startswith("-") and arg != "-":
            raise OptionError(f"unknown flag {arg}")
        else:
            positional.append(arg)
    # mount(8) runs a "fuse.lamina-unionfs" mount through mount.fuse3 as ``lamina-unionfs SOURCE
    # MOUNTPOINT -o ...``; like fuse-overlayfs, the source names nothing and is ignored.
    if len(positional) == 2:
        positional = positional[1:]
    if len(positional) != 1:
        raise OptionError("expected a mount point (and at most a source before it)" if positional
                          else f"missing mount point; {USAGE}")
    values: dict[str, str] = {}
    flags: set[str] = set()
    for o in opts:
        key, eq, val = o.partition("=")
        if key in _VALUE_OPTIONS and eq:
            values[key] = val
        elif key in _FLAG_OPTIONS and not eq:
            flags.add(key)
        else:
            raise OptionError(f"unknown option {o!r}")
    lowers = split_colons(values.get("lowerdir", ""))
    # One directory each: only the escapes need undoing (a colon is ordinary here).
    upper = _unescape(values["upperdir"]) if values.get("upperdir") else None
    work = _unescape(values["workdir"]) if values.get("workdir") else None
    if "ro" in flags:
        upper = work = None
    if not lowers and upper is None:
        raise OptionError("no lowerdir given")
    if upper is not None and work is None:
        raise OptionError("upperdir needs a workdir")
    mnt = positional[0]
    redirect = values.get("redirect_dir")
    if redirect not in (None, "on", "off"):
        raise OptionError(f"redirect_dir={redirect}: expected on or off")
    server = ServerOptions(lowers, upper, work, mnt, flags, values.get("fsname", "lamina-unionfs"),
                           foreground, debug, trace, None if redirect is None else redirect == "on")
    check_dirs(server)
    return server


def _is_within(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_dirs(o: ServerOptions) -> None:
    """Missing or overlapping directories: one readable line (before any fork)."""
    named = [("lowerdir", p) for p in o.lowers]
    if o.upper is not None:
        named.append(("upperdir", o.upper))
    if o.work is not None:
        named.append(("workdir", o.work))
    # "/dev/fd/N": a /dev/fuse descriptor the caller mounted already (libfuse takes it as is)
    fd_mount = o.mountpoint.startswith("/dev/fd/")
    if not fd_mount:
        named.append(("mountpoint", o.mountpoint))
    real: dict[str, list[str]] = {}
    for what, p in named:
        if not os.path.isdir(p):
            raise OptionError(f"{what} {p}: no such directory" if not os.path.exists(p)
                              else f"{what} {p}: not a directory")
        real.setdefault(what, []).append(os.path.realpath(p))
    up = real.get("upperdir", [])
    wk = real.get("workdir", [])
    if up and wk and (_is_within(up[0], wk[0]) or _is_within(wk[0], up[0])):
        raise OptionError(f"upperdir {o.upper} and workdir {o.work} overlap")
    for low in real.get("lowerdir", []):
        for other in up + wk:
            if _is_within(low, other) or _is_within(other, low):
                raise OptionError(f"lowerdir {low} overlaps upperdir/workdir {other}")
    if fd_mount:
        return
    mnt = real["mountpoint"][0]
    for other in up + wk:
        if _is_within(mnt, other) or _is_within(other, mnt):
            raise OptionError(f"mountpoint {o.mountpoint} overlaps upperdir/workdir {other}")
