"""Every start-up speed-up lamina takes by bending other people's code, and the one switch for all.

This module owns the inventory (:data:`TRICKS`): what each trick does, why it exists, and what it
costs to turn it off. ``LAMINA_NO_PATCHES=1`` (:func:`patches_enabled`) turns every one of them
off, and each checks the switch itself before it changes anything: the server then imports and runs
pyfuse3, trio and argparse exactly as they come. ``make test`` runs the suite with the tricks on,
then the filesystem and command-line tests again with them off; tests/test_unionfs_speedups.py
checks each trick is really in place when on and really absent when off.

The import tricks live here. Start-up of a filesystem server is time to mount, for
``lamina-unionfs`` and for every container and RUN step, and most of it is not Python's work but
the disk: after the page cache is dropped, each of the ~250 module files costs a read. trio and
pyfuse3 pull in modules a union filesystem never calls: TLS and DTLS (``ssl``, ``hmac`` and with
them ``libssl``/``libcrypto``), international host names (``idna``) and process spawning
(``subprocess``). Those are put off (:class:`DeferredModule`) until someone reads one of their
attributes: trio only imports them to use them later, inside functions, and the filesystem never
gets there. The modules it does use can come from one zip instead of hundreds of files
(:func:`use_import_bundle`; unionfs.bundle builds it).

This module imports nothing heavy itself, so that callers can install the deferrals first.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

NO_PATCHES_ENV = "LAMINA_NO_PATCHES"


def patches_enabled() -> bool:
    """False when ``LAMINA_NO_PATCHES`` is set (to anything but "" or "0"): no start-up trick and no
    patch of another library's code is then installed."""
    return os.environ.get(NO_PATCHES_ENV, "") in ("", "0")


class Trick:
    """One entry of the inventory: where the trick lives, why, and what turning it off costs."""

    __slots__ = ("name", "where", "bends", "why", "cost_when_off")

    def __init__(self, name: str, where: str, bends: str, why: str, cost_when_off: str) -> None:
        self.name = name
        self.where = where
        self.bends = bends
        self.why = why
        self.cost_when_off = cost_when_off

    def __repr__(self) -> str:
        return f"Trick({self.name!r})"


# Costs as measured on 2026-12-07 (bench/results/20261207-no-patches-ab.md): all tricks off, a mount
# took ~30 ms more CPU (153 -> 186 ms), `lamina run --rm` ~30 ms more, a warm find 1.6x as long.
TRICKS: tuple[Trick, ...] = (
    Trick("import-bundle", "unionfs/bundle.py, use_import_bundle()",
          "the import system: sys.path gets a zip of compiled modules first",
          "one read of one file instead of ~160 module files before the first request",
          "after the page cache is dropped, 40-60 ms more to mount; with a warm cache, a few ms"),
    Trick("deferred-modules", "DeferredModule, defer_unused_modules()",
          "sys.modules: stand-ins for ssl, hmac, idna and subprocess",
          "trio imports them at module level and uses them only in functions a server never calls",
          "ssl (with libssl and libcrypto), hmac, idna, subprocess imported: ~15 ms CPU per mount"),
    Trick("import-stand-ins", "import_fuse_stack()",
          "sys.modules and ctypes.util during the import of trio and pyfuse3",
          "trio's find_library('pthread') runs ldconfig; pyfuse3 reads its version from metadata",
          "ldconfig -p in a subprocess (~9 ms) and importlib.metadata (~29 ms CPU) at every mount"),
    Trick("listing-cache", "unionfs/listing_cache.py (ELF work in unionfs/got.py)",
          "pyfuse3's GOT slot for libfuse's fuse_reply_open (FOPEN_CACHE_DIR in opendir replies)",
          "pyfuse3 cannot ask the kernel to keep listings; the kernel then serves repeated listings",
          "every listing reaches the server: a warm listdir of 2,500 entries 1.3 -> 7 ms"),
    Trick("fallocate", "unionfs/lowlevel_ops.py",
          "pyfuse3's GOT slot for fuse_session_new, once, and a copy of its operations table",
          "pyfuse3 registers no FALLOCATE operation",
          "not speed but function: fallocate(2) on a mount answers EOPNOTSUPP, as before"),
    Trick("bare-entries", "unionfs/bare_entries.py",
          "the node id inside pyfuse3 EntryAttributes objects (READDIRPLUS without attributes)",
          "a listed entry with attributes needs a stat the caller may never want",
          "a stat per listed entry: slower first listings; with the others off, a warm find 65 -> 103 ms"),
    Trick("session-loop", "unionfs/server.py, _serve_with_spare_loops()",
          "pyfuse3's private _session_loop, started from lamina's nursery",
          "one request loop, and one more only for each handler that waits (a copy-up)",
          "pyfuse3.main()'s own pool of loops, started whenever all are busy (not measured apart)"),
    Trick("read-lock", "unionfs/read_lock.py",
          "pyfuse3's module global ``trio``: a view of trio whose Lock does not yield when free",
          "pyfuse3 takes a trio.Lock before each wait for a request; trio's acquire always yields",
          "two passes through trio's scheduler per request instead of one (~7 % of a request's CPU)"),
    Trick("one-verb-parser", "lamina/parser.py, _Placement",
          "argparse: the subparsers action narrowed to the verb on the command line",
          "building every verb's parser is a noticeable part of a short command's start",
          "every verb's module imported and parser built: ~100 ms CPU per lamina command (33 -> 138)"),
)


# Imported by trio at module level and only used inside functions that a
# union filesystem server never calls (see the module docstring).
DEFERRABLE_MODULES = ("ssl", "hmac", "idna", "subprocess")


class DeferredModule(types.ModuleType):
    """Stands in for a module in ``sys.modules`` until one of its attributes is read.

    ``import NAME`` then binds the stand-in, and the first attribute read imports the real module
    (which replaces the stand-in in ``sys.modules``) and answers from it; later reads through an
    old reference keep being answered from the real module.
    """

    def __getattr__(self, attr: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


BUNDLE_NAME = "lamina-unionfs-imports.zip"  # unionfs.bundle builds it; named here to keep imports light


STAMP_SUFFIX = ".stamp"
_bundle_in_use: str | None = None  # one bundle per process is enough: the first one put on sys.path


def stamp_header() -> str:
    """The first line of a bundle's stamp: which interpreter its bytecode is for, and the stamp's
    format (older stamps named only top-level packages; they no longer match)."""
    from importlib._bootstrap_external import MAGIC_NUMBER  # loaded at start-up (importlib.util is not)

    return f"{MAGIC_NUMBER.hex()} {sys.version.split()[0]} every-file"


def stamp_line(path: str) -> str:
    """What the stamp records of one bundled file or directory: inode, change time, size, path.
    Raises OSError."""
    st = os.stat(path)
    return f"{st.st_ino} {st.st_ctime_ns} {st.st_size} {path}"


def use_import_bundle(path: str | None = None) -> bool:
    """Put the import bundle (see unionfs.bundle) first on ``sys.path`` if it matches what is
    installed: the interpreter's bytecode magic and version, and the inode, change time and size of
    every file and directory it was built from. Otherwise (or without one) imports go on as usual."""
    global _bundle_in_use
    if _bundle_in_use is not None:
        return True
    if not patches_enabled():
        return False
    bundle = path or os.path.join(sys.prefix, BUNDLE_NAME)
    try:
        with open(bundle + STAMP_SUFFIX) as f:
            header, *stamped = f.read().splitlines()
        if header != stamp_header() or not stamped:
            return False
        for line in stamped:
            if stamp_line(line.split(" ", 3)[3]) != line:
                return False
    except (OSError, ValueError, IndexError):
        return False
    sys.path.insert(0, bundle)
    _bundle_in_use = bundle
    return True


def defer_unused_modules(names: tuple[str, ...] = DEFERRABLE_MODULES) -> None:
    """Put stand-ins in ``sys.modules`` for those of ``names`` not imported yet.

    Only for a process that serves a filesystem and nothing else: the stand-ins are transparent to
    code that imports and uses a module, but a test that patches attributes of one would patch
    the stand-in.
    """
    if not patches_enabled():
        return
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = DeferredModule(name)


def import_fuse_stack() -> None:
    """Import trio and pyfuse3, skipping the costly steps that serving a mount does not need.

    Call it before anything imports trio. Besides :func:`defer_unused_modules`:

    * trio asks ``ctypes.util.find_library("pthread")`` once, to name its worker threads; on Linux
      that runs ``ldconfig -p`` in a subprocess (5-10 ms), and ``ctypes.util`` itself imports
      shutil with bz2 and lzma. Since glibc 2.34 the pthread functions live in libc itself, so when
      libc has ``pthread_setname_np`` a stand-in ``ctypes.util`` answers with libc.
    * pyfuse3 looks up its own ``__version__`` through importlib.metadata, which pulls in email,
      zipfile and csv (20-30 ms). A stand-in serves that one lookup (``pyfuse3.__version__`` becomes
      'unknown'; nothing here reads it).

    Both stand-ins are in place only during the imports, so later callers get the real modules.
    """
    if "pyfuse3" in sys.modules or not patches_enabled():
        return
    defer_unused_modules()
    import ctypes

    def find_library(name: str) -> str | None:
        if name == "pthread":
            try:
                ctypes.CDLL("libc.so.6").pthread_setname_np  # noqa: B018 - probe only
                return "libc.so.6"
            except (OSError, AttributeError):
                pass
        import ctypes.util as real_util

        return real_util.find_library(name)

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        raise PackageNotFoundError(name)

    metadata_stand_in = types.ModuleType("importlib.metadata")
    metadata_stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    metadata_stand_in.version = version  # type: ignore[attr-defined]
    util_stand_in = types.ModuleType("ctypes.util")
    util_stand_in.find_library = find_library  # type: ignore[attr-defined]
    stand_ins = {name: module for name, module in (("importlib.metadata", metadata_stand_in),
                                                    ("ctypes.util", util_stand_in))
                 if name not in sys.modules}
    sys.modules.update(stand_ins)
    had_util_attribute = hasattr(ctypes, "util")
    if not had_util_attribute:
        ctypes.util = util_stand_in  # what `ctypes.util.X` reads
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        pass  # a pyfuse3 that wants more of importlib.metadata: the caller's real import does it
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        if not had_util_attribute and getattr(ctypes, "util", None) is util_stand_in:
            del ctypes.util
