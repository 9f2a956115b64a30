"""`sweep status` and the cost estimate of `sweep plan`: hand-built runs with known answers, and the CLI."""

import subprocess
import sys

import pytest

from orchestrator.core.runs import TrialRecord
from orchestrator.core.spec import CostSpec
from orchestrator.core.spec_file import parse_spec
from orchestrator.grid import plan_sweep
from orchestrator.status import cost_estimate, elapsed_seconds, status_table

SPEC = """\
name: costed
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.3, 0.5, 1.0], learning_rate: [3.0e-4]}}}}
{cost}
"""


def record(trial, status, seconds, gpu_hours=0.0, start=0, end=None, run_id="r"):
    return TrialRecord(run_id=run_id, run_name=trial.run_name, trial_key=trial.trial_key, stage=trial.stage,
                       method=trial.method, status=status, params={}, tags={},
                       metrics={"wall_seconds": seconds, "gpu_hours": gpu_hours}, start_time=start, end_time=end)


@pytest.fixture
def spec(tmp_path):
    return parse_spec(SPEC.format(workdir=tmp_path, cost=""))


@pytest.fixture
def stages(spec):
    return plan_sweep(spec)


def test_status_counts_each_key_once_and_costs_every_attempt(stages, spec):
    base, sft, dpo = stages
    records = [record(dpo.trials[0], "FINISHED", 360, 0.2, 0, 400_000),
               record(dpo.trials[0], "KILLED", 36, 0.02, 0, 40_000),         # an earlier attempt: costs, not counted
               record(dpo.trials[1], "FAILED", 72, 0.04, 1000, 80_000),
               record(dpo.trials[2], "RUNNING", 0, 0.0, 2000, None),
               record(sft.trials[0], "FINISHED", 720, 0.4, 0, 720_000)]
    table = status_table(stages, records, spec).set_index("stage")
    # pending: what `sweep run` runs now, the failed trial included (it runs again)
    assert table.loc["dpo", ["planned", "done", "running", "failed", "pending"]].tolist() == [4, 1, 1, 1, 2]
    assert table.loc["dpo", "trial_hours"] == pytest.approx((360 + 36 + 72) / 3600)
    assert table.loc["dpo", "gpu_hours"] == pytest.approx(0.26)
    assert table.loc["base", "pending"] == 1 and table.loc["sft", "done"] == 1
    assert elapsed_seconds(records, now_ms=900_000) == 900.0  # a trial still runs: up to now


def test_plan_estimates_from_measured_trials_then_from_the_spec(stages, spec):
    base, sft, dpo = stages
    measured = [record(dpo.trials[0], "FINISHED", 100, 0.5), record(dpo.trials[1], "FINISHED", 300, 1.5)]
    table = cost_estimate(stages, measured, spec).set_index("stage")
    assert table.loc["dpo", "seconds_per_trial"] == 200 and table.loc["dpo", "source"] == "measured (stage)"
    assert table.loc["dpo", "gpu_hours"] == pytest.approx(4 * 1.0) and table.loc["dpo", "to_run"] == 2
    assert table.loc["dpo", "gpu_hours_to_run"] == pytest.approx(2 * 1.0)
    assert table.loc["sft", "source"] == "measured (sweep)" and table.loc["sft", "seconds_per_trial"] == 200
    costed = spec.model_copy(update={"cost": CostSpec(trial_seconds=3600, gpus_per_trial=8)})
    spec_only = cost_estimate(stages, [], costed).set_index("stage")
    assert spec_only.loc["dpo", "gpu_hours"] == pytest.approx(4 * 8) and spec_only.loc["dpo", "source"] == "spec"
    unknown = cost_estimate(stages, [], spec).set_index("stage")
    assert unknown.loc["dpo", "source"] == "unknown" and unknown.loc["dpo", "gpu_hours"] is None


def sweep(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_status_and_plan_after_a_run(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(workdir=tmp_path / "work", cost="cost: {trial_seconds: 7200, gpus_per_trial: 4}"))
    before = sweep("plan", str(spec), cwd=tmp_path)
    assert before.returncode == 0 and not (tmp_path / "mlflow.db").exists()  # plan never creates a store
    cost_rows = {l.split()[0]: l.split() for l in before.stdout.split("cost estimate")[1].split("\n\n")[0].splitlines()[2:] if l.strip()}
    assert cost_rows["dpo"] == ["dpo", "4", "4", "7200.0", "spec", "8", "8", "32", "32"]  # 2 h x 4 GPUs x 4 trials
    assert cost_rows["all"] == ["all", "6", "6", "12", "12", "48", "48"]
    run = sweep("run", str(spec), "--smoke", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    status = sweep("status", str(spec), "--smoke", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[2:8] if line.strip()}
    assert lines["dpo"][:6] == ["dpo", "2", "2", "0", "0", "0"] and lines["all"][:6] == ["all", "4", "4", "0", "0", "0"]
    assert "GPU-h" in status.stdout and "elapsed:" in status.stdout
    after = sweep("plan", str(spec), "--smoke", cwd=tmp_path)
    cost_rows = {l.split()[0]: l.split() for l in after.stdout.split("cost estimate")[1].split("\n\n")[0].splitlines()[2:] if l.strip()}
    assert cost_rows["dpo"][1:3] == ["2", "0"] and cost_rows["dpo"][4:6] == ["measured", "(stage)"]
    assert cost_rows["dpo"][-2:] == ["0", "0"]  # CPU trials hold no GPU
    # the full grid's keys differ from the smoke run's (fewer steps): smoke timings are not used for it
    full = sweep("plan", str(spec), cwd=tmp_path)
    assert "measured (" not in full.stdout


@pytest.mark.parametrize("hours,shown", [(None, "?"), (0.0, "0"), (0.000284, "<0.01"), (0.0123, "0.0123"),
                                         (1.234, "1.23"), (12.34, "12.3"), (1234.5, "1,234")])
def test_hours_read_as_hours(hours, shown):
    from orchestrator.status import format_hours
    assert format_hours(hours) == shown
