"""The tracking store: which URIs name one (refused in one line otherwise), its clients (one per store and
process, created and migrated under a lock), reachability and permission checks. With sweep_runs, trial_log and
kept_models it is the MLflow adapter: the only code that talks to MLflow (orchestrator.runtime.server starts and
supervises the server a parallel sweep needs).

Layout of a sweep in MLflow: one experiment per sweep; one parent run per stage (tag posweep.run_kind =
stage); one child run per trial (posweep.run_kind = trial, mlflow.parentRunId = its stage run) holding every
hyperparameter as a param, the evaluation metrics, per-step training curves, and the per-sample table
(artifact samples.json). Resume reads the trial runs back by their posweep.trial_key tag.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from orchestrator.core.runs import TrialRecord, run_status
from orchestrator.core.tags import TAG_KEY, TAG_METHOD, TAG_STAGE
from orchestrator.infra.errors import caused_by, first_line
from orchestrator.infra.files import exclusive_lock

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Tracking stores a sweep can use: a local SQLite file, an MLflow server, or a database MLflow's SQL store takes
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQLITE_HEADER = b"SQLite format 3\x00"


class BadTrackingUri(ValueError):
    """A tracking URI that can never name a usable store (a file-store path, an unknown scheme, a SQLite URI naming
    a folder or a file that is not a database). Its message is the one line a command prints; exit code 2."""


def store_scheme(uri: str) -> str:
    """The URI's scheme without its driver: postgresql+psycopg2://... is postgresql."""
    return urlparse(uri).scheme.split("+")[0]


def _suggested_store(path: Path) -> str:
    return f"sqlite:///{(path if path.suffix == '.db' else path / 'mlflow.db').expanduser().resolve()}"


def tracking_uri_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot name a tracking store, or None. Reads at most the first bytes of a local file; creates
    nothing."""
    scheme = store_scheme(uri)
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


def run_tag(key: str, value: str):
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


def store_client(uri: str, create: bool = True):
    """One client per store and process (building one costs ~0.25 s, and trials of a process share it), its
    store set up before it is returned. Without `create`, a local store must already exist (readers create
    nothing)."""
    return _cached_client(absolute_uri(uri), create)


@functools.lru_cache(maxsize=4)
def _cached_client(uri: str, create: bool):
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    scheme = store_scheme(uri)
    if scheme in SERVER_SCHEMES:
        return MlflowClient(tracking_uri=uri)
    if scheme != "sqlite":  # a database server (PostgreSQL, ...): MLflow creates or migrates its tables now
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - a driver error, a refused connection, a bad login: one line
            raise StoreUnavailable(f"the tracking database {redacted(uri)} cannot be used: "
                                   f"{type(exc).__name__}: {first_line(exc)}") from None
        return client
    if not create and not sqlite_path(uri).is_file():
        raise StoreUnavailable(f"no tracking store at {uri}")
    with _store_lock(uri, exclusive=create):  # MLflow creates or migrates the tables when it builds the client
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


def redacted(uri: str) -> str:
    """`uri` with the password of its login, if any, replaced by ***: for messages and logs."""
    parsed = urlparse(uri)
    if not parsed.password:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


def is_database_server(uri: str) -> bool:
    """A store in a database server MLflow's SQL store opens (PostgreSQL, MySQL, SQL Server): not a file, not
    an MLflow server."""
    scheme = store_scheme(uri)
    return scheme in DATABASE_SCHEMES and scheme != "sqlite"


def prepare_store(uri: str) -> None:
    """Create (or migrate) a local store now, under its lock, before servers or workers use it at once."""
    store_client(uri)


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


def store_home(uri: str, workdir: Optional[Path] = None) -> Optional[Path]:
    """The folder that holds what a store keeps beside its database (mlartifacts/, mlflow-auth/): a SQLite store's
    own folder; for a database server, WORKDIR/mlflow-store of the sweep that uses it (None without a workdir);
    None for an MLflow server (it keeps its own)."""
    if urlparse(uri).scheme == "sqlite":
        return sqlite_path(uri).parent
    if is_database_server(uri) and workdir is not None:
        return Path(workdir).expanduser().resolve() / "mlflow-store"
    return None


def local_artifact_root(uri: str, workdir: Optional[Path] = None) -> Optional[str]:
    """Artifacts of a local store go in its home (store_home: beside a SQLite database, in the sweep's workdir for
    a database server), not wherever the CWD happens to be (MLflow's default, ./mlruns)."""
    home = store_home(uri, workdir)
    return None if home is None else artifact_root(home)


def artifact_root(home: Path) -> str:
    """The artifact root of a store whose home is `home` (store_home): what runs' file:// URIs and the server's
    --artifacts-destination name."""
    return (home / "mlartifacts").as_uri()


def artifact_repository(client, run_id: str, served_root: Optional[str] = None):
    """Where a run's artifacts are read and written from this process. With `served_root` (the file:// root that
    the sweep's own server serves, orchestrator.runtime.server) a run under it goes through the server's proxy,
    over HTTP: this process need not see the driver's disk. Otherwise the run's artifact URI as MLflow resolves it
    (a local folder, mlflow-artifacts:/ through a user's server, an object store)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = client.get_run(run_id).info.artifact_uri
    prefix = (served_root or "").rstrip("/") + "/"
    if served_root and uri.startswith(prefix):
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        return HttpArtifactRepository(f"{client.tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/"
                                      f"{uri[len(prefix):]}")
    return get_artifact_repository(uri, tracking_uri=client.tracking_uri)


def unreachable_artifacts(location: str) -> bool:
    """Whether artifacts at `location` (an experiment's) are written to a path on the writer's own disk, which a
    trial on another node cannot share with the driver."""
    return urlparse(location).scheme in ("", "file")


class CorruptArtifact(ValueError):
    """An artifact a trial logged no longer reads as what it was (truncated, edited); the message names the run."""


def record_of(run) -> TrialRecord:
    tags = run.data.tags
    return TrialRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", trial_key=tags.get(TAG_KEY, ""),
                       stage=tags.get(TAG_STAGE, ""), method=tags.get(TAG_METHOD, ""),
                       status=run_status(run.info.status, tags),
                       params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(tags),
                       start_time=run.info.start_time, end_time=run.info.end_time,
                       artifact_uri=run.info.artifact_uri)


def all_runs(client, experiment_id: str, filter_string: str) -> list:
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


