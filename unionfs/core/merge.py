"""How layers merge: the rules of the kernel's overlayfs lookup and readdir, with no file access.

This is the one statement of those rules. The live filesystem (:mod:`unionfs.core.tree`) and the
read-only merged view (:mod:`unionfs.core.view`, used by the builder and ``lamina diff``) both read
what each layer holds and ask this module what it means; neither decides on its own.

Lookup of a name (fs/overlayfs/namei.c), layer by layer from the top:

* nothing there: the next layer down decides;
* a whiteout: nothing of that name is shown, from this layer down;
* a non-directory on top: it is the entry, and nothing below counts; below a directory it ends the
  merge (a directory does not merge with a file);
* a directory: it is merged with the directories of the same name below it, until one of them is
  opaque (that one is the last merged). A redirect on a directory names where the layers below
  keep its contents: an absolute path from the layer root, or a sibling name in the parent.

Listing a merged directory reads each directory merged into it, top first: the first layer to name
an entry gives it, a whiteout hides the name in the layers below its own, markers never show.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class Found(enum.Enum):
    """What one layer holds for a name, as far as merging cares."""

    ABSENT = "absent"
    WHITEOUT = "whiteout"
    DIRECTORY = "directory"
    OTHER = "non-directory"


class Step(enum.Enum):
    """What one layer's entry does to a lookup."""

    LOOK_BELOW = "look below"  # nothing here: the next layer down decides
    HIDDEN = "hidden"          # a whiteout: nothing here or below; the lookup (or merge) ends
    ENTRY = "entry"            # a non-directory on top: the entry, alone; the lookup ends
    END = "end"                # a non-directory below a directory: not merged; the merge ends
    MERGE = "merge"            # a directory: merged; the layers below may add to it
    MERGE_LAST = "merge last"  # an opaque directory: merged; nothing below counts

    @property
    def ends(self) -> bool:
        return self in (Step.HIDDEN, Step.ENTRY, Step.END, Step.MERGE_LAST)


def _steps(found: Found, opaque: bool) -> tuple[Step, Step]:
    """The lookup rule: what an entry does (on top, below a directory found above)."""
    if found is Found.ABSENT:
        return Step.LOOK_BELOW, Step.LOOK_BELOW
    if found is Found.WHITEOUT:
        return Step.HIDDEN, Step.HIDDEN
    if found is Found.OTHER:
        return Step.ENTRY, Step.END
    step = Step.MERGE_LAST if opaque else Step.MERGE
    return step, step


class Held(NamedTuple):
    """What one layer holds for a name (``opaque`` and ``redirect`` only for a directory), and the
    step it makes in a lookup (see :func:`lookup_step`), worked out once when it is made."""

    found: Found
    opaque: bool
    redirect: str | None
    steps: tuple[Step, Step]


ABSENT = Held(Found.ABSENT, False, None, _steps(Found.ABSENT, False))
WHITEOUT = Held(Found.WHITEOUT, False, None, _steps(Found.WHITEOUT, False))
OTHER = Held(Found.OTHER, False, None, _steps(Found.OTHER, False))
_DIRECTORY_STEPS = (_steps(Found.DIRECTORY, False), _steps(Found.DIRECTORY, True))


def directory(opaque: bool, redirect: str | None) -> Held:
    """What a layer holds when it holds a directory."""
    return Held(Found.DIRECTORY, opaque, redirect, _DIRECTORY_STEPS[opaque])


def lookup_step(held: Held, merging: bool) -> Step:
    """What ``held`` in one layer does to a lookup; ``merging``: a directory was found above."""
    return held.steps[merging]


def reaches_below_opaque_parent(redirect: str | None) -> bool:
    """Whether the layers below an opaque parent still count for a child with ``redirect``.

    Nothing below an opaque parent shows through, except what an absolute redirect names: the kernel
    then searches the root's lower stack (ovl_lookup, poe = roe)."""
    return redirect is not None and redirect.startswith("/")


def path_below(parent_path: str, name: str, redirect: str | None) -> str:
    """Where a layer below keeps a directory's contents: its own name in the parent's directory of
    that layer, a sibling a relative redirect names, or (absolute redirect) a path from the root."""
    if redirect is not None and redirect.startswith("/"):
        return redirect.strip("/")
    child = redirect or name
    return f"{parent_path}/{child}" if parent_path else child


class Reach(enum.Enum):
    """What the path to an absolute redirect's target is in one layer (see :func:`reach`)."""

    REACHABLE = "reachable"
    ABSENT = "absent"              # a component is missing: nothing in this layer, look below
    HIDDEN = "hidden"              # a whiteout or non-directory on the way: nothing here or below
    OPAQUE_ABOVE = "opaque above"  # reachable, but no layer below this one counts


def reach(ancestors: Iterable[Held]) -> Reach:
    """How the ancestors of an absolute redirect's target (outermost first) look in one layer.

    The kernel walks such a path one component at a time in every layer (ovl_lookup_layer): a
    whiteout or non-directory on the way ends the search in this and every lower layer (a renamed
    directory must not pick up contents its old parent hid), a missing component only skips this
    layer, an opaque directory on the way makes this layer the last one searched. ``ancestors`` may
    be lazy: it is read only as far as the answer needs.
    """
    result = Reach.REACHABLE
    for held in ancestors:
        if held.found is Found.ABSENT:
            return Reach.ABSENT
        if held.found is not Found.DIRECTORY:
            return Reach.HIDDEN
        if held.opaque:
            result = Reach.OPAQUE_ABOVE
    return result


def merge_listing(scans: Iterable[Iterable[tuple[str, T | None]]]) -> dict[str, T]:
    """The merged entries of a directory from the scans of the directories merged into it.

    ``scans`` are top first; each yields ``(name, entry)`` for an entry and ``(name, None)`` for a
    whiteout of ``name`` (markers are left out by the scan). The first scan to name an entry gives
    it; a whiteout hides the name in the scans after its own. Insertion order is scan order.
    """
    shown: dict[str, T] = {}
    hidden: set[str] = set()
    for scan in scans:
        layer_hidden: list[str] = []
        for name, entry in scan:
            if entry is None:
                layer_hidden.append(name)
            elif name not in shown and name not in hidden:
                shown[name] = entry
        hidden.update(layer_hidden)
    return shown
