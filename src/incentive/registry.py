"""Name → part registries, so recipes pick parts by name and new methods need no trainer edits."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

LISTED = 12
"""At most this many known names follow an unknown one that is close to none of them."""


class UnknownName(KeyError):
    """A name no part is registered under; a KeyError whose message prints as written (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0])


def did_you_mean(name: str, known: Iterable[str], label: str = "known", limit: int | None = LISTED) -> str:
    """The hint after an unknown name: the closest known name ("did you mean 'format'?"), else the known names
    themselves (the first ``limit``, then their count), so a typo gets its fix and no hint is huge."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    if not names:
        return f"{label}: (none)"
    if limit is None or len(names) <= limit:
        return f"{label}: {', '.join(names)}"
    return f"{label}: {', '.join(names[:limit])}, ... ({len(names)} in all)"


class Registry(Generic[T]):
    """A named collection of parts; an unknown name fails with the closest known one, or a short list."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                first, second = _origin(self._items[name]), _origin(item)
                raise ValueError(f"{self.kind} '{name}' is registered twice (by {first} and by {second})")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownName(f"unknown {self.kind} '{name}'; {did_you_mean(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def _origin(item: object) -> str:
    """Where a part was defined (``module.Class``), so a plugin that reuses a taken name learns whose it is."""
    module = getattr(item, "__module__", None) or "?"
    qualname = getattr(item, "__qualname__", None) or type(item).__qualname__
    return f"{module}.{qualname}"
