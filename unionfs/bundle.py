"""One zip file holding the compiled modules a filesystem server imports from outside lamina.

A server imports ~160 modules of the standard library, trio, attrs and friends before it can answer
its first request. After the page cache has been dropped (a fresh boot, a busy machine), each of
those files is a separate read from the disk: 40-60 ms of a mount's start. Python's zipimport reads
them all from one file instead. ``make install`` builds the bundle (``python -m unionfs.bundle``)
next to the interpreter of lamina's environment; :func:`unionfs.startup.use_import_bundle` puts it
first on ``sys.path`` when, and only when, it still matches what is installed.

What goes in: every top-level module or package (whole, so that rarely used submodules are there
too) that the server imports, except lamina's own code (which changes while it is being worked on)
and packages with compiled extensions. The stamp file beside the zip records the interpreter's
bytecode magic number and version, and the inode, size and change time (ctime, which every write,
rename onto, ``touch`` or ``cp -p`` moves and nobody can set back) of every source file in the
bundle and of every directory they came from (a module added or removed changes its directory).
A ``pip install``, an edit of any bundled module or an upgraded Python changes one of them, and the
bundle is then ignored until rebuilt (``make install`` rebuilds it). Checking ~250 stamps costs
well under a millisecond with a warm page cache: less than one file read it saves.

The bundle is trick "import-bundle" of the inventory in :mod:`unionfs.startup`; with
``LAMINA_NO_PATCHES=1`` it is never used.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import CodeType

from unionfs.startup import BUNDLE_NAME, STAMP_SUFFIX, stamp_header, stamp_line

OWN_PACKAGES = {"unionfs", "lamina", "runner", "builder", "bench", "tests"}

# Run in a fresh interpreter: import what a server imports, report where each new module came from.
_PROBE = """
import sys
already = set(sys.modules)
import unionfs.startup
unionfs.startup.use_import_bundle = lambda path=None: False  # the files themselves, not a bundle's
import unionfs.cli
from unionfs.startup import import_fuse_stack
import_fuse_stack()
import unionfs.server, unionfs.core, unionfs.fuse_ops, unionfs.listing_cache
print(repr({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
            if name not in already and type(module).__name__ == "module"}))
"""
_TEST_DIRS = {"tests", "_tests", "test"}


def default_path() -> Path:
    return Path(sys.prefix) / BUNDLE_NAME


def _roots(modules: dict[str, str | None]) -> dict[str, Path]:
    """Top-level name -> its source (a package directory or a module file) worth bundling."""
    roots: dict[str, Path] = {}
    for name, file in modules.items():
        top = name.partition(".")[0]
        if not file or top in OWN_PACKAGES or top in roots or not file.endswith(".py"):
            continue
        path = Path(file)
        depth = name.count(".") + (1 if path.name == "__init__.py" else 0)
        root = path.parents[depth - 1] if depth else path
        if (root.name if root.is_dir() else root.stem) != top:
            continue  # an alias (e.g. _frozen_importlib for importlib/_bootstrap.py)
        if root.is_dir() and any(p.suffix in (".so", ".pyd") for p in root.rglob("*")):
            continue  # a compiled extension inside: zipimport cannot load it
        roots[top] = root
    return roots


def build(out: Path, roots: dict[str, Path] | None = None) -> int:
    """Write the bundle and its stamp; returns the number of modules in it. ``roots``: top-level
    name -> package directory or module file to bundle (default: what a server imports)."""
    if roots is None:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        roots = _roots(ast.literal_eval(probe.stdout))
    tmp = out.with_name(out.name + ".tmp")
    stamped: list[Path] = []  # every source compiled into the bundle, and every directory they are in
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for root in roots.values():
            for source in _sources(root):
                arcname = source.relative_to(root.parent).with_suffix(".pyc").as_posix()
                try:
                    code = compile(source.read_bytes(), str(source), "exec", dont_inherit=True)
                except (SyntaxError, ValueError, UnicodeDecodeError):
                    continue  # e.g. a module for another Python version; not importable here anyway
                zf.writestr(arcname, _pyc(code))
                stamped.append(source)
            if root.is_dir():
                stamped.extend(d for d in (root, *root.rglob("*")) if d.is_dir() and not _skipped(d, root))
    stamp_tmp = Path(str(tmp) + STAMP_SUFFIX)
    stamp_tmp.write_text("\n".join([stamp_header(), *(stamp_line(str(p)) for p in stamped)]) + "\n")
    os.replace(tmp, out)
    os.replace(stamp_tmp, Path(str(out) + STAMP_SUFFIX))
    return sum(1 for p in stamped if p.suffix == ".py")


def _skipped(path: Path, root: Path) -> bool:
    """Caches and test suites are left out of the bundle (and out of its stamp)."""
    parts = path.relative_to(root.parent).parts
    return "__pycache__" in parts or bool(_TEST_DIRS.intersection(parts))


def _sources(root: Path) -> list[Path]:
    if not root.is_dir():
        return [root]
    return [source for source in sorted(root.rglob("*.py")) if not _skipped(source, root)]


def _pyc(code: CodeType) -> bytes:
    """An unchecked hash-based .pyc (PEP 552): zipimport uses it without looking for a source."""
    from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]

    return bytes(_code_to_hash_pyc(code, bytes(8), False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unionfs.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_path())
    args = parser.parse_args(argv)
    count = build(args.out)
    sys.stdout.write(f"{args.out}: {count} modules\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
