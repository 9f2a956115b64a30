"""The only module that talks to MLflow.

Layout of a sweep in MLflow: one experiment per sweep; one parent run per stage (tag posweep.run_kind =
stage); one child run per trial (posweep.run_kind = trial, mlflow.parentRunId = its stage run) holding every
hyperparameter as a param, the evaluation metrics, per-step training curves, and the per-sample table
(artifact samples.json). Resume reads the trial runs back by their posweep.trial_key tag.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from pydantic import BaseModel

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000
SAMPLES_ARTIFACT = "samples.json"

TAG_SWEEP = "posweep.sweep"
TAG_KIND = "posweep.run_kind"        # "stage" | "trial"
TAG_STAGE = "posweep.stage"
TAG_METHOD = "posweep.method"
TAG_KEY = "posweep.trial_key"
TAG_INIT_KEY = "posweep.init_trial_key"
TAG_CHECKPOINT = "posweep.checkpoint"
TAG_SAMPLES = "posweep.samples"
TAG_FAILURE = "posweep.failure"
TAG_REF_CACHE = "posweep.ref_cache"  # hit | miss: whether the trial computed its reference log-probs
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"


def resolve_tracking_uri(cli_uri: Optional[str] = None, spec_uri: Optional[str] = None) -> str:
    """--tracking-uri, then the spec's tracking.uri, then MLFLOW_TRACKING_URI, then ./mlflow.db."""
    return cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _quiet_mlflow() -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@functools.lru_cache(maxsize=4)
def _client(uri: str):
    """One client per URI and process: building one costs ~0.25 s, and trials of a process share it."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    return MlflowClient(tracking_uri=uri)


def _local_artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a local SQLite store go beside the database file, not wherever the CWD happens to be."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db_path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (db_path.parent / "mlartifacts").as_uri()


class TrialRecord(BaseModel):
    """A trial run as read back from MLflow (plain data for the orchestrator and analysis)."""
    run_id: str
    run_name: str
    trial_key: str
    stage: str
    method: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def _record(run) -> TrialRecord:
    tags = run.data.tags
    return TrialRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", trial_key=tags.get(TAG_KEY, ""),
                       stage=tags.get(TAG_STAGE, ""), method=tags.get(TAG_METHOD, ""), status=run.info.status,
                       params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(tags))


class SweepTracker:
    """Driver-side view of one sweep's experiment."""

    def __init__(self, uri: str, sweep: str):
        self.uri, self.sweep = uri, sweep
        self.client = _client(uri)
        experiment = self.client.get_experiment_by_name(sweep)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                sweep, artifact_location=_local_artifact_root(uri), tags={TAG_SWEEP: sweep})
        else:
            self.experiment_id = experiment.experiment_id

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000,
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def stage_run(self, stage: str, description: str = "") -> str:
        """The parent run of a stage, reused when the sweep is rerun."""
        found = self._search(f"tags.`{TAG_KIND}` = 'stage' and tags.`{TAG_STAGE}` = '{stage}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {TAG_SWEEP: self.sweep, TAG_KIND: "stage", TAG_STAGE: stage}
        if description:
            tags[TAG_NOTE] = description
        return self.client.create_run(self.experiment_id, tags=tags, run_name=f"stage {stage}").info.run_id

    def finish_stage(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def trials(self, stage: Optional[str] = None) -> list[TrialRecord]:
        query = f"tags.`{TAG_KIND}` = 'trial'"
        if stage is not None:
            query += f" and tags.`{TAG_STAGE}` = '{stage}'"
        return [_record(r) for r in self._search(query)]

    def finished(self, keys: Iterable[str]) -> dict[str, TrialRecord]:
        """trial_key -> its FINISHED run, for the given keys."""
        wanted = set(keys)
        return {r.trial_key: r for r in self.trials() if r.status == "FINISHED" and r.trial_key in wanted}

    def close_stale(self, keys: Iterable[str]) -> int:
        """Mark RUNNING runs of these (unfinished) keys KILLED: their process is gone, a rerun replaces them."""
        wanted = set(keys)
        stale = [r for r in self.trials() if r.status == "RUNNING" and r.trial_key in wanted]
        for r in stale:
            self.client.set_terminated(r.run_id, "KILLED")
        return len(stale)

    def load_samples(self, run_id: str, artifact_file: str = SAMPLES_ARTIFACT) -> list[dict]:
        """A trial's per-sample records, read back from its table artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, artifact_file, tmp)
            table = json.loads(Path(path).read_text())
        return [dict(zip(table["columns"], row)) for row in table["data"]]


class TrialLogger:
    """Trial-side logging into one child run; usable from any process that can reach the store."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str):
        self.client = _client(uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.run_id: Optional[str] = None

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**tags, TAG_KIND: "trial", TAG_PARENT: self.parent_run_id})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_samples(self, samples: list[dict], artifact_file: str = SAMPLES_ARTIFACT) -> None:
        """Per-sample records as an MLflow table (viewable in the UI's artifact and evaluation views)."""
        columns = {key: [s.get(key) for s in samples] for key in samples[0]} if samples else {}
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
