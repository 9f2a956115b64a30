"""The executor protocol shared by every backend, and the table of executors.

An executor takes a batch of pending TrialTasks and the trial function, runs each task once, and returns one
TrialResult per task, in order. A task whose worker died beyond the executor's retries comes back FAILED
(orchestrator.runtime.lifecycle.record_lost_trial), never missing. It reports progress through the driver's
Progress object.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from orchestrator.core.registry import Registry
from orchestrator.core.task import TrialResult, TrialTask

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


# kind (executor.kind in the spec) -> the executor class, built from the spec's executor section. Lazy entries:
# choosing one imports its backend (Ray, submitit) and nothing else does.
EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor", {
    "local": "cluster.local:LocalExecutor",
    "ray": "cluster.ray_tune:RayExecutor",
    "slurm": "cluster.slurm:SlurmExecutor",
})


def make_executor(executor_spec) -> Executor:
    return EXECUTORS[executor_spec.kind](executor_spec)
