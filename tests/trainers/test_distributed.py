"""Two processes per trial (DDP, gloo on this CPU machine) against one, with the same global batch: the same
loss curves, one MLflow run per trial with each step logged once (rank 0's), evaluation done."""

import pytest

from orchestrator.pipeline import run_sweep
from orchestrator.spec import SpecError, parse_spec
from orchestrator.tracking import SweepTracker, _client

from ddp_support import SPEC


def _curves(tmp_path, processes: int, extra: str = "") -> dict[str, list[float]]:
    uri = f"sqlite:///{tmp_path / f'mlflow-{processes}.db'}"
    text = SPEC.format(processes=processes, workdir=tmp_path / f"work-{processes}")
    if extra:  # settings that must not change the curve: micro-batches, resumable saves
        text = text.replace("log_every: 1}", "log_every: 1, micro_batch_size: 4}").replace(
            f"processes_per_trial: {processes}}}", f"processes_per_trial: {processes}, {extra}}}")
    spec = parse_spec(text)
    assert not extra or (spec.training.micro_batch_size, spec.executor.checkpoint_every) == (4, 3)
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
    """The 2-process trials also accumulate 2 micro-batches of 4 per process and save every 3 steps."""
    one, two = _curves(tmp_path, 1), _curves(tmp_path, 2, extra="checkpoint_every: 3")
    for stage in ("sft", "dpo", "simpo"):
        assert two[stage] == pytest.approx(one[stage], abs=1e-5), stage


@pytest.mark.parametrize("processes, method, message", [
    (3, "simpo", "executor.processes_per_trial 3 must divide training.batch_size 16"),
    (2, "beta_dpo", "beta_dpo use statistics of the whole batch, which a batch split over 2 processes"),
    (1, "beta_dpo", r"which a batch split into micro-batches of 4 \(training.micro_batch_size\) would change"),
])
def test_multi_process_spec_errors(tmp_path, processes, method, message):
    text = SPEC.format(processes=processes, workdir=tmp_path)
    if processes == 1:
        text = text.replace("log_every: 1}", "log_every: 1, micro_batch_size: 4}")
    if method == "beta_dpo":
        text = text.replace("    simpo: {grid: {beta: [2.0], gamma: [0.5],", "    beta_dpo: {grid: {beta: [0.1], alpha: [1.0],")
    with pytest.raises(SpecError, match=message):
        parse_spec(text, "s.yaml")


def test_a_two_process_loop_resumes_from_rank_0s_checkpoint_with_the_uninterrupted_curve(tmp_path):
    """checkpoint_every with 2 processes: rank 0 saves every 3 steps, both ranks stop after step 7 (a killed
    job), and a rerun restores both ranks from that one save and ends on the uninterrupted 1-process curve."""
    import json

    import torch.multiprocessing as mp

    from ddp_support import _checkpointed_history, checkpointed_rank
    from orchestrator.tracking import free_port
    from trainers.train import Checkpointing, load_training_state, make_accelerator

    expected = _checkpointed_history(make_accelerator(), None, kill_at=0)
    for kill_at in (7, 0):
        mp.start_processes(checkpointed_rank, args=(2, free_port(), str(tmp_path), kill_at), nprocs=2,
                           join=True, start_method="spawn")
        if kill_at:
            assert load_training_state(Checkpointing(tmp_path / "resume", 3))["step"] == 6
    resumed = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in resumed] == list(range(1, 11))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in expected], abs=1e-5)


@pytest.mark.parametrize("fail", [False, True])
def test_launched_ranks_are_released_when_task_0_does_not_train(tmp_path, fail):
    """SLURM tasks: task 1 waits for task 0's decision; a trial that returns (already FINISHED) or fails before
    training releases it instead of leaving it waiting for a process group that never forms."""
    import json
    import time

    import torch.multiprocessing as mp

    from ddp_support import launched_rank_of_a_trial_that_does_not_train
    from orchestrator.tracking import free_port

    context = mp.start_processes(launched_rank_of_a_trial_that_does_not_train,
                                 args=(2, free_port(), str(tmp_path), fail), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "a launched rank is still waiting"
    results = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)}
    assert results == {0: "raised: the trial failed before training" if fail else "rank 0's result", 1: None}
