"""Two processes per trial (DDP, gloo on this CPU machine) against one, with the same global batch: the same
loss curves, one MLflow run per trial with each step logged once (rank 0's), evaluation done."""

import pytest
from ddp_support import SPEC

from orchestrator.core.spec_file import SpecError, parse_spec
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.store import store_client
from orchestrator.runtime.sweep_runs import SweepTracker


def _curves(tmp_path, processes: int, extra: str = "") -> dict[str, list[float]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp_path / f'mlflow-{processes}.db'}"
    text = SPEC.format(processes=processes, workdir=tmp_path / f"work-{processes}")
    if extra:  # settings that must not change the curve: micro-batches, resumable saves, sharding
        text = text.replace("log_every: 1}", "log_every: 1, micro_batch_size: 4}").replace(
            f"processes_per_trial: {processes}}}", f"processes_per_trial: {processes}, {extra}}}")
    spec = parse_spec(text)
    assert not extra or spec.training.micro_batch_size == 4
    outcome = run_sweep(spec, uri, output=QUIET)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = SweepTracker(uri, spec.name).trials()
    assert len(records) == 4 and all(r.status == "FINISHED" for r in records)  # one run per trial
    curves = {}
    for r in records:
        if r.stage == "base":
            continue
        history = store_client(uri).get_metric_history(r.run_id, "train/loss")
        steps = [m.step for m in history]
        assert steps == list(range(1, 9)), steps  # 64 pairs / 16 x 2 epochs, each step logged once
        assert r.metrics["device_count"] == processes and "mean_score" in r.metrics  # rank 0 evaluated
        curves[r.stage] = [m.value for m in history]
    return curves


def test_two_processes_give_the_one_process_loss_curves(tmp_path):
    """2 processes with DDP (also accumulating 2 micro-batches of 4 per process and saving every 3 steps), and
    2 processes with FSDP (sharded training, the model gathered on rank 0 to save the SFT checkpoint and
    evaluate), each against 1 process."""
    one = _curves(tmp_path, 1)
    ddp = _curves(tmp_path / "ddp", 2, extra="checkpoint_every: 3")
    fsdp = _curves(tmp_path / "fsdp", 2, extra="sharding: fsdp")
    for stage in ("sft", "dpo", "simpo"):
        assert ddp[stage] == pytest.approx(one[stage], abs=1e-5), stage
        assert fsdp[stage] == pytest.approx(one[stage], abs=1e-5), stage


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

    from orchestrator.core.outcome import Checkpointing
    from orchestrator.infra.net import free_port
    from trainers.train import load_training_state, make_accelerator

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

    from orchestrator.infra.net import free_port

    context = mp.start_processes(launched_rank_of_a_trial_that_does_not_train,
                                 args=(2, free_port(), str(tmp_path), fail), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "a launched rank is still waiting"
    results = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)}
    assert results == {0: "raised: the trial failed before training" if fail else "rank 0's result (1 process)",
                       1: None}


def test_fsdp_shards_every_parameter_and_trains_like_one_process(tmp_path):
    """executor.sharding fsdp: each of 2 processes holds half of the parameter elements (torch FSDP2, gloo),
    the loss curve is the one-process curve, and the gathered state dict is the whole model's."""
    import json

    import torch.multiprocessing as mp
    from ddp_support import sharded_rank, tiny_dpo_settings, tiny_dpo_setup

    from orchestrator.infra.net import free_port
    from trainers.objectives import preference_objective
    from trainers.train import make_accelerator, train

    mp.start_processes(sharded_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["full"]
    assert max(r["local"] for r in ranks) <= ranks[0]["full"] // 2 + 64  # rows split evenly (+ rounding)
    tokenizer, pairs, reference, fresh = tiny_dpo_setup()
    model = fresh()
    assert ranks[0]["keys"] == sorted(model.state_dict())
    one = train(model, pairs, preference_objective("dpo", {"beta": 0.5}, reference), tiny_dpo_settings(max_steps=6),
                make_accelerator())
    assert [h["loss"] for h in ranks[0]["history"]] == pytest.approx([h["loss"] for h in one], abs=1e-5)


@pytest.mark.parametrize("change, message", [
    ("processes_per_trial: 2, sharding: fsdp, checkpoint_every: 5", "cannot be combined with executor.checkpoint_every"),
    ("processes_per_trial: 1, sharding: fsdp", "needs executor.processes_per_trial of 2 or more"),
    ("processes_per_trial: 2, sharding: fsdp}\ntraining: {lora: {r: 4}", "cannot be combined with training.lora"),
])
def test_fsdp_refuses_what_needs_the_whole_model(tmp_path, change, message):
    text = SPEC.format(processes=2, workdir=tmp_path).replace("processes_per_trial: 2", change)
    if "lora" in change:  # one training section: merge the two
        text = text.replace("training: {batch_size: 16, max_length: 40, log_every: 1}\n", "").replace(
            "training: {lora: {r: 4}", "training: {batch_size: 16, max_length: 40, log_every: 1, lora: {r: 4}")
    with pytest.raises(SpecError, match=f"executor.sharding fsdp {message}"):
        parse_spec(text, "s.yaml")
