"""The only module that talks to MLflow.

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

from pydantic import BaseModel

from orchestrator.errors import caused_by

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
TAG_STAGE_KEY = "posweep.stage_key"
TAG_RESUMED = "posweep.resumed_from_step"
TAG_DEVICE = "posweep.device"        # e.g. "cpu" or "cuda:NVIDIA H100 80GB HBM3"
TAG_LAYOUT = "posweep.layout"        # how training rows were laid out and log-probs computed (trainers.logprobs)
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"


def resolve_tracking_uri(cli_uri: Optional[str] = None, spec_uri: Optional[str] = None) -> str:
    """--tracking-uri, then the spec's tracking.uri, then MLFLOW_TRACKING_URI, then ./mlflow.db."""
    return cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingServerError(RuntimeError):
    """The MLflow server for a parallel sweep did not come up."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says the tracking server could not be reached: MLflow wraps
    the requests error (connection refused/reset, timeout after its retries) in an MlflowException."""
    import requests

    return caused_by(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) is not None


def _sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).expanduser().resolve()


def mlflow_command() -> tuple[str, dict[str, str]]:
    """The `mlflow` executable of this environment and the environment to run its servers with: MLflow's job
    runner (GenAI evaluation jobs, 3 more processes) has nothing to do for a sweep or for browsing one."""
    executable = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return executable, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise TrackingServerError(f"the MLflow server exited ({process.returncode}); {log}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TrackingServerError(f"the MLflow server at {url} was not healthy after {timeout:.0f} s; see {log}")


class _SupervisedServer:
    """An `mlflow server` process that is started again, on the same port, when it dies (killed, OOM) while a
    sweep runs: trials keep their URI, and MLflow's client retries each request with exponential backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7 retries over ~4 min) long enough to reach the new process.
    After `restarts` restarts it stays down; trials that cannot log then come back `unrecorded` and the sweep
    stops. Restarted processes are forked by the watcher thread, which lives until stop(): PR_SET_PDEATHSIG
    fires when the forking thread ends, so they die with the sweep as the first one does."""

    def __init__(self, command: list[str], env: dict[str, str], url: str, log: Path, restarts: int):
        self.command, self.env, self.url, self.log, self.restarts_left = command, env, url, log, restarts
        self.restarted = 0
        self._stopping = threading.Event()
        self.process = self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="mlflow-server-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen:
        with open(self.log, "ab") as out:
            return subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent, env=self.env)

    def start_watching(self) -> None:
        self._watch.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            code = self.process.poll()
            if code is None:
                continue
            if self.restarts_left <= 0:
                print(f"tracking: the MLflow server at {self.url} stopped (exit {code}) and is not restarted "
                      f"(tracking.server_restarts exhausted); trials that cannot log will fail", file=sys.stderr)
                return
            _stop(self.process)  # its uvicorn workers may outlive it and hold the port
            self.restarts_left -= 1
            self.restarted += 1
            self.process = self._spawn()
            try:
                _wait_healthy(self.url, self.process, self.log, 180.0)
                print(f"tracking: the MLflow server at {self.url} stopped (exit {code}); restarted it "
                      f"({self.restarted} restart(s) so far)", file=sys.stderr)
            except TrackingServerError as exc:
                print(f"tracking: restarting the MLflow server failed: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self._stopping.set()
        if self._watch.is_alive():
            self._watch.join(10)
        _stop(self.process)


@contextlib.contextmanager
def mlflow_server(sqlite_uri: str, host: str = "127.0.0.1", timeout: float = 180.0,
                  meanwhile: Optional[Callable[[], None]] = None, restarts: int = 3) -> Iterator[str]:
    """Serve a SQLite tracking store over HTTP for the duration of the block; yields the server's URI.

    One server process owns the SQLite file, so parallel trials never write it concurrently. Artifacts keep
    the store's local layout (mlartifacts/ beside the database; workers write them directly), so the store
    reads the same with or without the server. A server that dies is started again (`restarts` times)."""
    db = _sqlite_path(sqlite_uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    url = f"http://{host}:{port}"
    log = db.parent / "mlflow-server.log"
    mlflow, env = mlflow_command()
    command = [mlflow, "server", "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root",
               (db.parent / "mlartifacts").as_uri(), "--no-serve-artifacts", "--host", host, "--port", str(port),
               "--workers", "1"]
    server = _SupervisedServer(command, env, url, log, restarts)
    try:
        if meanwhile:  # e.g. start Ray: the server takes ~10 s to come up, let that overlap
            meanwhile()
        _wait_healthy(url, server.process, log, timeout)
        server.start_watching()
        yield url
    finally:
        server.stop()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the driver dies, even by SIGKILL, so a rerun never finds an orphan
    server still writing the SQLite file."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it runs workers), SIGKILL what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def store_for_workers(uri: str, parallel: bool, host: str = "127.0.0.1",
                      meanwhile: Optional[Callable[[], None]] = None, restarts: int = 3) -> Iterator[str]:
    """The tracking URI that the driver and every worker use: a local SQLite store is put behind an MLflow
    server when trials run in parallel; anything else (a server URI, a sequential sweep) is used as is.
    `meanwhile` runs once either way (while the server starts, if one does)."""
    if parallel and urlparse(uri).scheme == "sqlite":
        with mlflow_server(uri, host, meanwhile=meanwhile, restarts=restarts) as url:
            yield url
    else:
        if meanwhile:
            meanwhile()
        yield uri


def _quiet_mlflow() -> None:
    # Over HTTP, MLflow prints "View run ... at: URL" on every run end: one line per trial in the driver's output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file
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
    return (_sqlite_path(uri).parent / "mlartifacts").as_uri()


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
    start_time: Optional[int] = None   # ms since the epoch
    end_time: Optional[int] = None


def _record(run) -> TrialRecord:
    tags = run.data.tags
    return TrialRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", trial_key=tags.get(TAG_KEY, ""),
                       stage=tags.get(TAG_STAGE, ""), method=tags.get(TAG_METHOD, ""), status=run.info.status,
                       params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(tags),
                       start_time=run.info.start_time, end_time=run.info.end_time)


def store_exists(uri: str) -> bool:
    """Whether reading `uri` would find a store (a SQLite file that is there, or any server); reading never
    creates one."""
    return urlparse(uri).scheme != "sqlite" or _sqlite_path(uri).is_file()


def existing_trials(uri: str, sweep: str) -> list[TrialRecord]:
    """The sweep's trial runs, or [] when there is no store or no such sweep yet (nothing is created)."""
    if not store_exists(uri):
        return []
    try:
        return SweepTracker(uri, sweep, create=False).trials()
    except LookupError:
        return []


class SweepTracker:
    """Driver-side view of one sweep's experiment."""

    def __init__(self, uri: str, sweep: str, create: bool = True):
        self.uri, self.sweep = uri, sweep
        self.client = _client(uri)
        experiment = self.client.get_experiment_by_name(sweep)
        if experiment is None and not create:
            raise LookupError(f"no sweep {sweep!r} in {uri}")
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

    def close_stale(self, keys: Iterable[str], records: Optional[list[TrialRecord]] = None) -> int:
        """Mark RUNNING runs of these (unfinished) keys KILLED: their process is gone, a rerun replaces them.
        `records`: the sweep's trials if the caller has just read them (saves a search)."""
        wanted = set(keys)
        stale = [r for r in (records if records is not None else self.trials())
                 if r.status == "RUNNING" and r.trial_key in wanted]
        for r in stale:
            self.client.set_terminated(r.run_id, "KILLED")
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
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

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

    def runs_of(self, trial_key: str) -> list[TrialRecord]:
        """Every run of one trial key in this experiment, newest first."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KEY}` = '{trial_key}'",
                                       max_results=1000)
        return [_record(r) for r in runs]

    def reopen(self, run_id: str) -> None:
        """Continue logging into an earlier attempt's run (a trial resumed from its checkpoint)."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def close(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)
