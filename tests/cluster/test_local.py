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
