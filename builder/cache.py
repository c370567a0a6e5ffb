"""The build cache under ``ROOT/build-cache/``: one small JSON file per step, keyed by what the step
depended on.

Cache invalidation, stated once: a step's key is ``sha256(parent key + "\\n" + the instruction after
variable substitution)``, where the parent key is the previous step's key, extended with the diff_id
of the layer that step produced, if any (the first step of a stage starts from the base image's ID,
or from the key of the stage it builds on). Everything a step's result depends on is therefore in
its key, including the actual content of the layers below it (a RUN that ran again and produced
different files invalidates what follows, as docker's parent-image rule does):

* the base image, and every earlier instruction of the stage (ENV, ARG values including
  ``--build-arg``, USER, WORKDIR, SHELL...), through the chain;
* for COPY and ADD, an xxhash of the sources' content and metadata (:mod:`builder.context`), or the
  key of the stage copied from;
* for RUN, the command, its mounts and network mode.

An entry records the step's history line and, when the step produced a layer, the layer's diff_id,
blob digest and size. An entry is used only when its layer is still in the store (``lamina rmi`` and
``prune`` may have removed it); otherwise the step runs again and the entry is replaced. A ``--no-cache`` build runs every step but
never replaces a usable entry: other builds still use it. Entries are
written atomically (temporary file + rename), so concurrent builds and crashes never leave a
half-written entry; a corrupt one counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.store.usage import Needs

log = logging.getLogger(__name__)


def chain_key(parent: str, text: str) -> str:
    return hashlib.sha256(f"{parent}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()


class BuildCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / "steps" / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self._path(key), "rb") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f, sort_keys=True)
        os.replace(tmp, path)

    def mount_dir(self, mount_id: str) -> Path:
        """The persistent directory of a ``RUN --mount=type=cache`` with this id."""
        name = hashlib.sha256(mount_id.encode()).hexdigest()[:32]
        return self.directory / "mounts" / name

    @property
    def stat_cache_path(self) -> Path:
        return self.directory / "context-hashes.json"

    def store_needs(self) -> Needs:
        """The layers (and their blobs) that step entries name: kept by the store's garbage collection
        until ``system prune -a`` removes the entries (:class:`lamina.store.usage.DigestOwner`)."""
        from lamina.store.usage import Needs

        needs = Needs()
        for path in sorted((self.directory / "steps").glob("*/*.json")):
            entry = self.get(path.stem)
            layer = entry.get("layer") if entry is not None else None
            if not isinstance(layer, dict):
                continue
            for key, found in (("diff_id", needs.layers), ("digest", needs.blobs)):
                if isinstance(layer.get(key), str):
                    found.add(layer[key])
        return needs
