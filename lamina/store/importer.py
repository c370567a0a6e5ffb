"""``lamina import``: a root filesystem tarball becomes a one-layer image; ``--change`` edits its config.

The tarball is unpacked through the same validating unpacker as every layer, then committed like a
container's upper directory, so the stored layer is the deterministic, gzip-compressed form whatever
the tarball's own compression, ordering or owner names were.
"""

from __future__ import annotations

import errno
import json
import shlex
import sys
from pathlib import Path
from typing import Any, BinaryIO

from lamina.errors import LayerError, UsageError
from lamina.store.blobs import remove_tree, temp_name
from lamina.store.compression import NoSpace
from lamina.store.layer_unpack import unpack_layer
from lamina.store.progress import LayerProgress
from lamina.store.store import Image, Store, now_rfc3339

IMPORT_IDENT = "import"  # the one layer's name in the progress lines (its digest is known at the end)

# Instructions --change accepts, as in `docker import --change` (and what each sets in the config).
CHANGE_INSTRUCTIONS = {
    "CMD": "Cmd", "ENTRYPOINT": "Entrypoint", "ENV": "Env", "WORKDIR": "WorkingDir", "USER": "User",
    "EXPOSE": "ExposedPorts", "LABEL": "Labels", "VOLUME": "Volumes", "STOPSIGNAL": "StopSignal",
}


def _json_or_shell(arg: str) -> list[str]:
    """Exec form (a JSON array of strings) or shell form (run by /bin/sh -c)."""
    text = arg.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return ["/bin/sh", "-c", text]


def _key_values(arg: str, instruction: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"--change {instruction}: {e}") from None
    if words and "=" not in words[0]:
        # Legacy form: ENV KEY VALUE...
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"--change {instruction}: expected KEY=VALUE, got {word!r}")
        pairs.append((key, value))
    return pairs


def apply_change(config: dict[str, Any], change: str) -> None:
    """Apply one ``--change 'INSTRUCTION ARGS'`` to the ``config`` part of an OCI image config."""
    instruction, _, arg = change.strip().partition(" ")
    instruction = instruction.upper()
    arg = arg.strip()
    if instruction not in CHANGE_INSTRUCTIONS:
        raise UsageError(f"--change: unsupported instruction {instruction!r} "
                         f"(supported: {', '.join(CHANGE_INSTRUCTIONS)})")
    if not arg:
        raise UsageError(f"--change {instruction}: missing argument")
    if instruction in ("CMD", "ENTRYPOINT"):
        config[CHANGE_INSTRUCTIONS[instruction]] = _json_or_shell(arg)
    elif instruction == "ENV":
        env = [e for e in config.get("Env", []) if isinstance(e, str)]
        for key, value in _key_values(arg, instruction):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={value}"]
        config["Env"] = env
    elif instruction == "LABEL":
        labels = dict(config.get("Labels") or {})
        labels.update(_key_values(arg, instruction))
        config["Labels"] = labels
    elif instruction == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in arg.split():
            ports[port if "/" in port else f"{port}/tcp"] = {}
        config["ExposedPorts"] = ports
    elif instruction == "VOLUME":
        volumes = dict(config.get("Volumes") or {})
        for volume in _json_or_shell(arg) if arg.startswith("[") else arg.split():
            volumes[volume] = {}
        config["Volumes"] = volumes
    else:
        config[CHANGE_INSTRUCTIONS[instruction]] = arg


def import_tarball(store: Store, source: str, tags: list[str], changes: list[str], message: str | None,
                   progress: LayerProgress | None = None) -> Image:
    """Unpack ``source`` (a path, or ``-`` for stdin) into a layer and record a one-layer image;
    ``progress`` as load's, for the one layer (``import: Importing  X/Y``, then its commit)."""
    image_config: dict[str, Any] = {}
    for change in changes:
        apply_change(image_config, change)
    work = temp_name(store.tmp_dir, "import")
    work.mkdir(parents=True)
    try:
        stream: BinaryIO | Path
        if source == "-":
            stream = sys.stdin.buffer
            total = None
        else:
            path = Path(source)
            if not path.is_file():
                raise UsageError(f"import: {source}: no such file")
            stream, total = path, path.stat().st_size
        progress = progress or LayerProgress(None)
        with store.lock(shared=True):
            try:
                unpack_layer(stream, work / "rootfs", store.tmp_dir,
                             progress=progress.counter(IMPORT_IDENT, "Importing", total))
            except LayerError as e:
                raise LayerError(f"import: {source}: {e}") from None
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(store.tmp_dir, source, doing="importing") from None
                raise
            layer = store.commit_layer(work / "rootfs", adopt=True,
                                       progress=progress.counter(IMPORT_IDENT, "Committing layer", None))
            progress.layer(IMPORT_IDENT, "Import complete")
            created = now_rfc3339()
            history = {"created": created, "created_by": f"lamina import {source}"}
            if message:
                history["comment"] = message
            config = {"created": created, "config": image_config, "history": [history]}
            return store.create_image([layer], config, tags=tags)
    finally:
        remove_tree(work)
