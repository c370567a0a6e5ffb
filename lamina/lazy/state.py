"""What lazy images keep in the store (``ROOT/lazy``), what of it is in use, and removing the rest.

``ROOT/lazy`` holds caches only: verified chunks by digest (``chunks/``), verified TOCs by layer blob
digest (``tocs/``) and whole non-eStargz layers as tars (``tars/``). Anything there can be fetched
again from the registry; what a live lazy mount reads is still worth keeping, since its files would
otherwise have to come over the network again (or fail, offline).

In use: the layers of every lazy mount whose layer server is alive (``ROOT/mounts/lazy-*/spec.json``
names them; so do the layer servers of containers run from lazy images, ``ROOT/lazy/run/*``), so
their TOCs and tars, and every chunk their TOCs name. When the TOC of such a layer
is not kept (removed by hand), nothing can tell its chunks apart and every chunk is kept.
Temporary files are removed only when the process that wrote them is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lamina.layout import Layout

log = logging.getLogger(__name__)


@dataclass
class LazyUsage:
    files: int = 0
    bytes: int = 0          # disk blocks, as ``du`` counts them
    unused_files: int = 0
    unused_bytes: int = 0


def _live_layer_digests(layout: Layout) -> set[str] | None:
    """Blob digests (hex) of the layers live lazy mounts serve; None if a record cannot be read
    (then everything counts as in use)."""
    from lamina.inspector.mounts import _server_alive

    digests: set[str] = set()
    servers = [*layout.mounts.glob("lazy-*"), *(layout.root / "lazy" / "run").glob("*")]
    for directory in servers:
        spec_path, pid_path = directory / "spec.json", directory / "server.pid"
        try:
            pid = int(pid_path.read_text())
        except FileNotFoundError:
            pid = None
        except (OSError, ValueError):
            return None
        if pid is not None and not _server_alive(pid):
            continue
        try:
            spec = json.loads(spec_path.read_bytes())
            digests.update(str(layer["digest"]).removeprefix("sha256:") for layer in spec["layers"])
        except FileNotFoundError:
            continue  # being created or removed: its server has not written what it uses yet
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return digests


def _chunks_of(layout: Layout, layer_hex: str) -> set[str] | None:
    """Chunk digests (hex) the kept TOC of a layer names; None when no TOC of it is kept (or
    readable). The TOC was verified when it was kept; it is only read here, not trusted for more."""
    path = layout.lazy_tocs / layer_hex
    try:
        toc_json = path.read_bytes().split(b"\n", 1)[1]
        entries = json.loads(toc_json)["entries"]
        return {str(entry["chunkDigest"]).removeprefix("sha256:") for entry in entries
                if isinstance(entry, dict) and "chunkDigest" in entry}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _temp_in_use(name: str) -> bool:
    """``PID.TOKEN.tmp`` (and ``PID.TOKEN.tar.tmp``) of a process still running."""
    pid = name.split(".", 1)[0]
    return name.endswith(".tmp") and pid.isdigit() and os.path.exists(f"/proc/{pid}")


def _files(layout: Layout) -> list[tuple[str, Path]]:
    found = []
    for kind, directory in (("chunks", layout.lazy_chunks), ("tocs", layout.lazy_tocs), ("tars", layout.lazy_tars)):
        with contextlib.suppress(FileNotFoundError):
            found += [(kind, directory / name) for name in sorted(os.listdir(directory))]
    return found


def _in_use(layout: Layout, live: set[str]) -> tuple[set[Path], bool]:
    """Paths the ``live`` layers use, and whether every chunk is (a live layer's TOC is missing)."""
    keep: set[Path] = set()
    every_chunk = False
    for layer_hex in live:
        keep.add(layout.lazy_tocs / layer_hex)
        keep.add(layout.lazy_tars / f"{layer_hex}.tar")
        chunks = _chunks_of(layout, layer_hex)
        if chunks is None:
            every_chunk |= not (layout.lazy_tars / f"{layer_hex}.tar").exists()
            continue
        keep.update(layout.lazy_chunks / chunk for chunk in chunks)
    return keep, every_chunk


def _unused(layout: Layout) -> tuple[list[Path], list[Path]]:
    """Every kept file, and those nothing uses."""
    live = _live_layer_digests(layout)
    files = [path for _, path in _files(layout)]
    if live is None:
        return files, []
    keep, every_chunk = _in_use(layout, live)
    unused = [path for kind, path in _files(layout)
              if path not in keep and not _temp_in_use(path.name) and not (kind == "chunks" and every_chunk)]
    return files, unused


def _blocks(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def usage(layout: Layout) -> LazyUsage:
    """How much ``ROOT/lazy`` holds, and how much of it nothing uses (for ``system df``)."""
    files, unused = _unused(layout)
    return LazyUsage(len(files), sum(map(_blocks, files)), len(unused), sum(map(_blocks, unused)))


def _remove_dead_servers_directories(layout: Layout) -> None:
    """``ROOT/mounts/lazy-*`` of layer servers that are gone and no longer mounted (a ``umount
    --lazy`` leaves them to the server, which exits after its last user)."""
    from lamina.inspector.mounts import _server_alive, fuse_mountpoints

    mounted = fuse_mountpoints()
    for directory in layout.mounts.glob("lazy-*") if layout.mounts.is_dir() else []:
        try:
            pid = int((directory / "server.pid").read_text())
        except (OSError, ValueError):
            continue  # being set up, or not ours to judge
        if not _server_alive(pid) and str(directory / "layers") not in mounted:
            shutil.rmtree(directory, ignore_errors=True)


def prune(layout: Layout) -> tuple[int, int]:
    """Remove what nothing uses; ``(files, bytes)`` removed. A file that vanished meanwhile is skipped."""
    _remove_dead_servers_directories(layout)
    _, unused = _unused(layout)
    removed = freed = 0
    for path in unused:
        size = _blocks(path)
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.info("cannot remove %s: %s", path, e)
            continue
        removed += 1
        freed += size
    return removed, freed
