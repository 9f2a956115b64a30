"""The runtime records what a trial body returns: the body is handed its log, judge and checkpoint store, returns a
TrialOutcome (or raises BodyFailed), and every write of the run's outcome is the lifecycle's. Bodies here are plain
functions, so what is asserted is the lifecycle's recording, not training."""

import json
from pathlib import Path

import pytest

from orchestrator.core.outcome import BodyFailed, DeviceUsage, TrialOutcome
from orchestrator.core.rungs import RungDecision, TrialStopped
from orchestrator.core.runs import RunStatus
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_CHECKPOINT, TAG_FAILURE, TAG_SAMPLES, TAG_STOPPED_AT_STEP
from orchestrator.core.task import TrialRuntime, TrialTask
from orchestrator.grid import plan_sweep
from orchestrator.runtime.lifecycle import run_trial
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml


@pytest.fixture
def task(tmp_path) -> TrialTask:
    """One DPO trial of a sweep, wired to its stage run in a fresh store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(noop_sweep_yaml("life", tmp_path / "work", n_beta=1, n_lr=1))
    dpo = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    tracker = SweepTracker(uri, "life")
    runtime = TrialRuntime(sweep="life", tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("dpo"), workdir=str(tmp_path / "work"),
                           stage_key=dpo.stage_key)
    return TrialTask(trial=dpo.trials[0], runtime=runtime)


def the_run(task: TrialTask):
    [record] = SweepTracker(task.runtime.tracking_uri, task.runtime.sweep).trials("dpo")
    return record


def test_a_returned_outcome_is_recorded_with_its_samples_checkpoint_curves_and_cost(task, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    handed = {}

    def body(task, log, judge, checkpointing, report, shared):
        handed.update(log=log, judge=judge, checkpointing=checkpointing)
        log.log_metrics({"train/loss": 0.25}, step=3)  # a curve, written while the body runs
        return TrialOutcome(usage=DeviceUsage("cuda:H100", 2), metrics={"mean_score": 0.5},
                            samples=[{"prompt": "p", "score": 0.5}], checkpoint=checkpoint)

    result = run_trial(task, body=body)
    assert result.status == RunStatus.FINISHED and result.metrics["mean_score"] == 0.5
    record = the_run(task)
    assert record.status == RunStatus.FINISHED and record.run_id == result.run_id
    assert record.metrics["mean_score"] == 0.5 and record.metrics["train/loss"] == 0.25
    # the cost is the usage the body returned: 2 GPUs for the trial's wall time
    assert record.metrics["device_count"] == 2
    assert record.metrics["gpu_hours"] == pytest.approx(2 * record.metrics["wall_seconds"] / 3600)
    assert record.tags[TAG_CHECKPOINT] == str(checkpoint)
    assert json.loads(Path(record.tags[TAG_SAMPLES]).read_text()) == [{"prompt": "p", "score": 0.5}]
    assert handed["log"].run_id == result.run_id and callable(handed["judge"]) and handed["checkpointing"] is None


def test_body_failed_records_its_cause_and_the_device_it_held(task):
    def body(task, log, judge, checkpointing, report, shared):
        try:
            raise ValueError("the loss went to NaN at step 7")
        except ValueError as exc:
            raise BodyFailed(DeviceUsage("cuda:H100", 4)) from exc

    result = run_trial(task, body=body)
    assert result.status == RunStatus.FAILED
    record = the_run(task)
    assert record.status == RunStatus.FAILED
    assert record.tags[TAG_FAILURE] == "ValueError: the loss went to NaN at step 7"  # the cause, not BodyFailed
    assert record.metrics["device_count"] == 4


def test_a_stopped_outcome_ends_the_run_stopped(task):
    decision = RungDecision(rung=1, step=2, metric="rung/mean_score", value=0.1, cutoff=0.4, compared=3, stop=True)

    def body(task, log, judge, checkpointing, report, shared):
        return TrialOutcome(stopped=TrialStopped(decision, "below the cutoff", {1: 0.1}))

    result = run_trial(task, body=body)
    assert result.status == RunStatus.STOPPED and result.metrics["stopped_at_step"] == 2
    record = the_run(task)
    assert record.status == RunStatus.STOPPED and record.tags[TAG_STOPPED_AT_STEP] == "2"
    assert record.run_name == f"{task.trial.run_name} (stopped at rung 1)"  # how the MLflow UI shows it
    assert "mean_score" not in record.metrics  # a stopped trial has no final metrics


def test_a_finished_key_is_not_run_again(task):
    calls = []

    def body(task, log, judge, checkpointing, report, shared):
        calls.append(task.trial.trial_key)
        return TrialOutcome(metrics={"mean_score": 1.0})

    first, again = run_trial(task, body=body), run_trial(task, body=body)
    assert len(calls) == 1 and again.status == RunStatus.FINISHED and again.run_id == first.run_id
