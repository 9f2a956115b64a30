"""Trial tasks for executor tests: real TrialTasks against a real tracking store, run by the probe trial."""

import pytest

from orchestrator.grid import plan_sweep
from orchestrator.contract.spec_file import parse_spec
from orchestrator.contract.task import TrialRuntime, TrialTask
from orchestrator.contract.tracking import SweepTracker
from trainers.probe import noop_sweep_yaml


def make_tasks(tmp_path, uri: str, name: str, n: int, checkpoint_every=None) -> list[TrialTask]:
    """n DPO trial tasks of one sweep (distinct keys), wired to a stage run in `uri`."""
    spec = parse_spec(noop_sweep_yaml(name, tmp_path / "work", n_beta=8, n_lr=1))
    dpo = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    tracker = SweepTracker(uri, name)
    runtime = TrialRuntime(sweep=name, tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("dpo"), workdir=str(tmp_path / "work"),
                           checkpoint_every=checkpoint_every, stage_key=dpo.stage_key)
    return [TrialTask(trial=t, runtime=runtime) for t in dpo.trials[:n]]


@pytest.fixture
def tasks_for():
    """make_tasks(tmp_path, uri, name, n, checkpoint_every=None) -> [TrialTask]"""
    return make_tasks
