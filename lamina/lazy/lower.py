"""A container's lower layers from a lazy image: served by a layer server, merged by unionfs as usual.

:func:`image_lowers` is where a container's image becomes its lower layers: the store's layer
directories for an ordinary image; for a lazy image (:mod:`lamina.lazy.images`), the directories of
a lazy layer server this process starts. The union never knows the difference: each lazy layer is a
directory in the format of the store's layers as an unprivileged user unpacks them (every entry
owned by the server's user, the image's owner and mode in the ``user.containers.override_stat``
xattr, OCI whiteout files), so unionfs merges it by its one set of rules, whiteouts and owner
overrides included, inside the container's user namespace like any lower layer.

The server (``python -m lamina.lazy.lower SPEC MOUNTPOINT HOLDER_FD``) runs as the user, in the
user's mount namespace, mounted under ``ROOT/lazy/run/``, before the sandbox makes its namespaces
(which therefore hold a copy of the mount). It fetches and verifies the TOCs before its mount
appears, then, in the background, the prioritized files (before the prefetch landmark), then the
rest of every layer blob (:mod:`lamina.lazy.fill`), keeping the verified bytes readers fetched on
the way. When the image is whole it becomes an ordinary image of the store.

Resource handling: the process that called :func:`image_lowers` holds the write end of a pipe whose
read end the server watches: when that process exits (its containers are gone with it) the server
unmounts, finishes the fill it was doing (or stops at the first failure), removes its directory and
exits. One server per image per process.

Error handling: :func:`image_lowers` raises ImageNotFound (neither an ordinary nor a lazy image),
RegistryError (a TOC unavailable or not verified: the server's one line), MountError.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import ImageNotFound, LaminaError, MountError, RegistryError
from lamina.layout import Layout
from lamina.lazy import images
from lamina.lazy.images import LazyImage
from lamina.lazy.partial import PartialBlob
from unionfs.core.stack import LayerStack

if TYPE_CHECKING:
    import pyfuse3

    from lamina.lazy.tree import LazyTree, Node
    from lamina.store.store import Image

log = logging.getLogger(__name__)

# The TOCs (and layers that are not eStargz, whole) are fetched before the mount appears.
READY_TIMEOUT_S = float(os.environ.get("LAMINA_LAZY_READY_TIMEOUT", "300"))
# The background fill; off for measurements of what a container itself reads.
FILL_ENABLED = os.environ.get("LAMINA_LAZY_FILL", "1") != "0"


@dataclass
class LazyServer:
    """A running lazy layer server of this process."""

    pid: int
    mountpoint: Path
    layers: int
    holder: int  # our end of the pipe the server watches

    @property
    def stack(self) -> LayerStack:
        return LayerStack.from_bottom_up(self.mountpoint / str(i) for i in range(self.layers))

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self) -> None:
        """Let the server go: it unmounts, finishes its fill, and exits by itself."""
        if self.holder >= 0:
            os.close(self.holder)
            self.holder = -1


_servers: dict[str, LazyServer] = {}


def image_lowers(layout: Layout, image_id: str) -> LayerStack:
    """The lower layers (top first) of the image ``image_id`` (full hex), ordinary or lazy."""
    from lamina.store import Store

    store = Store.open(layout)
    try:
        return store.layer_stack(store.load_image(image_id))
    except ImageNotFound:
        lazy = images.load(layout, image_id)
    server = _servers.get(image_id)
    if server is None or not server.alive():
        server = _servers[image_id] = start_server(layout, lazy)
    return server.stack


def lazy_base_image(layout: Layout, reference: str) -> Image | None:
    """``FROM REFERENCE`` of an image that is not in the store but runs lazily: the image, its
    layers' paths in a lazy layer server of this process (as :func:`image_lowers` gives a
    container). None when the reference is to be pulled instead (not eStargz).

    A commit on top of it needs its layers in the store first: :func:`lamina.lazy.fill.fill_now`.
    Error handling: as :func:`lamina.lazy.images.fetch_lazy` and :func:`image_lowers`.
    """
    try:
        lazy = images.find(layout, reference)
    except ImageNotFound:
        found = images.fetch_lazy(layout, reference)
        if found is None:
            return None
        lazy = found
    stack = image_lowers(layout, lazy.id).top_down()
    image = images.as_image(lazy)
    for layer, path in zip(image.layers, reversed(stack), strict=True):
        layer.path = path
    return image


def start_server(layout: Layout, image: LazyImage) -> LazyServer:
    """Start a lazy layer server for ``image``; returns once its mount is up (see the module doc)."""
    directory = layout.lazy_servers / os.urandom(6).hex()
    mountpoint = directory / "layers"
    mountpoint.mkdir(parents=True, mode=0o700)
    spec = {"root": str(layout.root), "image": image.id, "registry": image.registry, "api_host": image.api_host,
            "tls_verify": image.tls_verify, "repository": image.repository, "cache": str(layout.lazy_chunks),
            "tocs": str(layout.lazy_tocs), "tars": str(layout.lazy_tars), "trace": None, "fill": FILL_ENABLED,
            "layers": image.manifest["layers"]}
    (directory / "spec.json").write_text(json.dumps(spec))
    holder_r, holder_w = os.pipe2(os.O_CLOEXEC)
    log_path = directory / "server.log"
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "lamina.lazy.lower", str(directory / "spec.json"), str(mountpoint),
                 str(holder_r)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
                close_fds=True, pass_fds=(holder_r,))
    except OSError as e:
        os.close(holder_w)
        shutil.rmtree(directory, ignore_errors=True)
        raise MountError(f"cannot start the lazy layer server: {e}") from None
    finally:
        os.close(holder_r)
    server = LazyServer(process.pid, mountpoint, len(image.layers), holder_w)
    try:
        _wait_ready(process, mountpoint, log_path)
    except BaseException:
        server.close()
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    process.returncode = 0  # it is reaped by LazyServer.alive or outlives us: no warning from Popen
    return server


def _wait_ready(process: subprocess.Popen[bytes], mountpoint: Path, log_path: Path) -> None:
    from lamina.inspector.mounts import fuse_mountpoints

    deadline = time.monotonic() + READY_TIMEOUT_S
    while str(mountpoint) not in fuse_mountpoints():
        if process.poll() is not None:
            lines = log_path.read_text(errors="replace").splitlines()
            reason = next((line.removeprefix("lamina-lazy: ") for line in reversed(lines)
                           if line.startswith("lamina-lazy: ")), None)
            raise RegistryError(reason) if reason else MountError(
                f"the lazy layer server exited with status {process.returncode}: {lines[-1:] or ''}")
        if time.monotonic() > deadline:
            raise MountError(f"the lazy layer server did not mount {mountpoint} within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


# ----- the server -----


def store_format_operations(tree: LazyTree) -> pyfuse3.Operations:
    """The lazy tree as a layer directory of the store unpacked rootless (see the module doc)."""
    import pyfuse3

    from lamina.lazy.fs import LazyOperations, fuse_boundary
    from unionfs.core import ondisk

    uid, gid = os.getuid(), os.getgid()

    def override(node: Node) -> bytes | None:
        entry = node.entry
        if entry.type == "symlink":
            return None  # a symlink's owner is never overridden (unionfs reads none)
        if entry.type in ("char", "block"):
            mode = (0o020000 if entry.type == "char" else 0o060000) | entry.mode
            return ondisk.OwnerOverride.for_device(entry.uid, entry.gid, mode, entry.dev_major,
                                                   entry.dev_minor).encode()
        return ondisk.OwnerOverride(entry.uid, entry.gid, entry.mode & 0o7777).encode()

    def xattr_names(node: Node) -> list[str]:
        names = [name for name in node.entry.xattrs if not ondisk.is_private_xattr(name)]
        return names + ([ondisk.OWNER_OVERRIDE_XATTR] if node.entry.type != "symlink" else [])

    class StoreFormatOperations(LazyOperations):
        def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
            attrs = super()._attrs(node)
            attrs.st_uid, attrs.st_gid = uid, gid
            if node.entry.type != "symlink":
                # As the store keeps a layer's files: readable (and directories searchable) by their owner.
                attrs.st_mode |= 0o700 if node.is_dir else 0o400
            return attrs

        @fuse_boundary
        async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
            node = self.tree.node(inode)
            text = os.fsdecode(name)
            if text not in xattr_names(node):
                raise pyfuse3.FUSEError(errno.ENODATA)
            value = override(node) if text == ondisk.OWNER_OVERRIDE_XATTR else node.entry.xattrs[text]
            assert value is not None
            return value

        @fuse_boundary
        async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
            return [os.fsencode(name) for name in xattr_names(self.tree.node(inode))]

    return StoreFormatOperations(tree)


def _keeper(partial: PartialBlob, whole: Path) -> Callable[[int, bytes], None]:
    """Keep verified bytes a reader fetched for the fill, unless the store has the whole blob."""
    def keep(start: int, data: bytes) -> None:
        if not whole.exists():
            partial.write(start, data)
    return keep


def serve(spec: dict, mountpoint: Path, holder: int) -> None:
    """Mount the lazy layers at ``mountpoint`` until ``holder`` reads EOF (or a stop signal); fill
    the image meanwhile, and finish the fill after the unmount."""
    from unionfs.startup import import_fuse_stack

    import_fuse_stack()
    import pyfuse3
    import trio

    from lamina.lazy import fill
    from lamina.lazy.remote import RemoteLayer
    from lamina.lazy.serve import open_layers, open_tocs, prefetch_all
    from lamina.lazy.tree import LazyTree

    layout = Layout(Path(spec["root"]))
    layers = open_layers(spec, None)
    stop = threading.Event()
    partials = {layer.descriptor.digest: PartialBlob(layout.lazy_blobs, layer.descriptor.digest)
                for layer in layers if isinstance(layer, RemoteLayer)}
    for layer in layers:
        if isinstance(layer, RemoteLayer):
            layer.keep = _keeper(partials[layer.descriptor.digest], layout.blobs / layer.descriptor.digest[7:])

    def background() -> None:
        prefetch_all(layers, tocs, stop)
        if spec.get("fill") and not stop.is_set():
            fill.fill_image(layout, spec["image"], stop)

    try:
        tocs = open_tocs(layers)  # verified TOCs kept from an earlier start: none fetched again
        tree = LazyTree(tocs, layers)
        pyfuse3.init(store_format_operations(tree), str(mountpoint),
                     {"fsname=lamina-lazy", "subtype=lamina-lazy", "ro", "nodev", "nosuid"})
        filler = threading.Thread(target=background, name="fill", daemon=True)
        try:
            async def run() -> None:
                async with trio.open_nursery() as nursery:
                    async def watch_signals() -> None:
                        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                            async for _ in signals:
                                stop.set()
                                pyfuse3.terminate()
                                return

                    async def watch_holder() -> None:
                        await trio.lowlevel.wait_readable(holder)
                        pyfuse3.terminate()

                    nursery.start_soon(watch_signals)
                    nursery.start_soon(watch_holder)
                    filler.start()
                    await pyfuse3.main(min_tasks=2, max_tasks=8)
                    nursery.cancel_scope.cancel()

            trio.run(run)
        finally:
            pyfuse3.close(unmount=True)
            shutil.rmtree(mountpoint.parent, ignore_errors=True)  # (a failure before this: the caller's)
        log.info("unmounted; waiting for the fill")
        filler.join()
    finally:
        stop.set()
        for digest, partial in partials.items():
            if (layout.blobs / digest[7:]).exists():
                partial.discard()  # bytes a reader fetched after the fill took the blob
        for layer in layers:
            log.info("layer %s: %d requests, %d bytes fetched, %d chunks from the cache", layer.label,
                     layer.stats.requests, layer.stats.bytes, layer.stats.cached)
            layer.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(argv) != 3:
        print("usage: python -m lamina.lazy.lower SPEC MOUNTPOINT HOLDER_FD", file=sys.stderr)
        return 2
    spec_path, mountpoint = Path(argv[0]), Path(argv[1])
    try:
        spec = json.loads(spec_path.read_text())
        serve(spec, mountpoint, int(argv[2]))
    except (LaminaError, OSError) as e:
        print(f"lamina-lazy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
