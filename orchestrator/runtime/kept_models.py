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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from orchestrator.core.runs import SELECTION_METRIC, RunStatus, TrialRecord, best_first
from orchestrator.core.tags import (TAG_FAILURE, TAG_KEY, TAG_KIND, TAG_METHOD, TAG_SWEEP, TAG_WEIGHTS,
                                    WEIGHTS_ARTIFACT, WEIGHTS_HELD)
from orchestrator.infra.errors import first_line
from orchestrator.infra.files import exclusive_lock, folder_problem
from orchestrator.runtime.store import record_of, run_tag
from orchestrator.runtime.sweep_runs import SweepTracker

KEEP_POLICIES = ("best_per_method", "all", "none")


class KeptModels:
    """The weights a sweep keeps (run artifacts model/, tagged posweep.weights) and their entries in the Model
    Registry: one registered model per sweep and method, its `best` alias on the kept best trial."""

    def __init__(self, tracker: "SweepTracker"):
        self.tracker, self.client = tracker, tracker.client

    def with_weights(self, method: str) -> list[TrialRecord]:
        """The method's trial runs whose artifacts hold weights, whole or (an upload that died) in part."""
        runs = self.tracker._search(f"tags.`{TAG_KIND}` = 'trial' and tags.`{TAG_METHOD}` = '{method}'")
        return [record_of(r) for r in runs if r.data.tags.get(TAG_WEIGHTS) in WEIGHTS_HELD]

    def delete_weights(self, record: TrialRecord, why: str) -> None:
        """Delete a run's model/ artifacts; the tag first, so a half-deleted folder never counts as kept."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.client.set_tag(record.run_id, TAG_WEIGHTS, f"deleted: {why}")
        artifact_uri = self.client.get_run(record.run_id).info.artifact_uri
        repository = get_artifact_repository(artifact_uri)
        if any(a.path == WEIGHTS_ARTIFACT for a in repository.list_artifacts()):
            repository.delete_artifacts(WEIGHTS_ARTIFACT)

    def register_best(self, name: str, record: TrialRecord, description: str) -> str:
        """Make `record`'s weights the registered model `name`'s only version, alias `best`; its version number.
        Idempotent: a rerun after a crash anywhere in here ends in the same state."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags={TAG_SWEEP: self.tracker.sweep,
                                                            TAG_METHOD: record.method}, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = self.client.search_model_versions(f"name = '{name}'")
        version = next((v for v in versions if v.run_id == record.run_id), None)
        if version is None:
            source = f"{self.client.get_run(record.run_id).info.artifact_uri}/{WEIGHTS_ARTIFACT}"
            version = self.client.create_model_version(
                name, source, run_id=record.run_id, description=f"trial {record.run_name}",
                tags={TAG_KEY: record.trial_key, SELECTION_METRIC: str(record.metrics.get(SELECTION_METRIC))})
        self.client.set_registered_model_alias(name, "best", version.version)
        for other in versions:  # the registry holds each method's best only
            if str(other.version) != str(version.version):
                self.client.delete_model_version(name, other.version)
        return str(version.version)

    def weights_problem(self, record: TrialRecord) -> Optional[str]:
        """Why a run's kept weights (model/) cannot be served as what its trial wrote, or None: missing, or a file
        other than the sha256 the folder's ready marker recorded (files.folder_problem). Read in place from a local
        artifact store; downloaded to a temporary folder from a server."""
        artifact_uri = self.client.get_run(record.run_id).info.artifact_uri
        if urlparse(artifact_uri).scheme == "file":
            folder = Path(urlparse(artifact_uri).path) / WEIGHTS_ARTIFACT
            return self._folder_problem(folder) if folder.is_dir() else f"its {WEIGHTS_ARTIFACT}/ artifacts are gone"
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = Path(mlflow.artifacts.download_artifacts(run_id=record.run_id, artifact_path=WEIGHTS_ARTIFACT,
                                                                  dst_path=tmp, tracking_uri=self.tracker.uri))
            except Exception as exc:  # noqa: BLE001 - any failure to read them back: not servable
                return f"its {WEIGHTS_ARTIFACT}/ artifacts cannot be read back ({first_line(exc)})"
            return self._folder_problem(folder)

    @staticmethod
    def _folder_problem(folder: Path) -> Optional[str]:
        problem = folder_problem(folder)
        return None if problem is None else problem.replace(str(folder), WEIGHTS_ARTIFACT)

    def invalidate(self, record: TrialRecord, problem: str) -> None:
        """A FINISHED run whose kept weights are gone or altered: FAILED (reason in posweep.failure), so its trial
        runs again and writes them anew; its weights no longer count as kept."""
        reason = f"its kept weights are no longer what the trial wrote ({problem}); the trial runs again"
        self.client.log_batch(record.run_id, tags=[run_tag(TAG_FAILURE, reason), run_tag(TAG_WEIGHTS, f"lost: {problem}")])
        self.client.set_terminated(record.run_id, RunStatus.FAILED.value)


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
