"""The Ray executor on a local Ray (ray.init(num_cpus=2)) and on a two-node Ray cluster started here."""

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from local_postgres import tracking_store

from cluster import make_executor
from cluster.probe import probe_trial
from orchestrator.core.spec import RayExecutorSpec, RayResources
from orchestrator.core.tags import TAG_FAILURE
from orchestrator.runtime.server import store_for_workers
from orchestrator.runtime.store import store_client
from orchestrator.runtime.sweep_runs import SweepTracker


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_eight_concurrent_trials_log_every_step_through_the_mlflow_server(tmp_path, local_ray, tasks_for, store,
                                                                          request):
    """8 trials at once (a quarter CPU each), 100 metric steps each, over the server `sweep run` starts for a
    SQLite store or a PostgreSQL database: every run FINISHED, every step present, one run per key."""
    store_uri = tracking_store(store, tmp_path, request)
    executor = make_executor(RayExecutorSpec(kind="ray", resources_per_trial=RayResources(cpu=0.25),
                                             max_concurrent_trials=8))
    with store_for_workers(store_uri, parallel=True, workdir=tmp_path / "work") as uri:
        assert uri.startswith("http://127.0.0.1:")
        tasks = tasks_for(tmp_path, uri, "concurrent", 8)
        results = executor.run(tasks, functools.partial(probe_trial, steps=100, seconds=1.0))
        assert [r.status for r in results] == ["FINISHED"] * 8
        client = store_client(uri)
        for result in results:
            history = client.get_metric_history(result.run_id, "probe/step_value")
            assert sorted(m.step for m in history) == list(range(1, 101))
    records = SweepTracker(store_uri, "concurrent").trials()  # the file is readable directly once the server stops
    assert sorted(r.status for r in records) == ["FINISHED"] * 8
    assert len({r.trial_key for r in records}) == 8
    # at some moment several trials were logging at once (not when each started: Ray starts 2 worker processes at
    # a time on 2 CPUs, and the second test of the module waits for them after the first's idled out)
    spans = [(i.start_time, i.end_time) for i in (store_client(store_uri).get_run(r.run_id).info for r in records)]
    at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert at_once >= 3, f"at most {at_once} of the 8 trials ran at once"


def test_a_worker_killed_mid_trial_is_retried_and_finishes_once(tmp_path, local_ray, tasks_for):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(RayExecutorSpec(kind="ray", max_failures=1))
    with store_for_workers(uri, parallel=True) as served:
        tasks = tasks_for(tmp_path, served, "retry", 2)
        results = executor.run(tasks, functools.partial(probe_trial, steps=3, die_once=True))
    assert [r.status for r in results] == ["FINISHED", "FINISHED"]
    for task in tasks:
        runs = SweepTracker(uri, "retry").client.search_runs(
            [SweepTracker(uri, "retry").experiment_id], f"tags.`posweep.trial_key` = '{task.trial.trial_key}'")
        assert sorted(r.info.status for r in runs) in (["FINISHED"], ["FINISHED", "KILLED"])
        assert (task.trial_dir / "probe-died").exists()


def test_a_trial_whose_worker_keeps_dying_is_recorded_failed_and_the_batch_goes_on(tmp_path, local_ray, tasks_for):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(RayExecutorSpec(kind="ray", max_failures=0))
    with store_for_workers(uri, parallel=True) as served:
        tasks = tasks_for(tmp_path, served, "lost", 2)
        (tasks[1].trial_dir).mkdir(parents=True, exist_ok=True)
        (tasks[1].trial_dir / "probe-died").write_text("already died once: this one survives")
        results = executor.run(tasks, functools.partial(probe_trial, steps=1, die_once=True))
    assert [r.status for r in results] == ["FAILED", "FINISHED"]
    assert results[0].lost and "died 1 time(s)" in results[0].error
    record = next(r for r in SweepTracker(uri, "lost").trials() if r.trial_key == tasks[0].trial.trial_key)
    assert record.status == "FAILED" and "Ray worker" in record.tags[TAG_FAILURE]


def _ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def two_node_cluster(tmp_path, local_ray, tasks_for):
    """`ray start --head` plus a second `ray start --address`, each with its own temp dir; stopped after."""
    ray.shutdown()
    head_dir, worker_dir = Path("/tmp") / f"rh{os.getpid()}", Path("/tmp") / f"rw{os.getpid()}"  # short: socket paths
    port = 6400 + os.getpid() % 500
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    subprocess.run([_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--temp-dir={head_dir}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        subprocess.run([_ray_cli(), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        f"--temp-dir={head_dir}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def test_trials_spread_over_a_two_node_ray_cluster(tmp_path, two_node_cluster, tasks_for):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(RayExecutorSpec(kind="ray", address=two_node_cluster))
    try:
        assert executor.slots == 2
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        with store_for_workers(uri, parallel=True) as served:
            tasks = tasks_for(tmp_path, served, "two-nodes", 4)
            results = executor.run(tasks, functools.partial(probe_trial, steps=2, seconds=0.5))
    finally:
        executor.close()
    assert [r.status for r in results] == ["FINISHED"] * 4


def test_a_two_process_trial_runs_as_one_ray_trial(tmp_path):
    """A trial that reserves 2 CPUs runs its 2 DDP processes inside its Tune trial (scheduled and retried as
    one unit)."""
    from ddp_support import two_process_sweep

    two_process_sweep(tmp_path, "executor: {kind: ray, num_cpus: 2, resources_per_trial: {cpu: 2}, "
                                "processes_per_trial: 2}")
    ray.shutdown()


def test_a_two_process_trial_runs_as_a_ray_train_run_inside_its_tune_trial(tmp_path):
    """ranks: ray_train — each trial's 2 ranks are the 2 workers of a Ray Train run that its Tune trial drives
    (1 CPU each, placed by Ray; the driver reserves 0.1 CPU). One run per trial, each step logged once."""
    from ddp_support import two_process_sweep

    two_process_sweep(tmp_path, "executor: {kind: ray, num_cpus: 3, resources_per_trial: {cpu: 2}, "
                                "processes_per_trial: 2, ranks: ray_train}")
    ray.shutdown()
    train_runs = [p for p in (tmp_path / "work" / "ray_results").iterdir() if not p.name.startswith("ddp-2")]
    assert len(train_runs) == 3  # base, sft, dpo: one Ray Train run each, named by trial key


def test_a_trial_asha_stops_at_a_rung_ends_stopped_on_ray(tmp_path, local_ray, worse_trial_stops):
    """The decision is read from the store through the MLflow server, inside a Ray worker."""
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(RayExecutorSpec(kind="ray"))
    with store_for_workers(sqlite, parallel=True) as uri:
        worse_trial_stops(executor, tmp_path, uri, "asha-ray",
                          lambda ex, tasks: ex.run(tasks, functools.partial(probe_trial, steps=4)))
