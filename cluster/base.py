"""The executor protocol shared by every backend, the loop that drives it, and the table of executors.

An executor runs trial tasks asynchronously: `submit` hands it one TrialTask and the trial function and returns at
once with a Submitted handle; `wait_any` blocks until at least one of the given handles is done and returns each
finished one with its TrialResult. A task whose worker died beyond the executor's retries comes back FAILED
(orchestrator.runtime.lifecycle.record_lost_trial), never missing. `cancel` stops handles the driver gives up on
(Ctrl-C, an error in the driver). An executor reports starts (and, in process, steps) to the driver's Progress;
`drive` reports every result.

`drive` keeps `slots` tasks in flight and asks for the next task the moment one ends: a grid stage (`run_tasks`)
and an asynchronous search (orchestrator.search) are the same loop, so no slot waits for a batch's slowest trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from orchestrator.core.registry import Registry
from orchestrator.core.task import TrialResult, TrialTask

TrialFn = Callable[..., TrialResult]  # trial_fn(task, report=None) -> TrialResult


class Progress(Protocol):
    def trial_started(self, task: TrialTask) -> None: ...
    def trial_step(self, step: int, total: int) -> None: ...
    def trial_done(self, result: TrialResult) -> None: ...


@dataclass(eq=False)  # handles compare by identity: two submissions of one task are two handles
class Submitted:
    """A task handed to an executor. `ref`: the backend's own handle (a Ray ObjectRef, a submitit job, a worker
    process, or nothing for a trial that runs in the driver when waited on)."""
    task: TrialTask
    ref: Any = None
    submitted_at: float = field(default_factory=time.time)


class Executor(Protocol):
    parallel: bool   # trials run in other processes (the tracking store then needs a server)
    slots: int       # trials it runs at once (drive keeps this many in flight)

    def submit(self, task: TrialTask, trial_fn: TrialFn, progress: Optional[Progress] = None) -> Submitted: ...

    def wait_any(self, pending: list[Submitted], progress: Optional[Progress] = None
                 ) -> list[tuple[Submitted, TrialResult]]: ...

    def cancel(self, pending: list[Submitted]) -> None: ...

    # Optional: start(), called once before the first task (e.g. connect to Ray), and close() at the end.


NextTask = Callable[[], Optional[TrialTask]]         # the next task to run, or None: no more
OnDone = Callable[[TrialTask, TrialResult], None]   # a finished task and its result, in the order they end


def drive(executor: Executor, next_task: NextTask, trial_fn: TrialFn, on_done: OnDone,
          progress: Optional[Progress] = None) -> None:
    """Run tasks from `next_task` with up to `executor.slots` in flight, asking for the next one as soon as a
    slot frees (after on_done has seen the result that freed it), until next_task says None and all have ended.
    On any exception (Ctrl-C included) the tasks still in flight are cancelled before it propagates."""
    pending: list[Submitted] = []
    more, slots = True, executor.slots  # (asked once: Ray's counts the cluster's resources)
    try:
        while True:
            while more and len(pending) < slots:
                task = next_task()
                if task is None:
                    more = False
                else:
                    pending.append(executor.submit(task, trial_fn, progress))
            if not pending:
                return
            for done, result in executor.wait_any(pending, progress):
                pending.remove(done)
                if progress:
                    progress.trial_done(result)
                on_done(done.task, result)
    except BaseException:
        if pending:
            executor.cancel(pending)
        raise


def run_tasks(executor: Executor, tasks: list[TrialTask], trial_fn: TrialFn, progress: Optional[Progress] = None
              ) -> list[TrialResult]:
    """Every task once (the blocking form: the loop above over a list); one TrialResult per task, in order."""
    queue = tasks[::-1]
    position = {id(task): i for i, task in enumerate(tasks)}
    results: list[Optional[TrialResult]] = [None] * len(tasks)

    def next_task() -> Optional[TrialTask]:
        return queue.pop() if queue else None

    def on_done(task: TrialTask, result: TrialResult) -> None:
        results[position[id(task)]] = result

    drive(executor, next_task, trial_fn, on_done, progress)
    return results  # type: ignore[return-value] - drive ends only when every task has a result


class BlockingRun:
    """`run(tasks, trial_fn, progress)`, the blocking form every executor offers, as the loop over its
    submit/wait_any."""

    def run(self, tasks: list[TrialTask], trial_fn: TrialFn, progress: Optional[Progress] = None
            ) -> list[TrialResult]:
        return run_tasks(self, tasks, trial_fn, progress)  # type: ignore[arg-type]


# kind (executor.kind in the spec) -> the executor class, built from the spec's executor section. Lazy entries:
# choosing one imports its backend (Ray, submitit) and nothing else does.
EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor", {
    "local": "cluster.local:LocalExecutor",
    "ray": "cluster.ray_tune:RayExecutor",
    "slurm": "cluster.slurm:SlurmExecutor",
})


def make_executor(executor_spec) -> Executor:
    return EXECUTORS[executor_spec.kind](executor_spec)
