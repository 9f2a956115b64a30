"""In-process executor: trials run one after another in the driver (the embedded default)."""

from __future__ import annotations

from typing import Optional

from cluster.base import Progress, TrialFn
from orchestrator.core.task import TrialResult, TrialTask


class LocalExecutor:
    parallel = False  # trials run in the driver: one process writes the tracking store
    slots = 1

    def __init__(self, spec=None):
        """Every executor is built from its spec section (EXECUTORS); the local one, {kind: local}, sets nothing."""

    def run(self, tasks: list[TrialTask], trial_fn: TrialFn, progress: Optional[Progress] = None
            ) -> list[TrialResult]:
        results = []
        for task in tasks:
            if progress:
                progress.trial_started(task)
            result = trial_fn(task, report=progress.trial_step if progress else None)
            if progress:
                progress.trial_done(result)
            results.append(result)
        return results
