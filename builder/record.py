"""Immutable records that cost little to define: the parse results and prepared steps.

``@dataclass(frozen=True)`` generates six methods per class through ``exec`` when the module is
imported, about a millisecond a class, and every ``lamina build`` (a cached rebuild included) imports
a few dozen of them. A class decorated with :func:`record` is a dataclass with only its ``__init__``
generated; :class:`Record`, its base, refuses any assignment or deletion once ``__init__`` has run,
as a frozen dataclass does (:class:`dataclasses.FrozenInstanceError`), and gives the same ``repr``.
Records compare by identity. ``dataclasses.replace`` and ``dataclasses.fields`` work as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")


class Record:
    """Base of :func:`record` classes: immutable after ``__init__``."""

    _sealed = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._sealed:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)  # type: ignore[arg-type]
                           if f.repr)
        return f"{type(self).__qualname__}({fields})"


@dataclass_transform(eq_default=False, field_specifiers=(dataclasses.field,))
def record(cls: type[T]) -> type[T]:
    """Make ``cls`` (a :class:`Record` subclass) a dataclass with only ``__init__`` generated."""
    assert issubclass(cls, Record), cls
    return dataclasses.dataclass(eq=False, repr=False)(cls)
