"""Reading and writing a sweep's experiment from the driver: its stage runs, its trial runs read back as records,
the report, the runs view; and a store's sweeps (`sweep ui`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

from orchestrator.core.runs import SELECTION_METRIC, TRIAL_METRICS, RunStatus, TrialRecord
from orchestrator.core.tags import (MODEL_TRAINING, RUNS_VIEW_KEY, SAMPLES_ARTIFACT, TAG_EXPERIMENT_KIND, TAG_KIND,
                                    TAG_NOTE, TAG_RUNS_VIEW, TAG_STAGE, TAG_STOPPED_AT_RUNG, TAG_SWEEP)
from orchestrator.infra.errors import first_line
from orchestrator.runtime.rung_record import RungRecords
from orchestrator.runtime.store import (CorruptArtifact, StoreUnavailable, all_runs, local_artifact_root, record_of,
                                        redacted, store_client, store_exists)


def existing_trials(uri: str, sweep: str) -> list[TrialRecord]:
    """The sweep's trial runs, or [] when there is no store or no such sweep yet (nothing is created)."""
    if not store_exists(uri):
        return []
    try:
        return SweepTracker(uri, sweep, create=False).trials()
    except (LookupError, StoreUnavailable):
        return []


class SweepTracker:
    """Driver-side view of one sweep's experiment."""

    def __init__(self, uri: str, sweep: str, create: bool = True, workdir: Optional[Path] = None):
        self.uri, self.sweep = uri, sweep
        self.client = store_client(uri, create)
        experiment = self.client.get_experiment_by_name(sweep)
        if experiment is None and not create:
            raise LookupError(f"no sweep {sweep!r} in {redacted(uri)}")
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                sweep, artifact_location=local_artifact_root(uri, workdir), tags={TAG_SWEEP: sweep})
        else:
            self.experiment_id = experiment.experiment_id
        self.rung_records = RungRecords(self.client, self.experiment_id)

    @property
    def artifact_location(self) -> str:
        """Where the experiment's runs keep their artifacts (a file:// folder, mlflow-artifacts:/, an object store)."""
        return self.client.get_experiment(self.experiment_id).artifact_location

    def show_trials(self, params: Iterable[str]) -> None:
        """Mark the experiment as model training (MLflow 3 then opens it on its runs, not its GenAI overview) and
        store the runs view `sweep ui` links to: trial metrics and these params as columns, best first."""
        self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
        self.client.set_experiment_tag(self.experiment_id, TAG_RUNS_VIEW, runs_view_state(params))

    def _search(self, filter_string: str) -> list:
        return all_runs(self.client, self.experiment_id, filter_string)

    def stage_run(self, stage: str, description: str = "") -> str:
        """The parent run of a stage, reused when the sweep is rerun."""
        found = self._search(f"tags.`{TAG_KIND}` = 'stage' and tags.`{TAG_STAGE}` = '{stage}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status=RunStatus.RUNNING.value)
            return run_id
        tags = {TAG_SWEEP: self.sweep, TAG_KIND: "stage", TAG_STAGE: stage}
        if description:
            tags[TAG_NOTE] = description
        return self.client.create_run(self.experiment_id, tags=tags, run_name=f"stage {stage}").info.run_id

    def finish_stage(self, run_id: str, status: RunStatus = RunStatus.FINISHED) -> None:
        self.client.set_terminated(run_id, RunStatus(status).value)

    def trials(self, stage: Optional[str] = None) -> list[TrialRecord]:
        query = f"tags.`{TAG_KIND}` = 'trial'"
        if stage is not None:
            query += f" and tags.`{TAG_STAGE}` = '{stage}'"
        return [record_of(r) for r in self._search(query)]

    def close_stale(self, keys: Iterable[str], records: Optional[list[TrialRecord]] = None) -> int:
        """Mark RUNNING runs of these (unfinished) keys KILLED: their process is gone, a rerun replaces them.
        `records`: the sweep's trials if the caller has just read them (saves a search)."""
        wanted = set(keys)
        stale = [r for r in (records if records is not None else self.trials())
                 if r.status == RunStatus.RUNNING and r.trial_key in wanted]
        for r in stale:
            self.client.set_terminated(r.run_id, RunStatus.KILLED.value)
        return len(stale)

    def log_report(self, text: str, artifact_file: str) -> str:
        """Attach the robustness report to the sweep's own run (run_kind sweep, created once), whose
        description points to it; returns that run's id."""
        found = self._search(f"tags.`{TAG_KIND}` = 'sweep'")
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"sweep {self.sweep}",
                                            tags={TAG_SWEEP: self.sweep, TAG_KIND: "sweep"}).info.run_id
        self.client.log_text(run_id, text, artifact_file)
        reports = sorted(a.path for a in self.client.list_artifacts(run_id) if a.path.startswith("report."))
        self.client.set_tag(run_id, TAG_NOTE, f"Sweep **{self.sweep}**: the robustness report is this run's "
                            f"artifact {' and '.join(f'`{r}`' for r in reports)} (Artifacts tab). Trials are the "
                            "child runs of the `stage ...` runs.")
        self.client.set_terminated(run_id, RunStatus.FINISHED.value)
        return run_id

    def load_samples(self, run_id: str, artifact_file: str = SAMPLES_ARTIFACT, artifact_uri: Optional[str] = None
                     ) -> list[dict]:
        """A trial's per-sample records, read back from its table artifact; a damaged artifact (truncated,
        edited) raises CorruptArtifact naming the run. `artifact_uri` (the run's, from its record): when it is a
        folder this process sees, the file is read in place, without a copy or a read of the run (a report of
        10,000 runs reads 10,000 tables)."""
        where = urlparse(artifact_uri or "")
        local = Path(where.path) / artifact_file if where.scheme == "file" else None
        if local is not None and local.is_file():
            return self._table(run_id, artifact_file, local)
        with tempfile.TemporaryDirectory() as tmp:
            return self._table(run_id, artifact_file, Path(self.client.download_artifacts(run_id, artifact_file, tmp)))

    def _table(self, run_id: str, artifact_file: str, path: Path) -> list[dict]:
        try:
            table = json.loads(path.read_text())
            return [dict(zip(table["columns"], row)) for row in table["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            name = self.client.get_run(run_id).info.run_name
            raise CorruptArtifact(f"run {run_id} ({name!r}): its artifact {artifact_file} is damaged "
                                  f"({type(exc).__name__}: {first_line(exc)}); delete that run and rerun the "
                                  "sweep to run it again") from None


def runs_view_state(params: Iterable[str]) -> str:
    """The MLflow UI's shared view state (JSON): which columns the runs table shows and its order."""
    column = lambda kind, name: f"{kind}.`{name}`"  # noqa: E731 - the UI's column ids
    columns = ([column("metrics", m) for m in TRIAL_METRICS] + [column("tags", TAG_STOPPED_AT_RUNG)]
               + [column("params", p) for p in ("method", *params)])
    return json.dumps({"selectedColumns": columns, "orderByKey": column("metrics", SELECTION_METRIC),
                       "orderByAsc": False, "runsHiddenMode": "SHOW_ALL"})


def runs_view_url(ui_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the stored view. workflowType: the UI's GenAI / Model training switch, which
    otherwise stays wherever it was last left (GenAI on a new browser) whatever the experiment's kind tag says."""
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}")


def sweep_experiments(uri: str) -> list[tuple[str, str]]:
    """(name, id) of the store's sweeps, most recently created first; nothing is created."""
    from mlflow.entities import ViewType

    experiments = store_client(uri, create=False).search_experiments(
        view_type=ViewType.ACTIVE_ONLY, filter_string=f"tags.`{TAG_SWEEP}` != ''", order_by=["creation_time DESC"])
    return [(e.name, e.experiment_id) for e in experiments]
