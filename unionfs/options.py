"""What a filesystem server is asked to mount: one dataclass, and its two ways in.

From the outside (``lamina-unionfs`` and mount.fuse3 command lines) it is fuse-overlayfs's syntax,
``-o lowerdir=L1:L2,upperdir=U,workdir=W``, parsed here and nowhere else. From lamina's own code
(:mod:`unionfs.mount`, the runner's preforked server) it is :class:`ServerOptions` itself, sent to
the server process once, as JSON with a versioned schema that the server validates
(:meth:`ServerOptions.to_json`, :meth:`ServerOptions.from_json`): no option string is built only to
be parsed again. No heavy imports here.
"""

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


class HelpRequested(Exception):
    """``-h``/``--help``: the caller prints :data:`HELP` and exits 0, as fuse-overlayfs does."""


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


    def to_json(self) -> str:
        """The options as the server process reads them (:meth:`from_json`)."""
        import json  # here: a server started from its command line never needs it

        return json.dumps({
            "schema": SPEC_SCHEMA, "lowers": list(self.lowers), "upper": self.upper, "work": self.work,
            "mountpoint": self.mountpoint, "flags": sorted(self.flags), "fsname": self.fsname,
            "trace": self.trace, "redirect_dir": self.redirect_dir,
        })

    @classmethod
    def from_json(cls, data: str | bytes, *, foreground: bool = True, debug: bool = False) -> ServerOptions:
        """Read what :meth:`to_json` wrote; OptionError (one line) for anything else."""
        import json
        if len(data) > MAX_SPEC_BYTES:
            raise OptionError("mount specification too large")
        try:
            raw = json.loads(data)
        except ValueError:
            raise OptionError("mount specification is not JSON") from None
        if not isinstance(raw, dict) or raw.get("schema") != SPEC_SCHEMA:
            found = raw.get("schema") if isinstance(raw, dict) else None
            raise OptionError(f"mount specification: expected schema {SPEC_SCHEMA}, got {found!r}")
        unknown = set(raw) - _SPEC_FIELDS
        if unknown:
            raise OptionError(f"mount specification: unknown field {sorted(unknown)[0]!r}")
        lowers = raw.get("lowers")
        flags = raw.get("flags", [])
        if not isinstance(lowers, list) or not all(_is_path(p) for p in lowers):
            raise OptionError("mount specification: lowers must be a list of paths")
        if not isinstance(flags, list) or not set(flags) <= _FLAG_OPTIONS:
            raise OptionError(f"mount specification: flags must be a list of {', '.join(sorted(_FLAG_OPTIONS))}")
        for name in ("upper", "work", "trace"):
            if raw.get(name) is not None and not _is_path(raw[name]):
                raise OptionError(f"mount specification: {name} must be a path or null")
        if not _is_path(raw.get("mountpoint")) or not isinstance(raw.get("fsname", ""), str) or \
                raw.get("redirect_dir") not in (None, True, False):
            raise OptionError("mount specification: bad mountpoint, fsname or redirect_dir")
        opts = cls(list(lowers), raw.get("upper"), raw.get("work"), raw["mountpoint"], set(flags),
                   raw.get("fsname") or "lamina-unionfs", foreground, debug, raw.get("trace"),
                   raw.get("redirect_dir"))
        check_layers(opts)
        return opts

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


SPEC_SCHEMA = "lamina-unionfs-mount/1"
MAX_SPEC_BYTES = 1 << 20
_SPEC_FIELDS = {"schema", "lowers", "upper", "work", "mountpoint", "flags", "fsname", "trace", "redirect_dir"}


def _is_path(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


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

HELP = f"""{USAGE}

Mount the union of the lower directories (the first on top) and, with upperdir and workdir, a
writable upper directory, in the overlayfs on-disk format (whiteouts, opaque directories).

    -h   --help              print this help and exit
    -f   --foreground        serve in the foreground (default: return once the mount is ready)
    -d                       debug output (implies -f)
    --trace[=FILE]           log each copy-up, whiteout, opaque directory and redirect (default: stderr)
    --spec=JSON              everything to mount as one JSON document (schema {SPEC_SCHEMA})
    -o lowerdir=L1[:L2...]   the read-only layers, top first (\\: escapes a colon in a path)
    -o upperdir=U            where changes go
    -o workdir=W             scratch directory on the same filesystem as U
    -o redirect_dir=on|off   rename directories by redirect (default off: copy)
    -o fsname=NAME           the name the mount table shows
    -o {",".join(sorted(_FLAG_OPTIONS))}
                             mount flags as mount(8) and fuse-overlayfs take them
"""


def parse_args(argv: list[str]) -> ServerOptions:
    opts: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    trace: str | None = None
    spec: str | None = None
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
        elif arg.startswith("--spec="):
            spec = arg.split("=", 1)[1]
        elif arg == "-o":
            value = next(it, None)
            if value is None:
                raise OptionError("-o needs a value")
            opts.extend(_split_commas(value))
        elif arg.startswith("-o") and len(arg) > 2:
            opts.extend(_split_commas(arg[2:]))
        elif arg in ("-h", "--help"):
            raise HelpRequested()
        elif arg.startswith("-") and arg != "-":
            raise OptionError(f"unknown flag {arg}")
        else:
            positional.append(arg)
    if spec is not None:
        if opts or positional or trace is not None:
            raise OptionError("--spec names everything to mount: no -o, --trace or mount point beside it")
        server = ServerOptions.from_json(spec, foreground=foreground, debug=debug)
        check_dirs(server)
        return server
    # mount(8) runs a "fuse.lamina-unionfs" mount through mount.fuse3 as ``lamina-unionfs SOURCE
    # MOUNTPOINT -o ...``; like fuse-overlayfs, the source names nothing and is ignored.
    if len(positional) == 2:
        positional = positional[1:]
    if len(positional) != 1:
        raise OptionError("expected a mount point (and at most a source before it)" if positional
                          else f"missing mount point; {USAGE}")
    values, flags = classify_options(opts)
    lowers = split_colons(values.get("lowerdir", ""))
    # One directory each: only the escapes need undoing (a colon is ordinary here).
    upper = _unescape(values["upperdir"]) if values.get("upperdir") else None
    work = _unescape(values["workdir"]) if values.get("workdir") else None
    if "ro" in flags:
        upper = work = None
    mnt = positional[0]
    server = ServerOptions(lowers, upper, work, mnt, flags, values.get("fsname", "lamina-unionfs"),
                           foreground, debug, trace, redirect_dir_value(values))
    check_layers(server)
    check_dirs(server)
    return server


def classify_options(opts: list[str]) -> tuple[dict[str, str], set[str]]:
    """``-o`` options (one per item) as (``key=value`` options, flags); OptionError for others."""
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
    return values, flags


def redirect_dir_value(values: dict[str, str]) -> bool | None:
    redirect = values.get("redirect_dir")
    if redirect not in (None, "on", "off"):
        raise OptionError(f"redirect_dir={redirect}: expected on or off")
    return None if redirect is None else redirect == "on"


def check_layers(o: ServerOptions) -> None:
    if not o.lowers and o.upper is None:
        raise OptionError("no lowerdir given")
    if o.upper is not None and o.work is None:
        raise OptionError("upperdir needs a workdir")


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
