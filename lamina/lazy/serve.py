"""``python -m lamina.lazy.serve SPEC MOUNTPOINT``: fetch and verify the TOCs, mount, serve until unmounted.

SPEC is a JSON file written by :mod:`lamina.lazy.mount`: the registry, the repository, the layer
descriptors (from a verified manifest), the chunk cache directory and an optional trace file. The
TOCs are all fetched and verified before the mount appears, so a mount that is up can answer every
lookup and listing without the network. Exit status 1 with one line on stderr if they cannot be.

Start-up is time to mount: the TOCs of all layers are fetched at once (a thread and a connection
per layer), and trio and pyfuse3 are imported with unionfs's start-up tricks
(:func:`unionfs.startup.import_fuse_stack`, off with ``LAMINA_NO_PATCHES=1``).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import LaminaError
from lamina.lazy.remote import REQUEST_DEADLINE_S, ChunkCache, RemoteLayer, has_toc
from lamina.lazy.tree import LazyTree
from lamina.store.estargz import Toc
from lamina.store.image_schema import Descriptor
from lamina.store.registry import RegistryClient
from lamina.store.registry_auth import lookup_credentials

if TYPE_CHECKING:
    from lamina.lazy.whole import WholeLayer

log = logging.getLogger(__name__)
STARTED = time.monotonic()  # for the log's start-up figure: imports included


def open_layers(spec: dict, trace: Callable[[str], None] | None) -> list[RemoteLayer | WholeLayer]:
    """One layer reader per descriptor (eStargz by ranges, others whole), each with its own
    connection. The caller closes them."""
    client = RegistryClient(spec["api_host"], tls_verify=spec["tls_verify"],
                            credentials=lookup_credentials(spec["registry"]), timeout=REQUEST_DEADLINE_S)
    cache = ChunkCache(Path(spec["cache"]), Path(spec["tocs"]) if spec.get("tocs") else None)
    layers: list[RemoteLayer | WholeLayer] = []
    try:
        for index, raw in enumerate(spec["layers"]):
            descriptor = Descriptor.parse(raw, f"layer {index}")
            if has_toc(descriptor):
                layers.append(RemoteLayer(client.clone(), spec["repository"], descriptor, cache, trace))
            else:
                from lamina.lazy.whole import WholeLayer  # only then: it imports the tar and codec stack

                layers.append(WholeLayer(client.clone(), spec["repository"], descriptor, Path(spec["tars"]), trace))
    finally:
        client.close()
    return layers


def open_tocs(layers: Sequence[RemoteLayer | WholeLayer]) -> list[Toc]:
    """Every layer's TOC, fetched and verified concurrently (each layer has its own connection).

    Error handling: the first layer's error (in layer order) is raised, once every fetch has ended.
    """
    if len(layers) <= 1:
        return [layer.open_toc() for layer in layers]
    with ThreadPoolExecutor(max_workers=min(len(layers), 8), thread_name_prefix="toc") as pool:
        futures = [pool.submit(layer.open_toc) for layer in layers]
    return [future.result() for future in futures]


def prefetch_all(layers: Sequence[RemoteLayer | WholeLayer], tocs: Sequence[Toc], stop: threading.Event) -> None:
    """Fetch the prioritized files of every eStargz layer, layer by layer (``stop`` ends it between
    chunks)."""
    for layer, toc in zip(layers, tocs, strict=True):
        if isinstance(layer, RemoteLayer):
            layer.prefetch(toc, stop)


def start_prefetch(layers: list[RemoteLayer | WholeLayer], tocs: list[Toc], stop: threading.Event) -> None:
    """:func:`prefetch_all` in the background, once the mount is up.

    A daemon thread: the server does not wait for it at exit.
    """
    threading.Thread(target=prefetch_all, args=(layers, tocs, stop), name="prefetch", daemon=True).start()


def serve(spec: dict, mountpoint: Path) -> None:
    from unionfs.startup import import_fuse_stack

    import_fuse_stack()
    import pyfuse3
    import trio

    from lamina.lazy.fs import LazyOperations

    trace_file = open(spec["trace"], "a", buffering=1) if spec.get("trace") else None

    def trace(line: str) -> None:
        if trace_file is not None:
            trace_file.write(line + "\n")

    layers = open_layers(spec, trace if trace_file else None)
    stop_prefetch = threading.Event()
    try:
        began = time.monotonic()
        tocs = open_tocs(layers)
        fetched = time.monotonic()
        tree = LazyTree(tocs, layers)
        pyfuse3.init(LazyOperations(tree), str(mountpoint), {"fsname=lamina-lazy", "subtype=lamina-lazy", "ro", "nodev", "nosuid"})
        log.info("mounted %d layers, %d entries: TOCs %.3f s, tree and mount %.3f s (%.3f s after start)",
                 len(layers), len(tree.nodes), fetched - began, time.monotonic() - fetched, time.monotonic() - STARTED)
        try:
            async def run() -> None:
                async with trio.open_nursery() as nursery:
                    async def watch_signals() -> None:
                        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                            async for _ in signals:
                                pyfuse3.terminate()
                                return

                    nursery.start_soon(watch_signals)
                    start_prefetch(layers, tocs, stop_prefetch)
                    await pyfuse3.main(min_tasks=2, max_tasks=8)
                    nursery.cancel_scope.cancel()

            trio.run(run)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        stop_prefetch.set()
        for layer in layers:
            log.info("layer %s: %d requests, %d bytes fetched, %d chunks from the cache", layer.label,
                     layer.stats.requests, layer.stats.bytes, layer.stats.cached)
            layer.close()
        if trace_file is not None:
            trace_file.close()


def _wait_for_work() -> list[str] | None:
    """``--stdin`` (see :mod:`lamina.lazy.prefork`): import what serving needs, then wait for one
    line ``{"spec", "mountpoint", "log"}``; from then on the output goes to the log. None at the end
    of the input: the mount was not wanted after all."""
    import os

    from unionfs.startup import import_fuse_stack

    import_fuse_stack()
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import lamina.lazy.fs  # noqa: F401

    line = sys.stdin.buffer.readline()
    if not line:
        return None
    work = json.loads(line)
    fd = os.open(work["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return [work["spec"], work["mountpoint"]]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv == ["--stdin"]:
        work = _wait_for_work()
        if work is None:
            return 0
        argv = work
    if len(argv) != 2:
        print("usage: python -m lamina.lazy.serve SPEC MOUNTPOINT | --stdin", file=sys.stderr)
        return 2
    try:
        spec = json.loads(Path(argv[0]).read_text())
        serve(spec, Path(argv[1]))
    except (LaminaError, OSError) as e:
        print(f"lamina-lazy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
