"""``which`` and ``layers`` of an image still in its registry: the layers' entries from their TOCs.

An eStargz TOC lists every entry of its layer with the attributes the analysis needs (type, size,
link target), so a layer can be accounted for without one byte of its files: this module turns a
verified TOC into the scan :func:`lamina.inspector.analysis.analyze` would have made of the unpacked
layer directory, markers decoded by the same rules (:mod:`unionfs.core.ondisk`).

What it shows is what ``lamina mount`` of the same reference shows: the landmark files eStargz adds
are the format's, not the image's, and are left out as the lazy filesystem leaves them out
(:data:`lamina.lazy.tree.HIDDEN`). Directories the TOC implies but does not list are there, as the
unpacker creates them. A hard link is the same file as its target (its bytes count once).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from lamina.inspector.analysis import LayerInput, _LayerScan, instructions_for_layers
from lamina.layout import Layout
from lamina.lazy.tree import HIDDEN
from lamina.store.estargz import Toc, clean_name
from unionfs.core import ondisk

_KINDS = {"dir": "dir", "reg": "file", "hardlink": "file", "symlink": "symlink", "char": "other",
          "block": "other", "fifo": "other"}


def scan_toc(toc: Toc) -> _LayerScan:
    """The analysis's view of one layer, from its TOC alone."""
    scan = _LayerScan()
    entries: dict[str, tuple[str, int, int]] = {}   # path -> kind, size, inode key (0: none)
    keys: dict[str, int] = {}                       # regular file -> its inode key

    def add_parents(path: str) -> None:
        parent = posixpath.dirname(path)
        while parent != "/" and parent not in entries:
            entries[parent] = ("dir", 0, 0)
            parent = posixpath.dirname(parent)

    for name, entry in toc.entries.items():
        if name in HIDDEN:
            continue
        path = "/" + name
        base = posixpath.basename(name)
        if ondisk.is_marker_name(base):
            add_parents(path)
            hidden = ondisk.whited_out_name(base)
            if hidden is not None:
                scan.whiteouts.append(posixpath.join(posixpath.dirname(path), hidden))
            elif base == ondisk.OPAQUE_MARKER:
                scan.opaque_dirs.append(posixpath.dirname(path))
            continue
        kind = _KINDS[entry.type]
        size, key = 0, 0
        if entry.type == "reg":
            size, key = entry.size, keys.setdefault(name, len(keys) + 1)
        elif entry.type == "hardlink":
            target = toc.entries.get(clean_name(entry.link_name))
            size = target.size if target is not None else 0
            key = keys.setdefault(clean_name(entry.link_name), len(keys) + 1)
        elif entry.type == "symlink":
            size = len(entry.link_name.encode("utf-8", "surrogateescape"))
        add_parents(path)
        entries[path] = (kind, size, key)
    scan.entries = sorted((path, kind, size, 0, key) for path, (kind, size, key) in entries.items())
    scan.whiteouts.sort()
    scan.opaque_dirs.sort()
    return scan


class RemoteImageView:
    """What the inspector's verbs show of an image they load: its id (the config's digest)."""

    def __init__(self, image_id: str) -> None:
        self.id = image_id


def remote_layer_inputs(layout: Layout, reference: str) -> tuple[RemoteImageView, list[LayerInput]]:
    """The image ``reference`` names in its registry, as inputs for the analysis: verified manifest,
    config (for the history) and TOCs; no file contents (but see :mod:`lamina.lazy.remote_image` for
    a layer that is not eStargz).

    Error handling: RegistryError or FormatError when something cannot be had or verified.
    """
    from lamina.lazy.remote_image import client_for, fetch_config, fetch_manifest, fetch_tocs

    with client_for(reference) as client:
        image = fetch_manifest(client, reference)
        config = fetch_config(client, layout, image)
    tocs = fetch_tocs(layout, image)
    history = config.get("history")
    instructions = instructions_for_layers([entry for entry in history if isinstance(entry, dict)]
                                           if isinstance(history, list) else [], len(tocs))
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        diff_ids = []
    inputs = []
    for index, (toc, instruction) in enumerate(zip(tocs, instructions, strict=True)):
        diff_id = diff_ids[index] if index < len(diff_ids) and isinstance(diff_ids[index], str) else image.layers[index].digest
        inputs.append(LayerInput(Path(f"{reference}#layer{index + 1}"), diff_id, instruction, scan=scan_toc(toc)))
    return RemoteImageView(image.id), inputs
