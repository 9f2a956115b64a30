import functools

from cluster import EXECUTORS, make_executor
from cluster.probe import probe_trial
from orchestrator.core.spec import LocalExecutorSpec
from orchestrator.core.task import TrialResult


class Recorder:
    def __init__(self):
        self.events = []

    def trial_started(self, task):
        self.events.append(("start", task))

    def trial_step(self, step, total):
        self.events.append(("step", step, total))

    def trial_done(self, result):
        self.events.append(("done", result.trial_key))


def test_local_executor_runs_in_order_and_reports_progress():
    def trial_fn(task, report=None):
        report(1, 2)
        report(2, 2)
        return TrialResult(trial_key=task, run_id=None, status="FINISHED")

    progress = Recorder()
    results = make_executor(LocalExecutorSpec()).run(["a", "b"], trial_fn, progress)
    assert [r.trial_key for r in results] == ["a", "b"]
    assert progress.events == [("start", "a"), ("step", 1, 2), ("step", 2, 2), ("done", "a"),
                               ("start", "b"), ("step", 1, 2), ("step", 2, 2), ("done", "b")]
    assert "local" in EXECUTORS


def test_a_trial_asha_stops_at_a_rung_ends_stopped_and_is_not_run_again(tmp_path, worse_trial_stops):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worse_trial_stops(make_executor(LocalExecutorSpec()), tmp_path, uri, "asha-local",
                      lambda executor, tasks: executor.run(tasks, functools.partial(probe_trial, steps=4)))


def test_local_workers_run_trials_side_by_side_through_the_server(tmp_path, tasks_for):
    """workers: 2 — two worker processes (reused) run 4 trials two at a time, each logging through the MLflow
    server a parallel sweep serves its store with; every key FINISHED once."""
    from orchestrator.runtime.server import store_for_workers
    from orchestrator.runtime.store import store_client
    from orchestrator.runtime.sweep_runs import SweepTracker

    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(LocalExecutorSpec(workers=2))
    assert executor.parallel and executor.slots == 2
    progress = Recorder()
    try:
        with store_for_workers(sqlite, parallel=True) as uri:
            tasks = tasks_for(tmp_path, uri, "workers", 4)
            results = executor.run(tasks, functools.partial(probe_trial, steps=2, seconds=1.0), progress)
    finally:
        executor.close()
    assert [r.status for r in results] == ["FINISHED"] * 4
    assert [r.trial_key for r in results] == [t.trial.trial_key for t in tasks]
    assert [e[0] for e in progress.events].count("done") == 4
    records = SweepTracker(sqlite, "workers").trials()
    assert sorted(r.status for r in records) == ["FINISHED"] * 4 and len({r.trial_key for r in records}) == 4
    runs = sorted((store_client(sqlite).get_run(r.run_id).info for r in records), key=lambda i: i.start_time)
    assert runs[1].start_time < runs[0].end_time, "the first two trials did not overlap"


def test_a_local_worker_that_dies_loses_only_its_trial(tmp_path, tasks_for):
    """A worker killed mid-trial (SIGKILL): its trial is recorded FAILED with the exit code, a new worker takes
    the next trial, which finishes."""
    from orchestrator.runtime.server import store_for_workers
    from orchestrator.runtime.sweep_runs import SweepTracker

    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    executor = make_executor(LocalExecutorSpec(workers=2))
    try:
        with store_for_workers(sqlite, parallel=True) as uri:
            tasks = tasks_for(tmp_path, uri, "worker-died", 3)
            for task in tasks[1:]:  # only the first dies
                task.trial_dir.mkdir(parents=True, exist_ok=True)
                (task.trial_dir / "probe-died").write_text("already died once")
            results = executor.run(tasks, functools.partial(probe_trial, steps=1, die_once=True))
    finally:
        executor.close()
    assert [r.status for r in results] == ["FAILED", "FINISHED", "FINISHED"]
    assert results[0].lost and "died (exit code -9)" in results[0].error
    record = next(r for r in SweepTracker(sqlite, "worker-died").trials() if r.trial_key == tasks[0].trial.trial_key)
    assert record.status == "FAILED"
