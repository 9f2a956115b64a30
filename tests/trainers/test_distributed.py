"""Two processes per trial (DDP, gloo on this CPU machine) against one, with the same global batch: the same
loss curves, one MLflow run per trial with each step logged once (rank 0's), evaluation done."""

import pytest

from orchestrator.pipeline import run_sweep
from orchestrator.spec import SpecError, parse_spec
from orchestrator.tracking import SweepTracker, _client

from ddp_support import SPEC


def _curves(tmp_path, processes: int) -> dict[str, list[float]]:
    uri = f"sqlite:///{tmp_path / f'mlflow-{processes}.db'}"
    spec = parse_spec(SPEC.format(processes=processes, workdir=tmp_path / f"work-{processes}"))
    outcome = run_sweep(spec, uri, show_progress=False, echo=lambda _: None)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = SweepTracker(uri, spec.name).trials()
    assert len(records) == 4 and all(r.status == "FINISHED" for r in records)  # one run per trial
    curves = {}
    for r in records:
        if r.stage == "base":
            continue
        history = _client(uri).get_metric_history(r.run_id, "train/loss")
        steps = [m.step for m in history]
        assert steps == list(range(1, 9)), steps  # 64 pairs / 16 x 2 epochs, each step logged once
        assert r.metrics["device_count"] == processes and "mean_score" in r.metrics  # rank 0 evaluated
        curves[r.stage] = [m.value for m in history]
    return curves


def test_two_processes_give_the_one_process_loss_curves(tmp_path):
    one, two = _curves(tmp_path, 1), _curves(tmp_path, 2)
    for stage in ("sft", "dpo", "simpo"):
        assert two[stage] == pytest.approx(one[stage], abs=1e-5), stage


@pytest.mark.parametrize("processes, method, message", [
    (3, "simpo", "executor.processes_per_trial 3 must divide training.batch_size 16"),
    (2, "beta_dpo", "beta_dpo use statistics of the whole batch, which a batch split over 2 processes"),
])
def test_multi_process_spec_errors(tmp_path, processes, method, message):
    text = SPEC.format(processes=processes, workdir=tmp_path)
    if method == "beta_dpo":
        text = text.replace("    simpo: {grid: {beta: [2.0], gamma: [0.5],", "    beta_dpo: {grid: {beta: [0.1], alpha: [1.0],")
    with pytest.raises(SpecError, match=message):
        parse_spec(text, "s.yaml")
