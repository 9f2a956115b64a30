"""A trial's failure as its run records it."""

from __future__ import annotations

import contextlib


class TrialPhaseError(RuntimeError):
    """A trial's failure that already says where it broke: the phase and, for training, the step ("training
    failed: ...", "non-finite loss nan at step 3 ..."). Its message is the run's failure reason as it is."""


def failure_reason(exc: BaseException) -> str:
    """What a FAILED run's posweep.failure tag says: a TrialPhaseError's own message, else 'Type: message'."""
    return str(exc) if isinstance(exc, TrialPhaseError) else f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def failing_phase(name: str, passthrough: tuple = ()):
    """Re-raise an error of the block as TrialPhaseError("NAME failed: Type: message"), raised from it (so what it
    was raised from, a lost tracking store for one, is still found in its chain), so the FAILED run's reason says
    where the trial broke. Errors that already say it (TrialPhaseError, `passthrough`) pass as they are."""
    try:
        yield
    except (TrialPhaseError, *passthrough):
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with its phase
        raise TrialPhaseError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
