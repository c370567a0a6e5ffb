"""docker's ``--filter KEY=VALUE`` for ``images`` and ``ps``, as plain predicates.

The rules are docker's (its daemon's ``filters`` package): values of the same key are alternatives
(``--filter reference=a --filter reference=b`` shows both), different keys must all hold, and every
``label`` filter must hold. An unknown key or a value the key cannot take is a usage error naming
the filter. A reference pattern is Go's ``path.Match`` over the familiar name: ``*`` stops at ``/``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from lamina.errors import UsageError

if TYPE_CHECKING:
    from lamina.store.store import Image, Store
    from runner.state import Container

IMAGE_FILTERS = ("dangling", "reference", "label", "before", "since")
CONTAINER_FILTERS = ("id", "name", "label", "status", "exited", "ancestor", "before", "since")
CONTAINER_STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def parse_filters(texts: Iterable[str], known: tuple[str, ...]) -> dict[str, list[str]]:
    """``KEY=VALUE`` texts grouped by key; UsageError for a malformed or unknown one."""
    grouped: dict[str, list[str]] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep:
            raise UsageError(f"--filter {text}: expected KEY=VALUE")
        if key not in known:
            raise UsageError(f"--filter {text}: invalid filter {key!r} (known: {', '.join(known)})")
        grouped.setdefault(key, []).append(value)
    return grouped


def name_matches(patterns: Iterable[str], name: str) -> bool:
    """docker's ``filters.Args.Match`` (the ``name`` filters of ``ps`` and ``volume ls``): a
    pattern equal to ``name``, or a regular expression found anywhere in it. A pattern that is not
    a valid expression matches only itself, as docker skips it."""
    for pattern in patterns:
        if pattern == name:
            return True
        try:
            if re.search(pattern, name):
                return True
        except re.error:
            continue
    return False


def glob_pattern(pattern: str) -> re.Pattern[str]:
    """Go's ``path.Match`` pattern as a regex: ``*`` and ``?`` never match ``/``."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise UsageError(f"--filter reference={pattern}: syntax error in pattern")
            body = pattern[i + 1:end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("^") else re.escape(body)) + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def labels_match(wanted: list[str], labels: Mapping[str, str]) -> bool:
    """Every ``KEY`` or ``KEY=VALUE`` in ``wanted`` holds in ``labels``."""
    for text in wanted:
        key, sep, value = text.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def _bool_value(key: str, values: list[str]) -> bool:
    if len(set(values)) != 1 or values[0].lower() not in ("true", "false", "1", "0"):
        raise UsageError(f"--filter {key}={','.join(values)}: expected true or false")
    return values[0].lower() in ("true", "1")


class ImageFilter:
    """``images --filter``: which images to list and, with ``reference``, which of their names."""

    def __init__(self, store: Store, texts: Iterable[str]) -> None:
        filters = parse_filters(texts, IMAGE_FILTERS)
        self._dangling = _bool_value("dangling", filters["dangling"]) if "dangling" in filters else None
        self._references = [glob_pattern(p) for p in filters.get("reference", [])]
        self._labels = filters.get("label", [])
        self._before = [_created(store.resolve_image(v)) for v in filters.get("before", [])]
        self._since = [_created(store.resolve_image(v)) for v in filters.get("since", [])]

    def shows_name(self, familiar: str) -> bool:
        """Whether the name ``familiar`` (``busybox:latest``) passes the reference filters."""
        if not self._references:
            return True
        name = familiar.rsplit(":", 1)[0] if ":" in familiar.rsplit("/", 1)[-1] else familiar
        return any(p.match(familiar) or p.match(name) for p in self._references)

    def matches(self, image: Image) -> bool:
        if self._dangling is not None and self._dangling != (not image.tags):
            return False
        if self._references and not any(self.shows_name(tag) for tag in image.tags):
            return False
        labels = (image.config.get("config") or {}).get("Labels") or {}
        if not labels_match(self._labels, labels):
            return False
        created = _created(image)
        return all(created < t for t in self._before) and all(created > t for t in self._since)


def _created(image: Image) -> dt.datetime:
    return image.created or dt.datetime.min.replace(tzinfo=dt.UTC)


def container_filter(texts: Iterable[str], containers: list[Container],
                     resolve_image: Callable[[str], Image], image_of: Callable[[str], Image | None],
                     ) -> Callable[[Container], bool]:
    """``ps --filter``. ``containers`` are all of them (``before``/``since`` name one); images are
    looked up only for ``ancestor`` (an image, or any image built on it) and ``label``."""
    filters = parse_filters(texts, CONTAINER_FILTERS)
    for status in filters.get("status", []):
        if status not in CONTAINER_STATUSES:
            raise UsageError(f"--filter status={status}: expected one of {', '.join(CONTAINER_STATUSES)}")
    try:
        exited = [int(v) for v in filters.get("exited", [])]
    except ValueError:
        raise UsageError(f"--filter exited={','.join(filters['exited'])}: expected an exit code") from None
    names = filters.get("name", [])
    ancestors = [resolve_image(v) for v in filters.get("ancestor", [])]

    def created_of(reference: str) -> str:
        for c in containers:
            if reference in (c.id, c.name) or (len(reference) >= 3 and c.id.startswith(reference)):
                return c.created
        from lamina.errors import ContainerNotFound

        raise ContainerNotFound(reference)

    before = [created_of(v) for v in filters.get("before", [])]
    since = [created_of(v) for v in filters.get("since", [])]

    def descends(c: Container, ancestor: Image) -> bool:
        if c.image_id == ancestor.id:
            return True
        image = image_of(c.image_id)
        chain = [layer.diff_id for layer in ancestor.layers]
        return image is not None and [layer.diff_id for layer in image.layers][:len(chain)] == chain

    def matches(c: Container) -> bool:
        if "id" in filters and not any(c.id.startswith(v) for v in filters["id"]):
            return False
        if names and not (name_matches(names, c.name) or name_matches(names, "/" + c.name)):
            return False
        if "status" in filters and c.state.status not in filters["status"]:
            return False
        if exited and not (c.state.status == "exited" and c.state.exit_code in exited):
            return False
        if ancestors and not any(descends(c, a) for a in ancestors):
            return False
        if not (all(c.created < t for t in before) and all(c.created > t for t in since)):
            return False
        return "label" not in filters or labels_match(filters["label"], container_labels(c, image_of))

    return matches


def container_labels(c: Container, image_of: Callable[[str], Image | None]) -> dict[str, str]:
    """The labels docker shows for a container: its image's, then its own (``run --label``)."""
    image = image_of(c.image_id)
    labels = dict(((image.config.get("config") or {}).get("Labels") or {}) if image is not None else {})
    labels.update(getattr(c, "labels", None) or {})
    return labels
