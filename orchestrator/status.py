"""Where a sweep stands and what it will cost: pure functions over the plan and the runs tracking returns.

`sweep status` counts trials per stage (done, running, failed, pending) with the time and GPU-hours spent;
`sweep plan` estimates the whole sweep's cost from the trials measured so far (per stage, else the sweep's
mean) or, before any has run, from the spec's `cost` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from orchestrator.core.runs import OUTCOMES, RunStatus, TrialRecord, latest_per_key
from orchestrator.core.spec import CostSpec, SweepSpec
from orchestrator.grid import StagePlan
from orchestrator.pipeline import stage_records, to_run

STATUSES = (RunStatus.FINISHED, RunStatus.RUNNING, RunStatus.FAILED, RunStatus.KILLED, RunStatus.STOPPED)


def _stage_runs(records: list[TrialRecord], stage: StagePlan) -> list[TrialRecord]:
    """The latest run of each of the stage's trial keys."""
    return latest_per_key(stage_records(records, stage))


def status_table(stages: list[StagePlan], records: list[TrialRecord], spec: SweepSpec) -> pd.DataFrame:
    """One row per stage: planned, done (finished), running, failed, stopped (early, at a rung), pending (what
    `sweep run` would run now: pipeline.to_run, failed and killed trials and stops the spec's early stopping no
    longer stands by included), trial-hours and GPU-hours spent."""
    rows = []
    for stage in stages:
        runs = _stage_runs(records, stage)
        counts = {s.value: sum(r.status == s for r in runs) for s in STATUSES}
        spent = stage_records(records, stage)  # every attempt costs, retried or not
        rows.append({
            "stage": stage.stage, "planned": stage.size, "done": counts["FINISHED"], "running": counts["RUNNING"],
            "failed": counts["FAILED"], "stopped": counts["STOPPED"], "pending": to_run(records, stage, spec),
            "trial_hours": sum(r.metrics.get("wall_seconds", 0.0) for r in spent) / 3600,
            "gpu_hours": sum(r.metrics.get("gpu_hours", 0.0) for r in spent)})
    return pd.DataFrame(rows)


def elapsed_seconds(records: list[TrialRecord], now_ms: int) -> Optional[float]:
    """From the first trial's start to the last one's end (or now, while one runs)."""
    starts = [r.start_time for r in records if r.start_time is not None]
    if not starts:
        return None
    ends = [now_ms if r.end_time is None else r.end_time for r in records]
    return (max(ends) - min(starts)) / 1000


@dataclass(frozen=True)
class TrialCost:
    seconds: Optional[float]
    gpu_hours: Optional[float]
    source: str           # "measured (stage)", "measured (sweep)", "spec", "FLOPs estimate" or "unknown"


def _measured(runs: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in runs if r.status in OUTCOMES and "wall_seconds" in r.metrics]


def trial_cost(stage: StagePlan, records: list[TrialRecord], stages: list[StagePlan], spec_cost: CostSpec,
               estimate: Optional[TrialCost] = None) -> TrialCost:
    """Cost of one trial of `stage`: the mean over its measured trials, else over the sweep's, else the spec's
    trial_seconds, else `estimate` (the planner's FLOPs estimate)."""
    for runs, source in ((_measured(_stage_runs(records, stage)), "measured (stage)"),
                         (_measured([r for s in stages for r in _stage_runs(records, s)]), "measured (sweep)")):
        if runs:
            seconds = sum(r.metrics["wall_seconds"] for r in runs) / len(runs)
            gpu = sum(r.metrics.get("gpu_hours", 0.0) for r in runs) / len(runs)
            return TrialCost(seconds, gpu, source)
    if spec_cost.trial_seconds:
        return TrialCost(spec_cost.trial_seconds, spec_cost.trial_seconds * spec_cost.gpus_per_trial / 3600, "spec")
    return estimate or TrialCost(None, None, "unknown")


def cost_estimate(stages: list[StagePlan], records: list[TrialRecord], spec: SweepSpec,
                  estimates: Optional[dict[str, TrialCost]] = None) -> pd.DataFrame:
    """Per stage: trials, cost per trial and its source, estimated trial-hours and GPU-hours for the whole
    stage and for what is still to run. `estimates`: the planner's per-stage FLOPs estimates, used last."""
    rows = []
    for stage in stages:
        cost = trial_cost(stage, records, stages, spec.cost, (estimates or {}).get(stage.stage))
        left = to_run(records, stage, spec)
        hours = (lambda n: n * cost.seconds / 3600) if cost.seconds is not None else (lambda n: None)  # noqa: E731
        gpu = (lambda n: n * cost.gpu_hours) if cost.gpu_hours is not None else (lambda n: None)  # noqa: E731
        rows.append({"stage": stage.stage, "trials": stage.size, "to_run": left, "seconds_per_trial": cost.seconds,
                     "source": cost.source, "trial_hours": hours(stage.size), "trial_hours_to_run": hours(left),
                     "gpu_hours": gpu(stage.size), "gpu_hours_to_run": gpu(left)})
    return pd.DataFrame(rows)


def format_hours(value: Optional[float]) -> str:
    """Hours as a table shows them: three significant digits, whole hours from 100; under 0.01 h (36 s) "<0.01",
    not 0.000284."""
    if value is None or pd.isna(value):
        return "?"
    if 0 < value < 0.01:
        return "<0.01"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
