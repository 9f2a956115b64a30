"""The MLflow server a parallel sweep logs through, started by `sweep run` and supervised while it runs.

One server process owns a local SQLite store, so trials in other processes (Ray workers, Slurm jobs) never
write the file concurrently; a server that dies is started again on the same port. It also serves the store's
artifacts (MLflow's proxied artifact access), so a trial on a node without the driver's disk uploads and
downloads them over HTTP (orchestrator.runtime.store.artifact_repository). Listening beyond loopback it runs
MLflow's basic-auth app: only holders of the store's credential (ServerLogin) read or write. The client side of
MLflow is orchestrator.runtime (the MLflow adapter).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

from orchestrator.infra.files import write_file_atomically
from orchestrator.infra.net import free_port, is_loopback
from orchestrator.infra.process import die_with_parent
from orchestrator.runtime.store import artifact_root, is_database_server, redacted, store_home


class TrackingServerError(RuntimeError):
    """The MLflow server for a parallel sweep did not come up."""


def mlflow_command() -> tuple[str, dict[str, str]]:
    """The `mlflow` executable of this environment and the environment to run its servers with: MLflow's job
    runner (GenAI evaluation jobs, 3 more processes) has nothing to do for a sweep or for browsing one."""
    executable = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return executable, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, log: Optional[Path] = None) -> None:
    """Until `url`/health answers; TrackingServerError if the process exits first (with its log's tail) or the
    timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log else ""
            raise TrackingServerError(f"the MLflow server exited ({process.returncode})"
                                      + (f"; {log}:\n{tail}" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TrackingServerError(f"the MLflow server at {url} was not healthy after {timeout:.0f} s"
                              + (f"; see {log}" if log else ""))


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
                                    preexec_fn=die_with_parent, env=self.env)

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
            stop_server(self.process)  # its uvicorn workers may outlive it and hold the port
            self.restarts_left -= 1
            self.restarted += 1
            self.process = self._spawn()
            try:
                wait_healthy(self.url, self.process, 180.0, self.log)
                print(f"tracking: the MLflow server at {self.url} stopped (exit {code}); restarted it "
                      f"({self.restarted} restart(s) so far)", file=sys.stderr)
            except TrackingServerError as exc:
                print(f"tracking: restarting the MLflow server failed: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self._stopping.set()
        if self._watch.is_alive():
            self._watch.join(10)
        stop_server(self.process)


# MLflow's client sends these as HTTP basic auth on every request (and Ray forwards them to workers on other nodes)
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
AUTH_FOLDER = "mlflow-auth"  # in the store's home (store_home): credentials.ini (mode 0600) and users.db
ADMIN_USER = "posweep-admin"


@dataclass(frozen=True)
class ServerLogin:
    """The store's admin credential for MLflow's basic-auth app. `config` is the app's ini file (it holds the
    password, so it is 0600, and so is its folder); the password itself is never printed, logged or tagged."""
    config: Path
    username: str
    password: str

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def how_to_log_in(self) -> str:
        return f"log in as {self.username!r}; the password is admin_password in {self.config} (readable by you only)"


def store_login(home: Path) -> ServerLogin:
    """The store's credential, created on first use: a random password in AUTH_FOLDER/credentials.ini (0600) and
    the auth app's user database beside it. The app creates its admin user from the ini once; later starts
    (reruns, `sweep ui`) read the same file, so the password the users table holds never changes."""
    folder = Path(home) / AUTH_FOLDER
    config = folder / "credentials.ini"
    if not config.is_file():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        parser = configparser.ConfigParser()
        parser["mlflow"] = {
            "default_permission": "NO_PERMISSIONS", "database_uri": f"sqlite:///{folder / 'users.db'}",
            "admin_username": ADMIN_USER, "admin_password": secrets.token_urlsafe(24),
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
            # the app checks the password (PBKDF2, ~0.1 s) on every request unless it caches a good one
            "auth_cache_ttl_seconds": "600"}

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                parser.write(f)
        write_file_atomically(config, write, mode=0o600)
    parser = configparser.ConfigParser()
    parser.read(config)
    return ServerLogin(config, parser["mlflow"]["admin_username"], parser["mlflow"]["admin_password"])


# The server's database connections: one for each of its request threads (anyio's default pool, 40). With MLflow's
# default (5 + 10 overflow) a request waited 30 s for one and failed with a 400 that clients do not retry: 16 of the
# first 86 trials of a 1,000-trial simulation at 32 at once (benchmarks/bench_scale.py) ended FAILED so.
SERVER_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "10", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "40"}


def server_command(store_uri: str, home: Path, host: str, port: int, login: Optional[ServerLogin]
                   ) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` for a local store (a SQLite file, or a database server such as PostgreSQL): its artifacts
    served from the store's home (mlartifacts/, where runs' file:// artifact URIs point, so the store reads the same
    without a server), behind the basic-auth app when `login` is given."""
    mlflow, env = mlflow_command()
    env = {**env, **SERVER_POOL}
    root = artifact_root(home)
    command = [mlflow, "server", "--backend-store-uri", store_uri, "--default-artifact-root", root,
               "--serve-artifacts", "--artifacts-destination", root, "--host", host, "--port", str(port),
               "--workers", "1"]
    return with_login(command, env, login)


def with_login(command: list[str], env: dict[str, str], login: Optional[ServerLogin]
               ) -> tuple[list[str], dict[str, str]]:
    """An `mlflow server`/`mlflow ui` command behind MLflow's basic-auth app with the store's login (as is without)."""
    if login is None:
        return command, env
    return [*command, "--app-name", "basic-auth"], {**env, "MLFLOW_AUTH_CONFIG_PATH": str(login.config),
                                                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


@contextlib.contextmanager
def mlflow_server(store_uri: str, host: str = "127.0.0.1", timeout: float = 180.0,
                  meanwhile: Optional[Callable[[], None]] = None, restarts: int = 3,
                  workdir: Optional[Path] = None) -> Iterator[str]:
    """Serve a local tracking store (a SQLite file, or a database server such as PostgreSQL, whose home is then
    WORKDIR/mlflow-store: store.store_home) over HTTP for the duration of the block; yields the server's URI.

    One server process owns a SQLite file, so parallel trials never write it concurrently (and trials never need
    a database's login). Artifacts keep the store's local layout (mlartifacts/ in its home): workers that share
    the driver's disk write them directly, others through the server. Beyond loopback the server asks for the
    store's credential, which this process's clients (and the trials it starts) get through
    MLFLOW_TRACKING_USERNAME/PASSWORD for the block. A server that dies is started again (`restarts` times). Its
    log goes to the sweep's `workdir` (nothing is left in the working tree), else to the store's home."""
    home = store_home(store_uri, workdir)
    if home is None:
        raise ValueError(f"no local folder for the store {redacted(store_uri)}'s artifacts: pass the sweep's workdir")
    home.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    url = f"http://{host}:{port}"
    log = Path(workdir or home) / "mlflow-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    login = None if is_loopback(host) else store_login(home)
    command, env = server_command(store_uri, home, host, port, login)
    server = _SupervisedServer(command, env, url, log, restarts)
    try:
        with _credentials_in_environment(login):
            if meanwhile:  # e.g. start Ray: the server takes ~10 s to come up, let that overlap
                meanwhile()
            wait_healthy(url, server.process, timeout, log)
            server.start_watching()
            yield url
    finally:
        server.stop()


@contextlib.contextmanager
def _credentials_in_environment(login: Optional[ServerLogin]):
    """MLflow's client reads its credential from the environment on every request; the block's clients (and the
    processes it starts) use the store's login, and the environment is as it was afterwards."""
    if login is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in login.env}
    os.environ.update(login.env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def credential_env() -> dict[str, str]:
    """The tracking credential of this process (the sweep's server login, or the user's own for their server),
    for workers that do not inherit the driver's environment (Ray workers on other nodes)."""
    return {k: os.environ[k] for k in CREDENTIAL_VARIABLES if os.environ.get(k)}


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it runs workers), SIGKILL what is left after 15 s. Returns once no
    process of the group is left: the leader can exit while a worker still holds the port, and a server started
    on it next (a rerun, a test) would find it taken."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if _group_ended(process, wait):
            return


def _group_ended(process: subprocess.Popen, timeout: float) -> bool:
    """Whether every process of `process`'s group has exited within `timeout` seconds (the leader reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        process.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@contextlib.contextmanager
def store_for_workers(uri: str, parallel: bool, host: str = "127.0.0.1",
                      meanwhile: Optional[Callable[[], None]] = None, restarts: int = 3,
                      workdir: Optional[Path] = None) -> Iterator[str]:
    """The tracking URI that the driver and every worker use: a local store (a SQLite file, a PostgreSQL
    database) is put behind an MLflow server when trials run in parallel; anything else (a server URI, a
    sequential sweep) is used as is. `meanwhile` runs once either way (while the server starts, if one does);
    `workdir`: the sweep's (the server's log; a database store's artifacts and login, store.store_home)."""
    if parallel and (urlparse(uri).scheme == "sqlite" or is_database_server(uri)):
        with mlflow_server(uri, host, meanwhile=meanwhile, restarts=restarts, workdir=workdir) as url:
            yield url
    else:
        if meanwhile:
            meanwhile()
        yield uri
