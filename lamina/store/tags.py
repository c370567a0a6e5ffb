"""The tag index, ``images/tags.json``: ``{"registry/repository:tag": "<image id hex>"}``.

Every change is a read-modify-write under the tags lock, written by temp file + fsync + rename, so
concurrent taggers never lose each other's tags and a crash never leaves half an index.
"""

from __future__ import annotations

import json

from lamina.errors import ImageNotFound, StoreError, UsageError
from lamina.layout import Layout
from lamina.store.files import canonical_json, write_file_atomic
from lamina.store.locks import hold_tags_lock
from lamina.store.reference import Reference


class TagIndex:
    """The tags of one store. The caller holds the store lock (shared is enough)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def read(self) -> dict[str, str]:
        """Every tag (its reference's ``tagged_key``) and the image ID it names."""
        path = self._layout.tags_file
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise StoreError(f"{path} is corrupt (run `lamina system check`)") from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write(self, tags: dict[str, str]) -> None:
        write_file_atomic(self._layout.tags_file, canonical_json(dict(sorted(tags.items()))), self._layout.tmp)

    def set(self, refs: list[Reference], image_id: str) -> None:
        """Point every reference of ``refs`` (each with a tag) at ``image_id``."""
        for ref in refs:
            if ref.tag is None:
                raise UsageError(f"cannot tag with a digest reference: {ref}")
        with hold_tags_lock(self._layout.tags_lock):
            tags = self.read()
            for ref in refs:
                tags[ref.tagged_key] = image_id
            self._write(tags)

    def remove(self, ref: str) -> str:
        """Remove one tag; return the ID it pointed at. Raises ImageNotFound when not a tag."""
        key = Reference.parse(ref).tagged_key
        with hold_tags_lock(self._layout.tags_lock):
            tags = self.read()
            image_id = tags.pop(key, None)
            if image_id is None:
                raise ImageNotFound(ref)
            self._write(tags)
            return image_id

    def remove_image(self, image_id: str) -> None:
        """Remove every tag naming ``image_id``."""
        with hold_tags_lock(self._layout.tags_lock):
            tags = self.read()
            remaining = {k: v for k, v in tags.items() if v != image_id}
            if remaining != tags:
                self._write(remaining)
