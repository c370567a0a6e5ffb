"""Start-up of a filesystem server process: import only what serving a mount needs.

Everything imported before the first request is answered is time to mount, for ``lamina-unionfs``
and for every container and RUN step (the runner forks its server early so that these imports
overlap its own work, but they still come first on a loaded machine). Most of that time is not
Python's work but the disk: after the page cache is dropped, each of the ~250 module files costs a
read. trio and pyfuse3 pull in modules a union filesystem never calls: TLS and DTLS (``ssl``,
``hmac`` and with them ``libssl``/``libcrypto``), international host names (``idna``) and process
spawning (``subprocess``). Those are put off (:class:`DeferredModule`) until someone reads one
of their attributes: trio only imports them to use them later, inside
functions, and the filesystem never gets there. The modules it does use can come from one zip
instead of hundreds of files (:func:`use_import_bundle`; unionfs.bundle builds it).

Every one of these tricks, and every run-time patch of pyfuse3 (:mod:`unionfs.listing_cache`,
:mod:`unionfs.lowlevel_ops`), is turned off by one environment variable, ``LAMINA_NO_PATCHES=1``
(:func:`patches_enabled`): the server then imports and runs pyfuse3 and trio exactly as they come,
and answers FALLOCATE with EOPNOTSUPP and listings without the kernel's cache.

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
