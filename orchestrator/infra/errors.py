"""Reading exceptions: what an error was raised from, and its one-line form."""

from __future__ import annotations

from typing import Optional


def caused_by(exc: Optional[BaseException], types) -> Optional[BaseException]:
    """The first exception of `types` in exc's chain (itself, then what it was raised from or while handling),
    or None. Libraries wrap the error that says why: MLflow a requests ConnectionError, torch.save an OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An error's first line, for one-line reports (MLflow's connection errors run to several hundred chars)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
