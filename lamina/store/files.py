"""Small JSON files of the store (image records, the tag index), written so a crash never shows half."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from lamina.store.blobs import fsync_dir, temp_name


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def write_file_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` by temp file + fsync + rename (+ fsync of the directory)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(tmp_dir, "json")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
