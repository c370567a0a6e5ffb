"""Every start-up trick of the inventory (unionfs.startup.TRICKS) is in place with the tricks on and
absent with LAMINA_NO_PATCHES=1, observed in a real server: ``lamina-unionfs -f`` in a fresh
interpreter mounts a union, lists it twice through the kernel, and reports what it finds.

Each inventory entry needs an observation here (a new trick without one fails the last test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.harness import force_unmount
from unionfs import startup

pytestmark = [pytest.mark.fuse, pytest.mark.root]

# Runs the server's command line in the foreground; serve() calls _lock_memory right after
# pyfuse3.init, which is where the report is taken, and pyfuse3.main is wrapped to list the mount
# twice from a worker thread, count READDIRPLUS requests, and unmount.
_SERVER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    bundle, lower, mountpoint, mode = sys.argv[1:5]
    spawned = []
    sys.addaudithook(lambda event, args: spawned.append(event) if event == "subprocess.Popen" else None)
    from unionfs import startup
    startup.use_import_bundle(bundle)
    import unionfs.cli
    from unionfs import server
    report = {}
    deferred = sorted(n for n in startup.DEFERRABLE_MODULES
                      if type(sys.modules.get(n)).__name__ == "DeferredModule")
    real_lock_memory = server._lock_memory

    def after_init():
        import gc, pyfuse3, trio
        from unionfs import listing_cache, lowlevel_ops
        from unionfs.fuse_ops import UnionOperations
        (ops,) = [o for o in gc.get_objects() if isinstance(o, UnionOperations)]
        requests = []
        real_readdir = ops.readdir

        async def readdir(fh, start_id, token):
            requests.append(start_id)
            return await real_readdir(fh, start_id, token)

        ops.readdir = readdir
        report.update({
            "import-bundle": any(p == bundle for p in sys.path) and trio.__file__.startswith(bundle),
            "deferred-modules": deferred == sorted(startup.DEFERRABLE_MODULES),
            "deferred-modules-off": deferred == [] and "ssl" in sys.modules,
            "import-stand-ins": spawned == [] and pyfuse3.__version__ == "unknown",
            "import-stand-ins-off": spawned != [] and pyfuse3.__version__ != "unknown",
            "listing-cache-installed": bool(listing_cache._installed),
            "fallocate": lowlevel_ops.active(),
            "bare-entries": ops.cache.make_bare is not None,
            "read-lock": type(pyfuse3.trio).__name__ == "_TrioForPyfuse3",
            "gc-off-during-start-up": not gc.isenabled(),
        })
        real_main = pyfuse3.main

        async def main(*args, **kwargs):
            async def list_twice_and_stop():
                await trio.to_thread.run_sync(os.listdir, mountpoint)
                first = len(requests)
                await trio.to_thread.run_sync(os.listdir, mountpoint)
                report["listing-cache"] = first > 0 and len(requests) == first
                report["listing-cache-off"] = len(requests) > first
                report["session-loop"] = ops.spawn_session_loop is not None and kwargs == {
                    "min_tasks": 1, "max_tasks": 1}
                report["session-loop-off"] = ops.spawn_session_loop is None and not args and not kwargs
                report["gc-on-while-serving"] = gc.isenabled() and gc.get_threshold()[0] == 20_000
                pyfuse3.terminate()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(list_twice_and_stop)
                await real_main(*args, **kwargs)

        pyfuse3.main = main
        real_lock_memory()

    server._lock_memory = after_init
    if mode == "old-libfuse":  # one precondition of the listing cache fails, in a real server
        from unionfs import listing_cache
        listing_cache._LIBFUSE_WITH_CACHE_READDIR = 399
    code = unionfs.cli.main(["-f", *(["-d"] if mode != "plain" else []), "-o", f"lowerdir={lower}", mountpoint])
    print(json.dumps(report))
    sys.exit(code)
""")

# What shows each trick on, and (when it differs from "not on") what shows it off.
OBSERVED_ON = {"import-bundle": "import-bundle", "deferred-modules": "deferred-modules",
               "import-stand-ins": "import-stand-ins", "listing-cache": "listing-cache",
               "fallocate": "fallocate", "bare-entries": "bare-entries", "session-loop": "session-loop",
               "read-lock": "read-lock"}
OBSERVED_OFF = {"deferred-modules": "deferred-modules-off", "import-stand-ins": "import-stand-ins-off",
                "listing-cache": "listing-cache-off", "session-loop": "session-loop-off"}
ELSEWHERE = {"one-verb-parser"}  # observed in test_one_verb_parser_follows_the_switch


@pytest.fixture(scope="module")
def import_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unionfs import bundle

    out = tmp_path_factory.mktemp("bundle") / "imports.zip"
    assert bundle.build(out) > 50
    return out


def _serve_and_report(tmp_path: Path, bundle: Path, *, tricks: bool, mode: str = "plain") -> dict[str, Any]:
    lower, mountpoint = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mountpoint.mkdir()
    for name in ("a", "b", "c"):
        (lower / name).write_text(name)
    env = {**os.environ, startup.NO_PATCHES_ENV: "" if tricks else "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _SERVER_SCRIPT, str(bundle), str(lower), str(mountpoint),
                               mode], capture_output=True, text=True, timeout=120, env=env)
    finally:
        force_unmount(mountpoint)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    report["stderr"] = proc.stderr
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, import_bundle: Path) -> dict[bool, dict[str, Any]]:
    """What a server reports with the tricks on (True) and off (False)."""
    return {tricks: _serve_and_report(tmp_path_factory.mktemp(f"tricks-{tricks}"), import_bundle, tricks=tricks)
            for tricks in (True, False)}


@pytest.mark.parametrize("name", sorted(OBSERVED_ON))
def test_each_trick_is_on_by_default_and_off_with_the_switch(
        name: str, reports: dict[bool, dict[str, Any]]) -> None:
    on, off = reports[True], reports[False]
    assert on[OBSERVED_ON[name]] is True, f"{name} is not in place with the tricks on: {on}"
    if name in OBSERVED_OFF:
        assert off[OBSERVED_OFF[name]] is True, f"{name} is still in place with {startup.NO_PATCHES_ENV}=1: {off}"
    else:
        assert off[OBSERVED_ON[name]] is False, f"{name} is still in place with {startup.NO_PATCHES_ENV}=1: {off}"


@pytest.mark.parametrize("tricks", [True, False])
def test_garbage_collection_is_off_during_start_up_and_on_while_serving(
        tricks: bool, reports: dict[bool, dict[str, Any]]) -> None:
    """Not a trick (lamina's own process, either way): start-up makes objects that live for good."""
    report = reports[tricks]
    assert report["gc-off-during-start-up"] is True and report["gc-on-while-serving"] is True, report


def test_a_server_whose_listing_cache_precondition_fails_serves_without_it(
        tmp_path: Path, import_bundle: Path) -> None:
    """The fallback in a real mount: listings reach the server every time, one log line says why,
    and the other tricks stay on."""
    report = _serve_and_report(tmp_path, import_bundle, tricks=True, mode="old-libfuse")
    assert report["listing-cache-off"] is True and report["listing-cache-installed"] is False
    assert report["fallocate"] is True and report["bare-entries"] is True
    lines = [line for line in report["stderr"].splitlines() if "listing cache: off" in line]
    assert len(lines) == 1 and "not 3.5 or later" in lines[0], report["stderr"][-2000:]


def test_one_verb_parser_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On, only the requested verb's parser is built; off, its module registers all its verbs.
    Either way only the module that owns the verb is imported (that is not a trick, just lazy)."""
    import argparse

    import lamina.parser
    from lamina.commands import VERB_MODULES, is_top_level

    def verbs_built() -> tuple[list[str], set[str]]:
        registered: list[str] = []
        real_import = lamina.parser.importlib.import_module

        def count_modules(name: str) -> Any:
            registered.append(name)
            return real_import(name)

        with monkeypatch.context() as patch:
            patch.setattr(lamina.parser.importlib, "import_module", count_modules)
            parser = lamina.parser.build_parser(["run", "--rm", "img", "true"])
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return registered, set(action.choices)

    owner = VERB_MODULES["run"]
    monkeypatch.delenv(startup.NO_PATCHES_ENV, raising=False)
    assert verbs_built() == ([owner], {"run"})
    monkeypatch.setenv(startup.NO_PATCHES_ENV, "1")
    registered, verbs = verbs_built()
    assert registered == [owner]
    assert verbs == {verb for verb, module in VERB_MODULES.items() if module == owner and is_top_level(verb)}


def test_every_trick_of_the_inventory_is_observed() -> None:
    names = [trick.name for trick in startup.TRICKS]
    assert len(names) == len(set(names))
    assert set(names) == set(OBSERVED_ON) | ELSEWHERE
    for trick in startup.TRICKS:
        assert trick.where and trick.bends and trick.why and trick.cost_when_off, trick
