"""A trial's failure as its run records it."""

from __future__ import annotations


class TrialPhaseError(RuntimeError):
    """A trial's failure that already says where it broke: the phase and, for training, the step ("training
    failed: ...", "non-finite loss nan at step 3 ..."). Its message is the run's failure reason as it is."""


def failure_reason(exc: BaseException) -> str:
    """What a FAILED run's posweep.failure tag says: a TrialPhaseError's own message, else 'Type: message'."""
    return str(exc) if isinstance(exc, TrialPhaseError) else f"{type(exc).__name__}: {exc}"
