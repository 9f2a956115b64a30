"""The MLflow client: the only module that talks to MLflow (the server a parallel sweep needs is started and
supervised by orchestrator.tracking_server).

Layout of a sweep in MLflow: one experiment per sweep; one parent run per stage (tag posweep.run_kind =
stage); one child run per trial (posweep.run_kind = trial, mlflow.parentRunId = its stage run) holding every
hyperparameter as a param, the evaluation metrics, per-step training curves, and the per-sample table
(artifact samples.json). Resume reads the trial runs back by their posweep.trial_key tag.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from orchestrator.contract.errors import caused_by, first_line
from orchestrator.contract.files import exclusive_lock, folder_problem
from orchestrator.contract.runs import SELECTION_METRIC, TRIAL_METRICS, RunStatus

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
TAG_SAMPLES_SHA = "posweep.samples_sha256"  # content hash of samples.json, checked by the trials that read it
TAG_REF_CACHE_SHA = "posweep.ref_cache_sha256"  # of the reference-log-prob cache file the trial read or wrote
TAG_FAILURE = "posweep.failure"
TAG_REF_CACHE = "posweep.ref_cache"  # hit | miss: whether the trial computed its reference log-probs
TAG_STAGE_KEY = "posweep.stage_key"
TAG_RESUMED = "posweep.resumed_from_step"
TAG_DEVICE = "posweep.device"        # e.g. "cpu" or "cuda:NVIDIA H100 80GB HBM3"
TAG_LAYOUT = "posweep.layout"        # how training rows were laid out and log-probs computed (trainers.logprobs)
# What the final evaluation had to cut: "prompts 3, reward_prompts 1, reward_responses 0" (trainers.evaluate)
TAG_EVAL_CUTS = "posweep.eval_cuts"
TAG_STOPPED_AT_STEP = "posweep.stopped_at_step"  # early stopping ended the trial after this optimizer step
TAG_STOPPED_AT_RUNG = "posweep.stopped_at_rung"
TAG_STOP_REASON = "posweep.stop_reason"  # the ASHA decision: its value, the cutoff, how many trials it was among
TAG_RUNG_SIGNATURE = "posweep.rung_signature"  # where its rungs fall and what they measure (early_stopping)
TAG_STOPPED_UNDER = "posweep.stopped_under"  # the early-stopping rule a STOPPED run was stopped under
TAG_WEIGHTS = "posweep.weights"      # "uploading", then "logged" once model/ is whole; "deleted: why" after
WEIGHTS_HELD = ("uploading", "logged")  # states in which a run's artifacts may hold weights
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
WEIGHTS_ARTIFACT = "model"           # a kept model: a Hugging Face folder under the run's artifacts
# MLflow 3 opens an experiment on its GenAI overview unless told it holds model training
TAG_EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The runs table as the UI's "share view" stores it (an experiment tag): the trial metrics and hyperparameters as
# columns, best mean_score first. `sweep ui` prints the URL that opens it.
RUNS_VIEW_KEY = "posweep"
TAG_RUNS_VIEW = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"


# Tracking stores a sweep can use: a local SQLite file, an MLflow server, or a database MLflow's SQL store takes
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQLITE_HEADER = b"SQLite format 3\x00"


class BadTrackingUri(ValueError):
    """A tracking URI that can never name a usable store (a file-store path, an unknown scheme, a SQLite URI naming
    a folder or a file that is not a database). Its message is the one line a command prints; exit code 2."""


def _suggested_store(path: Path) -> str:
    return f"sqlite:///{(path if path.suffix == '.db' else path / 'mlflow.db').expanduser().resolve()}"


def tracking_uri_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot name a tracking store, or None. Reads at most the first bytes of a local file; creates
    nothing."""
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2://...
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a path (or a drive letter)
        path = Path(uri.removeprefix("file://") if scheme == "file" else uri)
        return (f"tracking URI {uri!r} is a folder path: MLflow's file store, which MLflow 3 no longer opens; use a "
                f"SQLite store such as {_suggested_store(path)}")
    if scheme not in (*SERVER_SCHEMES, *DATABASE_SCHEMES):
        return (f"unknown tracking URI scheme {scheme!r} in {uri!r}; use sqlite:///PATH/mlflow.db, an MLflow server "
                "http(s)://HOST:PORT, or a database such as postgresql://USER@HOST/DB")
    if scheme != "sqlite":
        return None
    if not uri.startswith("sqlite:///"):
        return f"a SQLite tracking URI is sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db; got {uri!r}"
    path = sqlite_path(uri)
    if path.is_dir():
        return f"tracking URI {uri!r} names a folder, not a database file; use {_suggested_store(path)}"
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            return f"{path} is not a SQLite database (tracking URI {uri!r}); pass the URI of the sweep's store"
        return None
    above = next(parent for parent in path.parents if parent.exists())
    if not above.is_dir():
        return f"tracking URI {uri!r}: {above} is a file, so {path} cannot be created below it"
    return None


def resolve_tracking_uri(cli_uri: Optional[str] = None, spec_uri: Optional[str] = None) -> str:
    """--tracking-uri, then the spec's tracking.uri, then MLFLOW_TRACKING_URI, then ./mlflow.db; BadTrackingUri when
    that can never name a store."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    problem = tracking_uri_problem(uri)
    if problem:
        raise BadTrackingUri(problem)
    return uri


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says the tracking server could not be reached: MLflow wraps
    the requests error (connection refused/reset, timeout after its retries) in an MlflowException."""
    import requests

    return caused_by(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) is not None


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value[:5000])


def sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).expanduser().resolve()


def _quiet_mlflow() -> None:
    # Over HTTP, MLflow prints "View run ... at: URL" on every run end: one line per trial in the driver's output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class StoreUnavailable(RuntimeError):
    """The tracking store cannot be used as asked: a server that does not answer, a read-only store to write,
    no store where one is read. Its message is the one line a command prints."""


def _store_lock(uri: str, exclusive: bool):
    """An flock beside a local SQLite store (db.lock). MLflow creates and migrates a store's tables on first
    use, and two processes doing it at once fail ("table experiments already exists"): the first user of a
    store holds the lock exclusively while MLflow sets it up; readers take it shared, so they wait for that."""
    path = sqlite_path(uri)
    lock = path.with_name(path.name + ".lock")
    if not exclusive and not os.access(lock if lock.exists() else path.parent, os.W_OK):
        return contextlib.nullcontext()  # a store this user cannot write: nobody here is creating it
    return exclusive_lock(lock, shared=not exclusive)


def absolute_uri(uri: str) -> str:
    """A local SQLite URI with its path made absolute (sqlite:///mlflow.db names ./mlflow.db of the *current*
    folder): the same text names another store after a chdir, so clients are cached by the absolute form."""
    return f"sqlite:///{sqlite_path(uri)}" if urlparse(uri).scheme == "sqlite" else uri


def _client(uri: str, create: bool = True):
    """One client per store and process (building one costs ~0.25 s, and trials of a process share it), its
    store set up before it is returned. Without `create`, a local store must already exist (readers create
    nothing)."""
    return _cached_client(absolute_uri(uri), create)


@functools.lru_cache(maxsize=4)
def _cached_client(uri: str, create: bool):
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    if urlparse(uri).scheme != "sqlite":
        return MlflowClient(tracking_uri=uri)
    if not create and not sqlite_path(uri).is_file():
        raise StoreUnavailable(f"no tracking store at {uri}")
    with _store_lock(uri, exclusive=create):  # MLflow creates or migrates the tables when it builds the client
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


def prepare_store(uri: str) -> None:
    """Create (or migrate) a local store now, under its lock, before servers or workers use it at once."""
    _client(uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """StoreUnavailable within `timeout` when `uri` is a server that does not answer: MLflow's own client
    retries for minutes before it gives up (right for a sweep that loses its server for a moment; wrong
    for a first request that never had one)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except OSError as exc:
        raise StoreUnavailable(f"the tracking server at {uri} does not answer ({first_line(exc)}); start it, "
                               "or pass another --tracking-uri") from None


def check_writable(uri: str) -> None:
    """StoreUnavailable when a local store exists but this process may not write it (the database file, its
    folder for SQLite's journal, or the artifact folder beside it): before anything is run or rendered."""
    if urlparse(uri).scheme != "sqlite" or not sqlite_path(uri).is_file():
        return
    db = sqlite_path(uri)
    artifacts = db.parent / "mlartifacts"
    for path in (db, db.parent, *([artifacts] if artifacts.exists() else [])):
        if not os.access(path, os.W_OK):
            raise StoreUnavailable(f"the tracking store {uri} is read-only for this user ({path} is not writable); "
                                   "fix its permissions or pass another --tracking-uri")


def _local_artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a local SQLite store go beside the database file, not wherever the CWD happens to be."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    return (sqlite_path(uri).parent / "mlartifacts").as_uri()


class CorruptArtifact(ValueError):
    """An artifact a trial logged no longer reads as what it was (truncated, edited); the message names the run."""


class TrialRecord(BaseModel):
    """A trial run as read back from MLflow (plain data for the orchestrator and analysis)."""
    model_config = ConfigDict(use_enum_values=True)  # status kept as its plain string, == RunStatus members
    run_id: str
    run_name: str
    trial_key: str
    stage: str
    method: str
    status: RunStatus
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: Optional[int] = None   # ms since the epoch
    end_time: Optional[int] = None


def run_status(mlflow_status: str, tags: dict[str, str]) -> RunStatus:
    """posweep's state of a run: MLflow's status, except that a FINISHED run early stopping ended (tag
    posweep.stopped_at_step) is STOPPED."""
    if mlflow_status == RunStatus.FINISHED and TAG_STOPPED_AT_STEP in tags:
        return RunStatus.STOPPED
    return RunStatus(mlflow_status)


def _record(run) -> TrialRecord:
    tags = run.data.tags
    return TrialRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", trial_key=tags.get(TAG_KEY, ""),
                       stage=tags.get(TAG_STAGE, ""), method=tags.get(TAG_METHOD, ""),
                       status=run_status(run.info.status, tags),
                       params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(tags),
                       start_time=run.info.start_time, end_time=run.info.end_time)


def _all_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment that matches, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def store_exists(uri: str) -> bool:
    """Whether reading `uri` would find a store (a SQLite file that is there, or any server); reading never
    creates one."""
    return urlparse(uri).scheme != "sqlite" or sqlite_path(uri).is_file()


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

    def __init__(self, uri: str, sweep: str, create: bool = True):
        self.uri, self.sweep = uri, sweep
        self.client = _client(uri, create)
        experiment = self.client.get_experiment_by_name(sweep)
        if experiment is None and not create:
            raise LookupError(f"no sweep {sweep!r} in {uri}")
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                sweep, artifact_location=_local_artifact_root(uri), tags={TAG_SWEEP: sweep})
        else:
            self.experiment_id = experiment.experiment_id

    def show_trials(self, params: Iterable[str]) -> None:
        """Mark the experiment as model training (MLflow 3 then opens it on its runs, not its GenAI overview) and
        store the runs view `sweep ui` links to: trial metrics and these params as columns, best first."""
        self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
        self.client.set_experiment_tag(self.experiment_id, TAG_RUNS_VIEW, runs_view_state(params))

    def _search(self, filter_string: str) -> list:
        return _all_runs(self.client, self.experiment_id, filter_string)

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
        return [_record(r) for r in self._search(query)]

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

    def load_samples(self, run_id: str, artifact_file: str = SAMPLES_ARTIFACT) -> list[dict]:
        """A trial's per-sample records, read back from its table artifact; a damaged artifact (truncated,
        edited) raises CorruptArtifact naming the run."""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, artifact_file, tmp)
            try:
                table = json.loads(Path(path).read_text())
                return [dict(zip(table["columns"], row)) for row in table["data"]]
            except (ValueError, KeyError, TypeError) as exc:
                name = self.client.get_run(run_id).info.run_name
                raise CorruptArtifact(f"run {run_id} ({name!r}): its artifact {artifact_file} is damaged "
                                      f"({type(exc).__name__}: {first_line(exc)}); delete that run and rerun the "
                                      "sweep to run it again") from None


def runs_view_state(params: Iterable[str]) -> str:
    """The MLflow UI's shared view state (JSON): which columns the runs table shows and its order."""
    column = lambda kind, name: f"{kind}.`{name}`"  # noqa: E731 - the UI's column ids
    columns = [column("metrics", m) for m in TRIAL_METRICS] + [column("params", p) for p in ("method", *params)]
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

    experiments = _client(uri, create=False).search_experiments(
        view_type=ViewType.ACTIVE_ONLY, filter_string=f"tags.`{TAG_SWEEP}` != ''", order_by=["creation_time DESC"])
    return [(e.name, e.experiment_id) for e in experiments]


class KeptModels:
    """The weights a sweep keeps (run artifacts model/, tagged posweep.weights) and their entries in the Model
    Registry: one registered model per sweep and method, its `best` alias on the kept best trial."""

    def __init__(self, tracker: "SweepTracker"):
        self.tracker, self.client = tracker, tracker.client

    def with_weights(self, method: str) -> list[TrialRecord]:
        """The method's trial runs whose artifacts hold weights, whole or (an upload that died) in part."""
        runs = self.tracker._search(f"tags.`{TAG_KIND}` = 'trial' and tags.`{TAG_METHOD}` = '{method}'")
        return [_record(r) for r in runs if r.data.tags.get(TAG_WEIGHTS) in WEIGHTS_HELD]

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
        self.client.log_batch(record.run_id, tags=[_tag(TAG_FAILURE, reason), _tag(TAG_WEIGHTS, f"lost: {problem}")])
        self.client.set_terminated(record.run_id, RunStatus.FAILED.value)


class SystemMetrics:
    """MLflow's system metrics (the run page's System metrics tab: system/cpu_utilization_percentage,
    system/system_memory_usage_megabytes, disk, network, and GPU where pynvml is installed) for a run this client
    created: MLflow's own monitor follows fluent runs (mlflow.start_run) and drops what it sampled when a run ends
    within its interval. This one samples every `interval` seconds in a thread, with MLflow's monitors, and logs
    a last sample when the block ends, so even a 2-second trial has one."""

    def __init__(self, logger: "TrialLogger", interval: float):
        self.logger, self.interval = logger, interval
        self.monitors = _system_monitors()
        self.step, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, name="posweep-system-metrics", daemon=True)

    def _sample_and_log(self) -> None:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self.logger.log_metrics({f"system/{k}": v for k, v in metrics.items()}, step=self.step)
        self.step += 1

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self._sample_and_log()
            except Exception:  # noqa: BLE001 - a lost sample must not touch the trial; the last one is retried
                continue

    def __enter__(self) -> "SystemMetrics":
        for monitor in self.monitors:  # psutil's first CPU reading is 0.0: prime it, then discard
            monitor.collect_metrics()
            monitor.clear_metrics()
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):  # the trial's own outcome is what matters now
            self._sample_and_log()


def _system_monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    with contextlib.suppress(Exception):  # no NVIDIA GPU, or no pynvml: CPU, memory, disk and network only
        monitors.append(GPUMonitor())
    return monitors


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

    def log_weights(self, folder: Path) -> None:
        """A trained model folder as the run's model/ artifacts, tagged "logged" once the copy is whole (and
        "uploading" before, so a process killed mid-copy leaves a run whose partial weights are found and deleted)."""
        self.set_tags({TAG_WEIGHTS: "uploading"})
        self.client.log_artifacts(self.run_id, str(folder), WEIGHTS_ARTIFACT)
        self.set_tags({TAG_WEIGHTS: "logged"})

    def finish(self, status: RunStatus) -> None:
        self.client.set_terminated(self.run_id, RunStatus(status).value)

    def runs_of(self, trial_key: str) -> list[TrialRecord]:
        """Every run of one trial key in this experiment, newest first."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KEY}` = '{trial_key}'",
                                       max_results=1000)
        return [_record(r) for r in runs]

    def rung_values(self, stage_key: str, metric: str, exclude_key: str, signature: str) -> list[float]:
        """The value of `metric` (asha/rung_K) of every other trial key of the stage that logged it under the same
        rung signature, one per key (a key run again after its process died logs the same value again)."""
        values: dict[str, float] = {}
        query = f"tags.`{TAG_STAGE_KEY}` = '{stage_key}' and tags.`{TAG_RUNG_SIGNATURE}` = '{signature}'"
        for run in _all_runs(self.client, self.experiment_id, query):
            key = run.data.tags.get(TAG_KEY)
            if key != exclude_key and metric in run.data.metrics:
                values.setdefault(key, run.data.metrics[metric])
        return list(values.values())

    def reopen(self, run_id: str) -> None:
        """Continue logging into an earlier attempt's run (a trial resumed from its checkpoint)."""
        self.run_id = run_id
        self.client.update_run(run_id, status=RunStatus.RUNNING.value)

    def close(self, run_id: str, status: RunStatus) -> None:
        self.client.set_terminated(run_id, RunStatus(status).value)
