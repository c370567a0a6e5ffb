"""The filesystem server's start-up imports (unionfs.startup): fewer modules, same behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from unionfs import startup


@pytest.fixture(autouse=True)
def tricks_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the tricks: whatever LAMINA_NO_PATCHES the suite runs with."""
    monkeypatch.delenv(startup.NO_PATCHES_ENV, raising=False)


def test_a_deferred_module_imports_the_real_one_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    startup.defer_unused_modules(("colorsys",))
    stand_in = sys.modules["colorsys"]
    assert isinstance(stand_in, startup.DeferredModule)
    import colorsys  # binds the stand-in, as trio's own `import ssl` does

    assert colorsys is stand_in
    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    real = sys.modules["colorsys"]
    assert type(real) is types.ModuleType and real is not stand_in
    assert colorsys.hls_to_rgb is real.hls_to_rgb  # the old reference keeps answering from the real one


def test_an_imported_module_is_left_alone() -> None:
    before = sys.modules["json"]
    startup.defer_unused_modules(("json",))
    assert sys.modules["json"] is before


def _server_imports_report() -> dict[str, object]:
    """What a fresh interpreter looks like after lamina-unionfs's imports, up to opening the layers."""
    script = textwrap.dedent("""
        import json, sys
        spawned = []
        sys.addaudithook(lambda event, args: spawned.append(event)
                         if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.fork") else None)
        import unionfs.cli
        from unionfs.options import ServerOptions
        from unionfs.server import serve
        from unionfs.startup import DEFERRABLE_MODULES
        try:  # imports all a server needs, then fails to open the layer
            serve(ServerOptions(lowers=["/nonexistent-lower"], upper=None, work=None,
                                mountpoint="/nonexistent-mountpoint"))
        except Exception as e:  # the missing layer, named
            assert "nonexistent-lower" in str(e), e
        assert "pyfuse3" in sys.modules and "unionfs.fuse_ops" in sys.modules
        report = {
            "deferred": sorted(n for n in DEFERRABLE_MODULES
                               if type(sys.modules.get(n)).__name__ == "DeferredModule"),
            "spawned": list(spawned),
            "ctypes_util_real": hasattr(sys.modules.get("ctypes.util"), "__file__")
                                if "ctypes.util" in sys.modules else None,
            "metadata_stand_in_left": "importlib.metadata" in sys.modules
                                      and not hasattr(sys.modules["importlib.metadata"], "__file__"),
        }
        import subprocess  # the stand-in still runs a process when asked to
        report["subprocess_works"] = subprocess.run(["true"]).returncode == 0
        import ctypes.util
        report["find_library_c"] = ctypes.util.find_library("c")
        print(json.dumps(report))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report: dict[str, object] = json.loads(out.stdout)
    return report


def test_the_server_imports_neither_tls_nor_runs_ldconfig() -> None:
    report = _server_imports_report()
    assert report["deferred"] == sorted(startup.DEFERRABLE_MODULES)
    assert report["spawned"] == []  # trio's find_library("pthread") answered without ldconfig -p
    assert report["ctypes_util_real"] in (None, True)
    assert report["metadata_stand_in_left"] is False
    assert report["subprocess_works"] is True
    assert report["find_library_c"]  # the real ctypes.util serves later callers


@pytest.fixture(scope="module")
def import_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unionfs import bundle

    out = tmp_path_factory.mktemp("bundle") / "imports.zip"
    assert bundle.build(out) > 50
    return out


def test_a_server_imports_trio_and_the_stdlib_from_the_bundle(import_bundle: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from unionfs.startup import use_import_bundle
        assert use_import_bundle({str(import_bundle)!r})
        import unionfs.cli
        from unionfs.options import ServerOptions
        from unionfs.server import serve
        try:  # the server runs from the bundle as far as its first check of the options
            serve(ServerOptions(lowers=["/nonexistent-lower"], upper=None, work=None, mountpoint="/nonexistent"))
        except Exception as e:
            assert "nonexistent-lower" in str(e), e
        else:
            raise AssertionError("serve() accepted a lower directory that does not exist")
        import trio, attr, logging, unionfs.core
        for module in (trio, attr, logging):
            assert module.__file__.startswith({str(import_bundle)!r}), module.__file__
        assert not unionfs.core.__file__.startswith({str(import_bundle)!r})  # lamina's own code: never
        import trio.testing  # a part the server does not use is there too
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_bundle_that_no_longer_matches_is_not_used(import_bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_bundle_in_use", None)  # whatever this test process did before
    stale = tmp_path / "stale.zip"
    stale.write_bytes(import_bundle.read_bytes())
    header, first, *rest = Path(f"{import_bundle}.stamp").read_text().splitlines()
    ino, ctime_ns, size, source = first.split(" ", 3)
    variants = {
        "a source changed": [header, f"{ino} {int(ctime_ns) + 1} {size} {source}", *rest],
        "another Python": ["00000000 3.99.0 every-file", first, *rest],
        "an older stamp": [header.removesuffix(" every-file"), first, *rest],
        "a source is gone": [header, f"{ino} {ctime_ns} {size} /nonexistent/module.py", *rest],
    }
    for why, lines in variants.items():
        Path(f"{stale}.stamp").write_text("\n".join(lines) + "\n")
        before = list(sys.path)
        assert startup.use_import_bundle(str(stale)) is False, why
        assert sys.path == before
    assert startup.use_import_bundle(str(tmp_path / "missing.zip")) is False


def test_a_reply_the_kernel_dropped_is_not_reported_as_an_error() -> None:
    """pyfuse3 logs an error when a reply finds its request gone (ENOENT: the caller was interrupted
    or the mount is going away); the server drops that record and keeps every other."""
    import errno
    import logging
    import os

    from unionfs.server import _AbandonedReplyFilter

    def record(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("pyfuse3", level, __file__, 1, msg, args, None)

    keep = _AbandonedReplyFilter().filter
    assert not keep(record(logging.ERROR, "fuse_release(): fuse_reply_* failed with %s",
                           os.strerror(errno.ENOENT)))
    assert keep(record(logging.ERROR, "fuse_release(): fuse_reply_* failed with %s", os.strerror(errno.EIO)))
    assert keep(record(logging.ERROR, "something else: %s", os.strerror(errno.ENOENT)))


def test_one_switch_turns_every_trick_and_patch_off(import_bundle: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys
        import unionfs.cli
        from unionfs import listing_cache, lowlevel_ops, startup
        from unionfs.options import ServerOptions
        from unionfs.server import serve
        try:  # the server runs from the bundle as far as its first check of the options
            serve(ServerOptions(lowers=["/nonexistent-lower"], upper=None, work=None, mountpoint="/nonexistent"))
        except Exception as e:
            assert "nonexistent-lower" in str(e), e
        else:
            raise AssertionError("serve() accepted a lower directory that does not exist")
        async def handler(*args):
            pass
        print(json.dumps({{
            "deferred": [n for n, m in sys.modules.items() if type(m).__name__ == "DeferredModule"],
            "bundle": startup.use_import_bundle({str(import_bundle)!r}),
            "listing_cache": listing_cache.enable(lambda fh: False),
            "fallocate": lowlevel_ops.install(handler),
            "version_stand_in": "importlib.metadata" in sys.modules
                                and not hasattr(sys.modules["importlib.metadata"], "__file__"),
        }}))
    """)
    env = {**os.environ, startup.NO_PATCHES_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == {"deferred": [], "bundle": False, "listing_cache": False,
                                      "fallocate": False, "version_stand_in": False}


def _toy_roots(base: Path) -> dict[str, Path]:
    """A package with a subpackage, and a lone module: what a bundle holds, in small."""
    (base / "toypkg" / "sub").mkdir(parents=True)
    (base / "toypkg" / "__init__.py").write_text("TOP = 1\n")
    (base / "toypkg" / "sub" / "__init__.py").write_text("")
    (base / "toypkg" / "sub" / "deep.py").write_text("DEEP = 1\n")
    (base / "toymodule.py").write_text("LONE = 1\n")
    return {"toypkg": base / "toypkg", "toymodule": base / "toymodule.py"}


@pytest.mark.parametrize("change", ["edit toypkg/sub/deep.py", "edit toypkg/__init__.py",
                                    "edit toymodule.py", "add toypkg/sub/new.py",
                                    "remove toypkg/sub/deep.py", "edit, then set the old mtime"])
def test_a_change_to_any_bundled_source_invalidates_the_bundle(
        change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unionfs import bundle

    monkeypatch.setattr(startup, "_bundle_in_use", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    roots = _toy_roots(tmp_path / "src")
    out = tmp_path / "toy.zip"
    assert bundle.build(out, roots) == 4
    assert startup.use_import_bundle(str(out)) is True  # as built: used
    monkeypatch.setattr(startup, "_bundle_in_use", None)
    sys.path.remove(str(out))
    verb, _, name = change.partition(" ")
    src = tmp_path / "src"
    if verb == "edit":
        (src / name).write_text((src / name).read_text() + "CHANGED = 1\n")
    elif verb == "add":
        (src / name).write_text("")
    elif verb == "remove":
        (src / name).unlink()
    else:  # what cp -p or tar does: new content, old times (only the change time tells)
        deep = src / "toypkg" / "sub" / "deep.py"
        st = deep.stat()
        deep.write_text("DEEP = 2\n")
        os.utime(deep, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert startup.use_import_bundle(str(out)) is False, change
    assert str(out) not in sys.path
