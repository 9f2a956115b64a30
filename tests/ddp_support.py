"""A small sweep at several processes per trial, shared by the DDP tests of every executor (tests/trainers,
tests/cluster). A uniquely named module in tests/ (on sys.path through tests/conftest.py)."""

import functools
import tempfile
from pathlib import Path

import pytest

from orchestrator.core.spec_file import parse_spec
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.store import store_client
from orchestrator.runtime.sweep_runs import SweepTracker

SPEC = """\
name: ddp-{processes}
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 1}}
evaluation: {{num_prompts: 16, max_new_tokens: 8}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [2]}}}}
  methods:
    dpo: {{grid: {{beta: [0.3], learning_rate: [1.0e-3], epochs: [2]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5], learning_rate: [1.0e-3], epochs: [2]}}}}
executor: {{kind: local, processes_per_trial: {processes}}}
"""
SIMPO_LINE = "    simpo: {grid: {beta: [2.0], gamma: [0.5], learning_rate: [1.0e-3], epochs: [2]}}\n"


def _base_sft_dpo_curves(text: str, folder: Path, processes: int) -> dict[str, list[float]]:
    """Run SPEC's base, SFT and DPO stages (`text`); check every trial FINISHED in one run with each training
    step logged once and `processes` devices counted; the logged loss curve of each trained stage."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    outcome = run_sweep(parse_spec(text.replace(SIMPO_LINE, "")), uri, output=QUIET)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = SweepTracker(uri, f"ddp-{processes}").trials()
    assert sorted(r.stage for r in records) == ["base", "dpo", "sft"] and all(r.status == "FINISHED" for r in records)
    curves = {}
    for r in records:
        assert r.metrics["device_count"] == processes
        if r.stage != "base":
            history = store_client(uri).get_metric_history(r.run_id, "train/loss")
            assert [m.step for m in history] == list(range(1, 9))
            curves[r.stage] = [m.value for m in history]
    return curves


@functools.lru_cache(maxsize=1)
def one_process_curves() -> dict[str, list[float]]:
    """The 1-process curves every executor's 2-process run is held to (computed once per test session)."""
    folder = Path(tempfile.mkdtemp(prefix="ddp-one-"))
    return _base_sft_dpo_curves(SPEC.format(processes=1, workdir=folder / "work"), folder, 1)


def two_process_sweep(tmp_path, executor: str):
    """The base, SFT and DPO stages of SPEC at 2 processes per trial on `executor`: every trial FINISHED in
    one run, each training step logged once (rank 0), 2 devices counted, and the loss curves of 1 process."""
    text = SPEC.format(processes=2, workdir=tmp_path / "work").replace(
        "executor: {kind: local, processes_per_trial: 2}", executor)
    two = _base_sft_dpo_curves(text, tmp_path, 2)
    one = one_process_curves()
    for stage in ("sft", "dpo"):
        assert two[stage] == pytest.approx(one[stage], abs=1e-5), stage


class Interrupted(Exception):
    pass


def checkpointed_rank(rank: int, world: int, port: int, folder: str, kill_at: int) -> None:
    """One rank of a 2-process DPO loop on the tiny model with saves every 3 steps, stopped (every rank, as
    a killed job's are) after step `kill_at` (0: never); rank 0 writes its history to folder/history.json."""
    import json
    from pathlib import Path

    from trainers.distributed import RankEnvironment, leave_process_group
    from trainers.train import make_accelerator

    RankEnvironment(rank, world, rank, world, "127.0.0.1", port).export()
    history = _checkpointed_history(make_accelerator(), Path(folder), kill_at)
    leave_process_group()
    if rank == 0:
        Path(folder, "history.json").write_text(json.dumps(history))


def tiny_dpo_setup():
    """(tokenizer, 64 encoded pairs, reference log-probs, a fresh-model factory): the same in every process."""
    from types import SimpleNamespace

    import torch

    from trainers.data import encode_pairs
    from trainers.models import build_task_tokenizer, build_tiny_model
    from trainers.synthetic import generate_split
    from trainers.train import reference_logps

    tiny = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64, seed=0)
    tokenizer = build_task_tokenizer()
    pairs = encode_pairs(tokenizer, generate_split("train", 64, seed=0), max_length=40)
    reference = reference_logps(build_tiny_model(tiny, tokenizer), pairs, tokenizer.pad_token_id, 16,
                                torch.device("cpu"))
    return tokenizer, pairs, reference, lambda: build_tiny_model(tiny, tokenizer)


def tiny_dpo_settings(**overrides):
    """The loop settings of the tiny DPO runs above (batch 16, lr 3e-3, clipping at 1, every step logged)."""
    from trainers.train import LoopSettings

    return LoopSettings(**{**dict(learning_rate=3e-3, epochs=3, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                                  max_grad_norm=1.0, max_steps=None, seed=0, log_every=1), **overrides})


def _checkpointed_history(accelerator, folder, kill_at: int) -> list[dict]:
    from orchestrator.core.outcome import Checkpointing
    from trainers.objectives import preference_objective
    from trainers.train import LoopHooks, train

    tokenizer, pairs, reference, fresh = tiny_dpo_setup()
    settings = tiny_dpo_settings(max_steps=10)

    def stop(step, total, stats):
        if step == kill_at:
            raise Interrupted

    try:
        return train(fresh(), pairs, preference_objective("dpo", {"beta": 0.5}, reference), settings,
                     accelerator, LoopHooks(on_log=stop),
                     Checkpointing(folder / "resume", every=3) if folder else None)
    except Interrupted:
        return []


def launched_rank_of_a_trial_that_does_not_train(rank: int, world: int, port: int, out: str, fail: bool) -> None:
    """A task of a 2-task job whose trial function returns (a FINISHED run found) or raises without training:
    task 0 gets its result or error, the other task is told to skip and returns None."""
    import json
    import os
    from pathlib import Path

    from trainers.distributed import RankEnvironment, run_launched
    from trainers.train import make_accelerator

    os.environ["PMI_SIZE"] = str(world)  # as an MPI-aware srun sets it; accelerate would read a 2-process world

    def trial_fn(task):
        if fail:
            raise RuntimeError("the trial failed before training")
        # task 0 builds its single-process accelerator before it decides (trainers.trial._run_locked)
        return f"rank 0's result ({make_accelerator().num_processes} process)"

    launched = RankEnvironment(rank, world, rank, world, "127.0.0.1", port)
    try:
        result = run_launched(trial_fn, None, launched)
    except RuntimeError as exc:
        result = f"raised: {exc}"
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def sharded_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process FSDP loop (DPO on the tiny model, 6 steps): writes how many parameter
    elements it holds against the model's, its history, and (rank 0) the gathered state dict's keys."""
    import json
    from pathlib import Path

    from trainers.distributed import RankEnvironment, leave_process_group
    from trainers.objectives import preference_objective
    from trainers.train import full_state_dict, make_accelerator, train

    RankEnvironment(rank, world, rank, world, "127.0.0.1", port).export()
    tokenizer, pairs, reference, fresh = tiny_dpo_setup()
    model = fresh()
    full = sum(p.numel() for p in model.parameters())
    settings = tiny_dpo_settings(max_steps=6, sharding="fsdp")
    history = train(model, pairs, preference_objective("dpo", {"beta": 0.5}, reference), settings,
                    make_accelerator())
    local = sum(p.to_local().numel() for p in model.parameters())
    keys = sorted(full_state_dict(model))
    leave_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps({"local": local, "full": full, "history": history,
                                                     "keys": keys if rank == 0 else []}))
