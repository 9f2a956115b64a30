"""Several processes per trial (executor.processes_per_trial = N): data parallel under accelerate — DDP over
NCCL with one GPU per process, gloo on CPU — spawned on the trial's machine by the process that holds the
trial's lock and MLflow run. Every executor runs it the same way (local, a Ray Tune trial that reserved the
resources, a SLURM job with the GPUs), and retries it as one unit.

Rank 0 logs to the trial's MLflow run, writes the checkpoint and the caches, and evaluates; the others train
only. Each process trains on its share of every global batch (trainers.train._share), so the loss curve is
the one-process curve with the same global batch. The reference-log-prob cache is filled once (under its
lock) and read by every rank."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.multiprocessing as mp

from orchestrator import tracking
from orchestrator.task import TrialTask


class RankFailed(RuntimeError):
    """A process of a multi-process trial raised or died; the message is that process's error."""


class NullLogger:
    """What ranks other than 0 log to: nothing (only rank 0's numbers reach the trial's run)."""
    run_id = None

    def log_metrics(self, metrics, step: int = 0) -> None: ...
    def set_tags(self, tags) -> None: ...
    def log_samples(self, samples, artifact_file: str = "") -> None: ...
    def log_text(self, text, artifact_file: str) -> None: ...


def _rank_main(rank: int, task_json: str, run_id: str, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from trainers.methods import METHODS
    from trainers.train import make_accelerator
    from trainers.trial import execute

    task = TrialTask.model_validate_json(task_json)
    accelerator = make_accelerator()
    if rank == 0:
        runtime = task.runtime
        logger = tracking.TrialLogger(runtime.tracking_uri, runtime.experiment_id, runtime.parent_run_id)
        logger.run_id = run_id  # the run the parent opened and will close
    else:
        logger = NullLogger()
    metrics = execute(task, METHODS[task.trial.method], logger, None, accelerator)
    if accelerator.is_main_process:
        Path(out, "metrics.json").write_text(json.dumps(metrics))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def run_ranks(task: TrialTask, run_id: str) -> dict[str, float]:
    """Train and evaluate `task` in task.runtime.processes processes; rank 0's metrics."""
    world = task.runtime.processes
    out = task.trial_dir / "ranks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        mp.start_processes(_rank_main, args=(task.model_dump_json(), run_id, world, tracking.free_port(), str(out)),
                           nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:  # its message ends with the rank's traceback
        raise RankFailed(f"rank {exc.error_index} of {world}: {_last_line(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        raise RankFailed(f"rank {exc.error_index} of {world} died (exit code {exc.exit_code})") from None
    return json.loads((out / "metrics.json").read_text())
