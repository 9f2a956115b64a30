"""Trial tasks for executor tests: real TrialTasks against a real tracking store, run by the probe trial."""

import pytest

from orchestrator.grid import plan_sweep
from orchestrator.spec import parse_spec
from orchestrator.task import TrialRuntime, TrialTask
from orchestrator.tracking import SweepTracker

SPEC = """\
name: {name}
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
evaluation: {{num_prompts: 16}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0], learning_rate: [1.0e-4]}}}}
"""


def make_tasks(tmp_path, uri: str, name: str, n: int, checkpoint_every=None) -> list[TrialTask]:
    """n DPO trial tasks of one sweep (distinct keys), wired to a stage run in `uri`."""
    spec = parse_spec(SPEC.format(name=name, workdir=tmp_path / "work"))
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
