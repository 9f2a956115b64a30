"""A sweep on a Ray cluster whose nodes share no disk with the driver (executor.shared_workdir: false).

The cluster is a head node (the test's own mount namespace) and a worker node whose processes run in their own mount
and PID namespaces (`unshare`), with an empty, private tmpfs over /tmp (which holds the driver's workdir, the tracking
store and the head's Ray files) and its own HOME: the only way between the two is the network (Ray and the MLflow
server the sweep starts, which listens beyond loopback and asks for the store's credential).
"""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.tags import TAG_INIT_FROM, TAG_KEY, TAG_NODE, TAG_REF_CACHE, TAG_STAGE
from orchestrator.runtime.server import AUTH_FOLDER
from orchestrator.runtime.sweep_runs import SweepTracker

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs unshare and root (mount namespaces)")

SWEEP = """
name: nodisk
workdir: {workdir}
model: {{kind: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, seed: 0}}
data: {{kind: synthetic, seed: 0, n_train: {n_train}, n_eval: 16, label_noise: 0.1}}
reward: {{kind: synthetic}}
training: {{batch_size: 16, max_length: 32, seed: 0, warmup_ratio: 0.1, log_every: 5}}
evaluation: {{temperature: 0.7, top_p: 0.95, max_new_tokens: 8, num_prompts: 16, seed: 0}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [2]}}}}
  methods:
    dpo: {{grid: {{beta: [0.05, 0.1], learning_rate: [1.0e-4], epochs: [1]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5, 1.0], learning_rate: [1.0e-4], epochs: [1]}}}}
executor: {{kind: ray, address: "{address}", resources_per_trial: {{cpu: 1}}, max_failures: 2{extra}}}
tracking: {{server_host: "0.0.0.0", system_metrics: false}}
checkpoints: {{keep: none}}
"""


def _ray() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


class Cluster:
    """A Ray head here and a worker node in its own namespaces; `kill_worker()` ends the whole worker node."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.port = 6900 + os.getpid() % 400
        self.address = f"127.0.0.1:{self.port}"
        self.head_dir = Path("/tmp") / f"rh{os.getpid()}"  # short: Ray's socket paths
        # Ray's token authentication: the head makes ~/.ray/auth_token; every node and driver must present it
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "HF_HUB_OFFLINE": "1",
                    "RAY_AUTH_MODE": "token",
                    # a dead node is noticed in ~3 s, not Ray's default ~30 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "1000"}
        self.worker: subprocess.Popen | None = None
        self.worker_log = tmp_path / "worker-node.log"

    def start(self) -> None:
        subprocess.run([_ray(), "start", "--head", f"--port={self.port}", "--num-cpus=1", "--include-dashboard=false",
                        f"--temp-dir={self.head_dir}", "--disable-usage-stats"], check=True, capture_output=True,
                       env={**self.env, "POSWEEP_NODE_NAME": "head"})
        private = ["/tmp"] + ([] if str(self.tmp_path).startswith("/tmp/") else [str(self.tmp_path)])
        mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs tmpfs {p}" for p in private)
        script = f'{mounts} && mkdir -p /tmp/home && exec "$@"'
        # the worker's HOME is its own: it is given the cluster's token, as every node of a real cluster is
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        node_env = {**self.env, "POSWEEP_NODE_NAME": "worker", "HOME": "/tmp/home", "RAY_AUTH_TOKEN": token}
        with open(self.worker_log, "wb") as log:
            self.worker = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
                 # its own address: a driver here looks for its node's raylet by IP, and must not find this one
                 "sh", "-c", script, "sh", _ray(), "start", f"--address={self.address}", "--num-cpus=1",
                 "--node-ip-address=127.0.0.2",
                 "--temp-dir=/tmp/rw", "--disable-usage-stats", "--block"],
                env=node_env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_nodes(2)

    def _wait_for_nodes(self, n: int, timeout: float = 90.0) -> None:
        probe = ("import ray; ray.init(address='{a}', logging_level='ERROR', log_to_driver=False); "
                 "print(sum(x['Alive'] for x in ray.nodes()))").format(a=self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env)
            if out.stdout.strip() == str(n):
                return
            assert self.worker.poll() is None, f"the worker node exited: {self.worker_log.read_text()[-2000:]}"
            time.sleep(1)
        raise AssertionError(f"{n} Ray nodes were not up after {timeout} s: {self.worker_log.read_text()[-2000:]}")

    def kill_worker(self) -> None:
        """SIGKILL the worker node's PID namespace (its init, so every process in it): a node that vanishes."""
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(30)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.kill_worker()
        subprocess.run([_ray(), "stop", "--force"], capture_output=True)
        shutil.rmtree(self.head_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    nodes = Cluster(tmp_path)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def _sweep(tmp_path: Path, cluster: Cluster, extra: str = "", n_train: int = 256) -> subprocess.Popen:
    spec = tmp_path / "nodisk.yaml"
    spec.write_text(SWEEP.format(workdir=tmp_path / "work", address=cluster.address, extra=extra, n_train=n_train))
    env = {k: v for k, v in cluster.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--tracking-uri",
                             f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(tmp_path: Path) -> list:
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "nodisk", create=False)
    return tracker.client.search_runs([tracker.experiment_id], "tags.`posweep.run_kind` = 'trial'", max_results=1000)


def _assert_each_key_finished_once(runs: list) -> None:
    finished: dict[str, int] = {}
    for run in runs:
        finished[run.data.tags[TAG_KEY]] = finished.get(run.data.tags[TAG_KEY], 0) + (run.info.status == "FINISHED")
    assert len(finished) == 6 and set(finished.values()) == {1}, finished


def test_a_sweep_runs_on_nodes_that_share_no_disk_with_the_driver(tmp_path, cluster):
    driver = _sweep(tmp_path, cluster)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output
    runs = _runs(tmp_path)
    _assert_each_key_finished_once(runs)
    preference = [r for r in runs if r.data.tags[TAG_STAGE] in ("dpo", "simpo")]
    on_worker = [r for r in preference if r.data.tags[TAG_NODE] == "worker"]
    assert on_worker, "no preference trial ran on the worker node: the test proved nothing"
    for run in preference:  # every one read its start checkpoint from the store, through its node's cache
        node = run.data.tags[TAG_NODE]
        assert run.data.tags[TAG_INIT_FROM].endswith(f"on {node}"), run.data.tags
        assert run.data.tags[TAG_INIT_FROM].startswith(("the store (", "the node's cache")), run.data.tags
    assert any(r.data.tags[TAG_INIT_FROM].startswith("the store (") for r in on_worker)
    # DPO's reference log-probs: computed where none was published yet, else fetched from the store or the node's cache
    dpo = [r.data.tags[TAG_REF_CACHE] for r in preference if r.data.tags[TAG_STAGE] == "dpo"]
    assert set(dpo) <= {"miss", "hit", "fetched from the store"} and "miss" in dpo, dpo

    # the same numbers as the sweep on one machine's disk: the fetched checkpoint is the one SFT wrote
    local = tmp_path / "local"
    local.mkdir()
    (local / "nodisk.yaml").write_text((tmp_path / "nodisk.yaml").read_text().replace(
        f"{{kind: ray, address: \"{cluster.address}\", resources_per_trial: {{cpu: 1}}, max_failures: 2}}",
        "{kind: local}"))
    one_thread = {**cluster.env, "OMP_NUM_THREADS": "1"}  # as Ray's one-CPU workers: the same float reductions
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "nodisk.yaml", "--tracking-uri",
                           f"sqlite:///{local / 'mlflow.db'}", "--set", f"workdir={local / 'work'}"], cwd=local,
                          capture_output=True, text=True, env=one_thread)
    assert done.returncode == 0, done.stdout + done.stderr
    tracker = SweepTracker(f"sqlite:///{local / 'mlflow.db'}", "nodisk", create=False)
    here = {r.data.tags[TAG_KEY]: r.data.metrics for r in tracker.client.search_runs(
        [tracker.experiment_id], "tags.`posweep.run_kind` = 'trial'")}
    for run in runs:
        for name in ("mean_score", "win_vs_chosen", "kl", "length"):
            if name in here[run.data.tags[TAG_KEY]]:
                assert run.data.metrics[name] == here[run.data.tags[TAG_KEY]][name], (name, run.data.tags)

    # the server asked for the store's credential, which stayed in its 0600 file
    config = tmp_path / "store" / AUTH_FOLDER / "credentials.ini"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    password = next(line.split("=", 1)[1].strip() for line in config.read_text().splitlines()
                    if line.startswith("admin_password"))
    report = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(tmp_path / "nodisk.yaml"),
                             "--tracking-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"], cwd=tmp_path,
                            capture_output=True, text=True, env=cluster.env)
    assert report.returncode == 0, report.stderr
    assert password not in output + report.stdout + report.stderr
    with sqlite3.connect(tmp_path / "store" / "mlflow.db") as db:  # every tag, param and metric name of the store
        for table, column in (("tags", "value"), ("params", "value"), ("experiment_tags", "value")):
            assert not db.execute(f"select count(*) from {table} where {column} like ?", (f"%{password}%",)
                                  ).fetchone()[0], table
    for path in [*(tmp_path / "work").rglob("*"), *cluster.head_dir.rglob("*")]:  # logs, reports, Ray's files
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert password.encode() not in path.read_bytes(), path


def test_the_same_sweep_with_a_shared_workdir_fails_naming_the_missing_path(tmp_path, cluster):
    driver = _sweep(tmp_path, cluster, extra=", shared_workdir: true")
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode != 0, output
    work = str(tmp_path / "work")
    lines = [line for line in output.splitlines() if work in line and "shared_workdir" in line]
    assert lines, output


def test_a_worker_node_killed_mid_trial_is_retried_on_the_head_and_every_key_finishes_once(tmp_path, cluster):
    driver = _sweep(tmp_path, cluster, n_train=2048)  # preference trials long enough to be caught running
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline and driver.poll() is None:
        try:
            runs = _runs(tmp_path)
        except Exception:  # noqa: BLE001 - the store is being created
            runs = []
        running = [r for r in runs if r.info.status == "RUNNING" and r.data.tags.get(TAG_NODE) == "worker"
                   and r.data.tags.get(TAG_STAGE) in ("dpo", "simpo") and TAG_INIT_FROM in r.data.tags]
        if running:
            cluster.kill_worker()
            killed = running[0].data.tags[TAG_KEY]
        time.sleep(0.2)
    assert killed, "no preference trial was caught running on the worker node"
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output
    runs = _runs(tmp_path)
    _assert_each_key_finished_once(runs)
    attempts = [r for r in runs if r.data.tags[TAG_KEY] == killed]
    assert sorted(r.info.status for r in attempts) == ["FINISHED", "KILLED"], [r.info for r in attempts]
    retried = next(r for r in attempts if r.info.status == "FINISHED")
    assert retried.data.tags[TAG_NODE] == "head" and retried.data.tags[TAG_INIT_FROM].endswith("on head")
