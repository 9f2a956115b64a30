"""The executor protocol shared by every backend (local now; Ray and SLURM behind the same interface).

An executor takes a batch of pending TrialTasks and the trial function, runs each task once, and returns one
TrialResult per task, in order. A task whose worker died beyond the executor's retries comes back FAILED
(trainers.trial.record_lost_trial), never missing. It reports progress through the driver's Progress object.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from orchestrator.task import TrialResult, TrialTask
from trainers.methods import unknown_name_message

TrialFn = Callable[..., TrialResult]  # trial_fn(task, report=None) -> TrialResult


class Progress(Protocol):
    def trial_started(self, task: TrialTask) -> None: ...
    def trial_step(self, step: int, total: int) -> None: ...
    def trial_done(self, result: TrialResult) -> None: ...


class Executor(Protocol):
    parallel: bool   # trials run in other processes (the tracking store then needs a server)
    slots: int       # trials it runs at once (a search asks for this many points per batch)

    def run(self, tasks: list[TrialTask], trial_fn: TrialFn, progress: Optional[Progress] = None
            ) -> list[TrialResult]: ...

    # Optional: start(), called once before the first batch (e.g. connect to Ray), and close() at the end.


EXECUTORS: dict[str, Callable[..., Executor]] = {}


def register_executor(kind: str):
    def decorator(factory):
        EXECUTORS[kind] = factory
        return factory
    return decorator


def make_executor(executor_spec) -> Executor:
    if executor_spec.kind not in EXECUTORS:
        raise KeyError(unknown_name_message("executor", executor_spec.kind, list(EXECUTORS)))
    return EXECUTORS[executor_spec.kind](executor_spec)
