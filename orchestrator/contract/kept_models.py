"""Which trained preference models outlive their trial (spec: checkpoints.keep) and the Model Registry entries
that point at them: one registered model per sweep and method (SWEEP-METHOD), alias `best`.

A preference trial that keeps weights logs them as its run's model/ artifacts and tags the run
posweep.weights=logged once they are whole (trainers.trial). Then, under the sweep's models lock, the decision
is made from MLflow alone: the best FINISHED run of the method by the selection metric is registered, and the
weights of every other ended run are deleted (best_per_method) or only those of runs that did not finish (all).
Each trial applies it once it FINISHED (superseded weights go as the sweep goes); the driver applies it again at
the end of every run, which completes whatever a killed process left half done. Every step is idempotent: the
state after a crash anywhere, then a rerun, is the state of an uninterrupted sweep.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator.contract.files import exclusive_lock
from orchestrator.contract.runs import SELECTION_METRIC, RunStatus, best_first
from orchestrator.contract.tracking import TAG_WEIGHTS, KeptModels, SweepTracker, TrialRecord

KEEP_POLICIES = ("best_per_method", "all", "none")


def registered_model_name(sweep: str, method: str) -> str:
    return f"{sweep}-{method}"


def _rank(record: TrialRecord) -> tuple[float, str]:
    return best_first(record.metrics.get(SELECTION_METRIC, float("nan")), record.trial_key)


@dataclass(frozen=True)
class KeepDecision:
    best: Optional[TrialRecord]                 # the run the registry points at
    delete: list[TrialRecord] = field(default_factory=list)  # runs whose weights go


def decide(with_weights: list[TrialRecord], keep: str) -> KeepDecision:
    """Pure: of one method's runs that hold weights, the best FINISHED one whose upload completed and the ones
    to delete. Runs still RUNNING are never touched (their trial may be writing); a stale one is closed KILLED
    by the next rerun, and its weights, whole or partial, go then."""
    if keep not in KEEP_POLICIES:
        raise ValueError(f"unknown checkpoints.keep {keep!r}; one of {', '.join(KEEP_POLICIES)}")
    finished = [r for r in with_weights if r.status == RunStatus.FINISHED and r.tags.get(TAG_WEIGHTS) == "logged"]
    best = min(finished, key=_rank) if finished else None
    ended = [r for r in with_weights if r.status != RunStatus.RUNNING]
    if keep == "best_per_method":
        delete = [r for r in ended if best is None or r.run_id != best.run_id]
    else:  # all (and none, for weights an earlier policy kept): only runs that never finished lose theirs
        delete = [r for r in ended if r.status != RunStatus.FINISHED]
    return KeepDecision(best, delete)


def _why(record: TrialRecord, best: Optional[TrialRecord]) -> str:
    if record.status != RunStatus.FINISHED:
        return f"the run ended {record.status}"
    return f"run {best.run_id} ({best.run_name}) scores higher on {SELECTION_METRIC}" if best else "superseded"


def keep_models(uri: str, sweep: str, method: str, keep: str, register: bool, workdir: str | Path) -> Optional[str]:
    """Apply the policy to one method of a sweep; the registered model's `best` version, if registered."""
    tracker = SweepTracker(uri, sweep, create=False)
    kept = KeptModels(tracker)
    name = registered_model_name(sweep, method)
    with exclusive_lock(Path(workdir) / "locks" / f"models-{sweep}.lock"):
        decision = decide(kept.with_weights(method), keep)
        version = None
        if decision.best is not None and register:  # the new best is registered before the old one's weights go
            version = kept.register_best(name, decision.best, (
                f"The best {method} trial of sweep {sweep} by {SELECTION_METRIC} (checkpoints.keep: {keep}). Its "
                f"weights are the run's model/ artifacts, a Hugging Face folder: load it with transformers' "
                f"from_pretrained(mlflow.artifacts.download_artifacts('models:/{name}@best'))."))
        for record in decision.delete:
            kept.delete_weights(record, _why(record, decision.best))
    return version



def verify_kept_best(uri: str, sweep: str, method: str, keep: str, workdir: str | Path, repair: bool = True
                     ) -> Optional[str]:
    """Check that the weights of a method's kept best run are still the ones its trial wrote (every file against
    the sha256 its ready marker recorded). When they are not: with `repair`, the run is marked FAILED so its trial
    runs again and the registry moves to the best run whose weights hold (`sweep run`); either way, one line
    saying so (None when they hold, or nothing is kept)."""
    if keep == "none":
        return None
    tracker = SweepTracker(uri, sweep, create=False)
    kept = KeptModels(tracker)
    lock = exclusive_lock(Path(workdir) / "locks" / f"models-{sweep}.lock") if repair else contextlib.nullcontext()
    with lock:  # (reading only, `sweep status` takes no lock: it creates nothing)
        best = decide(kept.with_weights(method), keep).best
        problem = kept.weights_problem(best) if best is not None else None
        if problem is None:
            return None
        if repair:
            kept.invalidate(best, problem)
    what = "runs again" if repair else "runs again on the next `sweep run`"
    return (f"kept {method} model of run {best.run_id} ({best.run_name}): {problem}; the trial {what}, and "
            f"{registered_model_name(sweep, method)}@best moves to the best run whose weights hold")
