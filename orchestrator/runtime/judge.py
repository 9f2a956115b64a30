"""ASHA's decision at a rung, made by the trial itself from the tracking store (the core's rung rule, applied to the
values the stage's other trials logged under the same rung signature): the AshaJudge a trial body is handed."""

from __future__ import annotations

import math
from typing import Optional, Protocol

from orchestrator.core.rungs import (DEFAULT_RUNG_METRIC, RUNG_PREFIX, RungDecision, TrialStopped, asha_decision,
                                     rung_signature, rung_value_key)
from orchestrator.core.spec import AshaSpec
from orchestrator.core.task import TrialTask


class RungStore(Protocol):
    """What a judge needs of the trial's logger (orchestrator.runtime.trial_log.TrialLogger)."""
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def rung_values(self, stage_key: str, metric: str, exclude_key: str, signature: str) -> list[float]: ...


class AshaJudge:
    """Logs a trial's rung evaluations and, under early stopping, decides at each rung whether it goes on,
    against the values of the stage's other trials with the same rung signature."""

    def __init__(self, store: RungStore, stage_key: str, trial_key: str, settings: Optional[AshaSpec],
                 signature: str):
        self.store, self.stage_key, self.trial_key, self.settings = store, stage_key, trial_key, settings
        self.signature = signature
        self.values: dict[int, float] = {}

    @classmethod
    def for_trial(cls, store: RungStore, task: TrialTask) -> "AshaJudge":
        """The judge of one trial: its stage, key, the sweep's early stopping and its rung signature."""
        stopping = task.runtime.early_stopping
        return cls(store, task.runtime.stage_key, task.trial.trial_key, stopping,
                   rung_signature(task.trial.evaluation, stopping))

    def __call__(self, rung: int, step: int, metrics: dict[str, float]) -> Optional[RungDecision]:
        """Log `metrics` (names without the rung/ prefix) at `step`; raise TrialStopped when ASHA stops the
        trial here; the decision (None without early stopping)."""
        settings = self.settings
        logged = {f"{RUNG_PREFIX}{k}": v for k, v in metrics.items()}
        compared_metric = settings.metric if settings else DEFAULT_RUNG_METRIC
        if compared_metric in logged:
            logged[rung_value_key(rung)] = self.values[rung] = logged[compared_metric]
        self.store.log_metrics(logged, step)
        if settings is None or rung < settings.min_rung or settings.metric not in logged:
            return None  # (a stage without the metric, e.g. rung/kl of SFT trials, is not stopped on it)
        value = logged[settings.metric]
        others = self.store.rung_values(self.stage_key, rung_value_key(rung), self.trial_key, self.signature)
        stop, cutoff = asha_decision(value, others, settings.reduction_factor, settings.mode, settings.min_peers)
        decision = RungDecision(rung, step, settings.metric, value, cutoff,
                                sum(math.isfinite(v) for v in others), stop)
        if stop:
            raise TrialStopped(decision, decision.reason(settings.reduction_factor, settings.min_peers),
                               dict(self.values))
        return decision
