"""The stages pipeline: base -> SFT grid -> pick the best SFT checkpoint -> preference grids -> summary.

Resume is ours: every planned trial whose key already has a FINISHED run in the sweep's experiment is
skipped; RUNNING leftovers of a dead driver are closed as KILLED and their trials run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from analysis.summary import best_per_stage, trials_frame
from orchestrator.grid import SELECT_SFT_BY, StagePlan, plan_sweep
from orchestrator.progress import TrialProgress
from orchestrator.spec import SweepSpec
from orchestrator.task import TrialTask, TrialRuntime
from orchestrator.tracking import TAG_CHECKPOINT, TAG_SAMPLES, SweepTracker, TrialRecord


class SweepError(RuntimeError):
    """The sweep cannot go on (not a single trial's failure, which is recorded and passed over)."""


@dataclass
class SweepOutcome:
    stages: list[StagePlan]
    records: list[TrialRecord]   # the latest run of every planned trial key
    skipped: int
    ran: int
    failed: int
    wall_seconds: float

    @property
    def summary(self) -> pd.DataFrame:
        frame = trials_frame(r.model_dump() for r in self.records)
        return best_per_stage(frame, [s.stage for s in self.stages], SELECT_SFT_BY)


def _stage_description(stage: StagePlan, sweep: str) -> str:
    return (f"Sweep **{sweep}**, stage **{stage.stage}**: {len(stage.trials)} trials (child runs). "
            "Compare them on mean_score, win_vs_chosen, win_vs_sft, kl and length.")


def select_init(tracker: SweepTracker, stage: StagePlan) -> dict[str, str]:
    """Runtime fields that point preference trials at the best finished trial of `stage`."""
    finished = list(tracker.finished(t.trial_key for t in stage.trials).values())
    if not finished:
        raise SweepError(f"no trial of stage {stage.stage!r} finished, so there is no checkpoint to start the "
                         "preference stages from; see the FAILED runs' posweep.failure tag")
    best = max(finished, key=lambda r: r.metrics.get(SELECT_SFT_BY, float("-inf")))
    checkpoint, samples = best.tags.get(TAG_CHECKPOINT), best.tags.get(TAG_SAMPLES)
    if not checkpoint or not Path(checkpoint).is_dir() or not samples or not Path(samples).is_file():
        raise SweepError(f"the selected {stage.stage} trial {best.run_name!r} (run {best.run_id}) has no "
                         f"checkpoint/samples on disk ({checkpoint}); the workdir was removed or moved. "
                         "Delete that run in MLflow (or use a fresh tracking store) and rerun")
    return {"init_checkpoint": checkpoint, "init_trial_key": best.trial_key, "sft_samples": samples}


def _latest_records(tracker: SweepTracker, keys: set[str]) -> list[TrialRecord]:
    """One record per key: its FINISHED run if any, else its most recent run."""
    by_key: dict[str, TrialRecord] = {}
    for record in tracker.trials():  # newest first (MLflow's default order)
        if record.trial_key not in keys:
            continue
        kept = by_key.get(record.trial_key)
        if kept is None or (kept.status != "FINISHED" and record.status == "FINISHED"):
            by_key[record.trial_key] = record
    return list(by_key.values())


def run_sweep(spec: SweepSpec, tracking_uri: str, smoke: bool = False, executor=None,
              show_progress: bool = True, echo: Callable[[str], None] = print,
              share_work: bool = True) -> SweepOutcome:
    from cluster import make_executor
    from trainers.trial import run_trial

    started = time.monotonic()
    stages = plan_sweep(spec, smoke)
    executor = executor or make_executor(spec.executor)
    tracker = SweepTracker(tracking_uri, spec.name)
    keys = {t.trial_key for s in stages for t in s.trials}
    finished = tracker.finished(keys)
    echo(f"sweep {spec.name!r}: {len(keys)} trials in {len(stages)} stages; tracking {tracking_uri} "
         f"(experiment {tracker.experiment_id})")
    if finished:
        echo(f"resuming: skipping {len(finished)} trials already FINISHED")
    progress = TrialProgress(len(keys), len(finished), enabled=show_progress)
    init: dict[str, str] = {}
    ran = failed = 0
    try:
        for stage in stages:
            pending = [t for t in stage.trials if t.trial_key not in finished]
            parent = tracker.stage_run(stage.stage, _stage_description(stage, spec.name))
            tracker.close_stale(t.trial_key for t in pending)
            runtime = TrialRuntime(sweep=spec.name, tracking_uri=tracking_uri,
                                   experiment_id=tracker.experiment_id, parent_run_id=parent,
                                   workdir=str(Path(spec.workdir).resolve()), share_work=share_work, **init)
            results = executor.run([TrialTask(trial=t, runtime=runtime) for t in pending], run_trial, progress)
            ran += len(results)
            failed += sum(r.status != "FINISHED" for r in results)
            tracker.finish_stage(parent)
            if stage.stage == "sft":
                init = select_init(tracker, stage)
    finally:
        progress.close()
    return SweepOutcome(stages, _latest_records(tracker, keys), len(finished), ran, failed,
                        time.monotonic() - started)
