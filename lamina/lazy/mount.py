"""``lamina mount REGISTRY/REPO:TAG [DIR]``: an image mounted straight from its registry, read lazily.

Two servers, as stargz-snapshotter stacks overlayfs on its per-layer FUSE mounts:

1. the lazy layers (:mod:`lamina.lazy.serve`, in ``ROOT/mounts/lazy-ID/layers``): one directory per
   eStargz layer, built from its verified TOC, contents fetched by range on first read, verified
   chunk by chunk and cached in ``ROOT/lazy/chunks``;
2. unionfs over those directories as its lower layers, exactly as it merges the store's unpacked
   layers (whiteouts, opaque directories), recorded and unmounted as any ``lamina mount``.

The manifest and config are fetched and verified here first, as a pull does; the layer server
fetches and verifies every TOC before its mount appears, so a mount that is up answers lookups and
listings without fetching a byte of file contents. unionfs runs as the user here (not in lamina's
user namespace): the layer server reports the owners the TOCs give, which a user namespace would
show as unmapped.

The files an eStargz layer puts before its prefetch landmark (``push --estargz-prioritize``) are
fetched in the background as soon as the mount is up. A layer that is not eStargz is fetched whole
before the mount is ready (:mod:`lamina.lazy.whole`): its listing needs all of it. Not yet: running
a container from a lazy image, a background fill that makes it an ordinary image of the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from lamina.errors import MountError, RegistryError
from lamina.inspector import mounts
from lamina.layout import Layout
from lamina.lazy import prefork
from lamina.lazy.remote_image import client_for, fetch_config, fetch_manifest
from unionfs.core.stack import LayerStack

log = logging.getLogger(__name__)


def is_registry_reference(text: str) -> bool:
    """True when ``text`` names a registry host explicitly (``HOST[:PORT]/REPO...``)."""
    first = text.split("/", 1)[0]
    return "/" in text and ("." in first or ":" in first or first == "localhost")


def mount_lazy(layout: Layout, reference: str, mountpoint: Path | None, *, upto: int | None = None,
               trace: Path | None = None, allow_other: bool = False,
               tls_verify: bool | None = None) -> mounts.MountState:
    """Mount ``reference`` lazily; returns the mount's record (as :func:`mounts.mount_image_stack`).

    Start-up is what the user waits for, so the work overlaps: once the manifest is verified, the
    layer server (TOCs) and unionfs (:mod:`lamina.lazy.unionfs_when_ready`, which imports while the
    TOCs come and mounts once the layers are up) start together, and the config is checked here
    meanwhile.

    Error handling: RegistryError (manifest, config or a TOC unavailable or not verified, a layer
    that is not eStargz), MountError, UsageError; then nothing is left mounted, running or recorded.
    """
    with client_for(reference, tls_verify) as client:
        image = fetch_manifest(client, reference, tls_verify)
        spec = image.layer_spec(layout, upto, trace)
        layer_count = len(spec["layers"])
        lower_dir = layout.mounts / f"lazy-{os.urandom(6).hex()}"
        lower_mount = lower_dir / "layers"
        lower_mount.mkdir(parents=True, mode=0o700)
        (lower_dir / "spec.json").write_text(json.dumps(spec))
        pid = None
        try:
            pid = _start_layer_server(lower_dir, lower_mount)
            (lower_dir / "server.pid").write_text(str(pid))  # what garbage collection asks (lamina.lazy.state)
            # Fetched (and verified) only to check it, while the servers start: the image ID is its digest.
            fetch_config(client, layout, image)
            request = mounts.StackRequest(
                lowers=LayerStack.from_bottom_up(lower_mount / str(i) for i in range(layer_count)),
                upper=None, work=None, source=reference, image_id=image.id,
                container_id=None, layers=layer_count, trace=trace.absolute() if trace else None,
                allow_other=allow_other, userns=False, lower_server=(pid, str(lower_mount)),
                wrap_argv=lambda argv: _after_lower_mount(argv, lower_mount, pid))
            state = _mount_union(layout, request, mountpoint, lower_dir / "server.log")
        except BaseException:
            if pid is not None:
                mounts._stop_server(pid, lower_mount)
            shutil.rmtree(lower_dir, ignore_errors=True)
            raise
    log.debug("lazy mount %s", asdict(state))
    return state


def _after_lower_mount(unionfs_argv: list[str], lower_mount: Path, pid: int) -> list[str]:
    """unionfs's command line, run by :mod:`lamina.lazy.unionfs_when_ready` (waits for the layers)."""
    python, dash_m, module, *args = unionfs_argv
    assert (dash_m, module) == ("-m", "unionfs"), unionfs_argv
    return [python, "-m", "lamina.lazy.unionfs_when_ready", str(lower_mount), str(pid), "--", *args]


def _start_layer_server(lower_dir: Path, lower_mount: Path) -> int:
    """The layer server for ``lower_dir/spec.json``: the one :mod:`lamina.lazy.prefork` started, if
    it is still waiting, else a new one; its pid, at once (it mounts ``lower_mount`` when ready)."""
    spec, log_path = lower_dir / "spec.json", lower_dir / "server.log"
    preforked = prefork.take()
    if preforked is not None:
        try:
            return prefork.start(preforked, spec, lower_mount, log_path)
        except OSError:  # it died meanwhile
            log.debug("the preforked layer server is gone; starting one", exc_info=True)
    return _spawn([sys.executable, "-m", "lamina.lazy.serve", str(spec), str(lower_mount)], log_path)


def _spawn(argv: list[str], log_path: Path) -> int:
    """Start a detached server (its own session, output to ``log_path``); its pid, at once."""
    log.debug("starting %s", argv)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True, close_fds=True)
    # Detached on purpose; stop Popen's finaliser from warning that it still runs.
    process.returncode = 0
    return process.pid


def _mount_union(layout: Layout, request: mounts.StackRequest, mountpoint: Path | None,
                 server_log: Path) -> mounts.MountState:
    """unionfs over the lazy layers; the layer server's one-line error (a TOC that does not verify...)
    when that is why it failed."""
    try:
        return mounts.mount_image_stack(layout, request, mountpoint)
    except MountError as e:
        try:
            lines = server_log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        reason = next((line.removeprefix("lamina-lazy: ") for line in reversed(lines)
                       if line.startswith("lamina-lazy: ")), None)
        if reason is None:
            raise
        raise RegistryError(reason) from e
