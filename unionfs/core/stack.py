"""The order of a union's read-only layers, held in one type that cannot be built backwards.

An image lists its layers bottom first (the order they were made in, the order of an OCI manifest);
overlayfs's ``lowerdir=`` lists them top first. A plain list carries no mark of which order it is
in, and handing one to a place that wants the other shows files a layer above deleted. A
:class:`LayerStack` is built only through a named constructor that says which order its argument is
in (:meth:`LayerStack.from_bottom_up`, :meth:`LayerStack.from_top_down`) and read the same way
(:meth:`LayerStack.bottom_up`, :meth:`LayerStack.top_down`); a bare list is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_NAMED_ONLY = object()


class LayerStack:
    """Read-only layer directories of a union, immutable, with their order explicit."""

    __slots__ = ("_top_down",)
    _top_down: tuple[Path, ...]

    def __init__(self, top_down: tuple[Path, ...], token: object = None) -> None:
        if token is not _NAMED_ONLY:
            raise TypeError("build a LayerStack with LayerStack.from_bottom_up() or "
                            "LayerStack.from_top_down(), which say the order of the layers given")
        object.__setattr__(self, "_top_down", top_down)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a LayerStack is immutable")

    @staticmethod
    def _paths(layers: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
        if isinstance(layers, (str, bytes, os.PathLike)):
            raise TypeError("a LayerStack takes a sequence of layer directories, not one path")
        return tuple(Path(layer) for layer in layers)

    @classmethod
    def from_bottom_up(cls, layers: Iterable[str | os.PathLike[str]]) -> LayerStack:
        """The stack of ``layers`` given bottom first (an image's order: base layer first)."""
        return cls(tuple(reversed(cls._paths(layers))), _NAMED_ONLY)

    @classmethod
    def from_top_down(cls, layers: Iterable[str | os.PathLike[str]]) -> LayerStack:
        """The stack of ``layers`` given top first (overlayfs's ``lowerdir=`` order)."""
        return cls(cls._paths(layers), _NAMED_ONLY)

    def top_down(self) -> tuple[Path, ...]:
        """The layers, top first: the first one's entries hide those of the ones after it."""
        return self._top_down

    def bottom_up(self) -> tuple[Path, ...]:
        """The layers, bottom first (an image's order)."""
        return tuple(reversed(self._top_down))

    def with_top(self, layer: str | os.PathLike[str]) -> LayerStack:
        """This stack with ``layer`` put above all of its layers."""
        return LayerStack((Path(layer), *self._top_down), _NAMED_ONLY)

    def with_bottom(self, layer: str | os.PathLike[str]) -> LayerStack:
        """This stack with ``layer`` put below all of its layers."""
        return LayerStack((*self._top_down, Path(layer)), _NAMED_ONLY)

    def __len__(self) -> int:
        return len(self._top_down)

    def __iter__(self) -> Iterator[Path]:
        raise TypeError("say the order: iterate LayerStack.top_down() or LayerStack.bottom_up()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerStack) and other._top_down == self._top_down

    def __hash__(self) -> int:
        return hash(self._top_down)

    def __reduce__(self) -> tuple[object, tuple[tuple[Path, ...]]]:
        return LayerStack.from_top_down, (self._top_down,)

    def __repr__(self) -> str:
        return f"LayerStack.from_top_down({[str(p) for p in self._top_down]!r})"
