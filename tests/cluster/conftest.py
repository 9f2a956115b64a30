"""Trial tasks for executor tests: real TrialTasks against a real tracking store, run by the probe trial."""

import pytest

from orchestrator.core.runs import RunStatus
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_KEY, TAG_STOPPED_AT_RUNG, TAG_STOPPED_AT_STEP, TAG_STOP_REASON
from orchestrator.core.task import TrialRuntime, TrialTask
from orchestrator.grid import plan_sweep
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml


def make_tasks(tmp_path, uri: str, name: str, n: int, checkpoint_every=None, n_beta: int = 8,
               early_stopping: bool = False) -> list[TrialTask]:
    """n DPO trial tasks of one sweep (distinct keys, beta ascending), wired to a stage run in `uri`."""
    spec = parse_spec(noop_sweep_yaml(name, tmp_path / "work", n_beta=n_beta, n_lr=1, early_stopping=early_stopping))
    dpo = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    tracker = SweepTracker(uri, name)
    runtime = TrialRuntime(sweep=name, tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("dpo"), workdir=str(tmp_path / "work"),
                           checkpoint_every=checkpoint_every, stage_key=dpo.stage_key,
                           early_stopping=spec.search.early_stopping)
    return [TrialTask(trial=t, runtime=runtime) for t in dpo.trials[:n]]


@pytest.fixture
def tasks_for():
    """make_tasks(tmp_path, uri, name, n, checkpoint_every=None) -> [TrialTask]"""
    return make_tasks


@pytest.fixture
def worse_trial_stops():
    """check_the_worse_trial_stops(executor, tmp_path, uri, name, run)"""
    return check_the_worse_trial_stops


def make_asha_tasks(tmp_path, uri: str, name: str) -> tuple[TrialTask, TrialTask]:
    """(better, worse): two DPO probe tasks of a sweep with one rung (half way) under ASHA. A probe reports its
    probe_score at the rung, which grows with beta: the worse one, reaching the rung after the better one, is
    below the cutoff (the better one's value) and must stop."""
    worse, better = sorted(make_tasks(tmp_path, uri, name, 2, n_beta=2, early_stopping=True),
                           key=lambda t: t.trial.hparams["beta"])
    return better, worse


def check_the_worse_trial_stops(executor, tmp_path, uri: str, name: str, run) -> None:
    """Run the better trial, then the worse one, through `executor` (`run(executor, tasks)` -> results): the worse
    ends STOPPED at its rung with the documented state, and running it again neither runs nor resumes it."""
    better, worse = make_asha_tasks(tmp_path, uri, name)
    assert [r.status for r in run(executor, [better])] == [RunStatus.FINISHED]
    [stopped] = run(executor, [worse])
    assert stopped.status == RunStatus.STOPPED and "outside the best third of the 1 other trial" in stopped.error
    assert stopped.metrics["stopped_at_step"] == 2 and "asha/rung_1" in stopped.metrics
    [again] = run(executor, [worse])
    assert again.status == RunStatus.STOPPED and again.run_id == stopped.run_id
    tracker = SweepTracker(uri, name)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_KEY}` = '{worse.trial.trial_key}'")
    assert len(runs) == 1, "the stopped trial ran again"
    assert runs[0].info.run_name == f"{worse.trial.run_name} (stopped at rung 1)"  # what the MLflow UI shows
    run_info = runs[0]
    assert run_info.info.status == "FINISHED"  # MLflow's status; posweep reads it back STOPPED
    assert run_info.data.tags[TAG_STOPPED_AT_STEP] == "2" and run_info.data.tags[TAG_STOPPED_AT_RUNG] == "1"
    assert "rung 1 (step 2)" in run_info.data.tags[TAG_STOP_REASON]
    assert {"rung/mean_score", "asha/rung_1", "wall_seconds", "device_hours"} <= set(run_info.data.metrics)
    assert "mean_score" not in run_info.data.metrics  # no final evaluation
    assert [r.status for r in tracker.trials() if r.trial_key == worse.trial.trial_key] == [RunStatus.STOPPED]
