"""One registry type for every name -> thing table: methods, executors, rank launchers, trial bodies.

An entry is the thing itself, or a lazy reference "package.module:attribute" imported on first use: so a
table can name code that needs torch, Ray or submitit without importing it (`import cluster` stays light,
the driver never loads a trial body), and a lower layer can name a plugin of a higher one (the Ray Train rank
launcher lives with the Ray executor) without an import edge. A name is registered once; an unknown name
raises KeyError with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, Iterator, TypeVar, Union

T = TypeVar("T")


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """"unknown method 'dp0' (did you mean 'dpo'?); known: dpo, ln_dpo, simpo"."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known))}"


def load_reference(reference: str):
    """'package.module:attribute' -> that attribute (the module imported now)."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise ValueError(f"a lazy reference is 'package.module:attribute'; got {reference!r}")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """name -> T, each entry given as a T or as a lazy 'module:attribute' reference to one."""

    def __init__(self, kind: str, entries: dict[str, Union[T, str]] | None = None):
        self.kind = kind
        self._entries: dict[str, Union[T, str]] = {}
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: Union[T, str]) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry

    def register(self, name: str):
        """Decorator form of add()."""
        def decorator(entry: T) -> T:
            self.add(name, entry)
            return entry
        return decorator

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(unknown_name_message(self.kind, name, list(self._entries)))
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = load_reference(entry)
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every entry, lazy ones loaded."""
        return ((name, self[name]) for name in self._entries)
