"""Several processes per trial (executor.processes_per_trial = N): data parallel under accelerate — DDP over
NCCL with one GPU per process, gloo on CPU — or sharded (executor.sharding fsdp: trainers.train.shard_model).
Ways to get the N processes, one trial body:

- spawned (local, Ray): the process that holds the trial's lock and MLflow run spawns N ranks on its
  machine (run_ranks); a Ray Tune trial reserves their resources and retries them as one unit;
- a Ray Train run (Ray, ranks: ray_train): its workers, anywhere in the cluster (cluster/ray_tune.py);
- launched (SLURM): the job's N tasks, on one or several nodes, are started by srun with the distributed
  environment submitit provides (run_launched). Task 0 runs the trial as usual and, once it holds the lock and
  has opened the run (or found the trial already FINISHED), tells the other tasks through a TCPStore on
  MASTER_ADDR:MASTER_PORT+1 whether to train; they then join the process group as ranks 1..N-1.

Rank 0 logs to the trial's MLflow run, writes the checkpoint and the caches, and evaluates; the others train
only. Each process trains on its share of every global batch (trainers.train._share), so the loss curve is
the one-process curve with the same global batch. The reference-log-prob cache is filled once (under its
lock) and read by every rank."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.runtime.trial_log import TrialLogger
from orchestrator.core.methods import METHODS
from orchestrator.infra.net import free_port
from orchestrator.core.registry import Registry
from orchestrator.core.task import TrialTask
from trainers.train import make_accelerator
from trainers.trial import execute


class RankFailed(RuntimeError):
    """A process of a multi-process trial raised or died; the message is that process's error."""


class NullLogger:
    """What ranks other than 0 log to: nothing (only rank 0's numbers reach the trial's run)."""
    run_id = None

    def log_metrics(self, metrics, step: int = 0) -> None: ...
    def set_tags(self, tags) -> None: ...
    def log_samples(self, samples, artifact_file: str = "") -> None: ...
    def log_text(self, text, artifact_file: str) -> None: ...


@dataclass(frozen=True)
class RankEnvironment:
    """Where one rank of a multi-process trial sits: a spawned process, or a task of a multi-task job as the
    cluster's launcher describes it (submitit's TorchDistributedEnvironment)."""
    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int

    def export(self) -> None:
        """The env:// variables accelerate and torch.distributed read."""
        os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK=str(self.local_rank),
                          LOCAL_WORLD_SIZE=str(self.local_world))


def _execute(task: TrialTask, logger, report=None) -> dict[str, float]:
    """The trial body in this process, as one rank of the distributed environment it is set up for."""
    return execute(task, METHODS[task.trial.method], logger, report, make_accelerator())


def train_as_rank(task_json: str, run_id: str, rank: int, out: str) -> None:
    """One rank of a multi-process trial whose distributed environment is set (env:// variables, or a process
    group a launcher already formed): rank 0 logs into the trial's run `run_id` and writes out/metrics.json."""
    task = TrialTask.model_validate_json(task_json)
    if rank == 0:
        runtime = task.runtime
        logger = TrialLogger(runtime.tracking_uri, runtime.experiment_id, runtime.parent_run_id)
        logger.run_id = run_id  # the run the parent opened and will close
        Path(out, "metrics.json").write_text(json.dumps(_execute(task, logger)))
    else:
        _execute(task, NullLogger())


def _spawned_rank(rank: int, task_json: str, run_id: str, world: int, port: int, out: str) -> None:
    RankEnvironment(rank, world, rank, world, "127.0.0.1", port).export()
    train_as_rank(task_json, run_id, rank, out)


def last_line(text: str) -> str:
    """The last non-empty line of an error text (a traceback's, the error itself)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def ranks_folder(task: TrialTask) -> Path:
    """An empty folder for one attempt's rank outputs (rank 0's metrics.json), on the sweep's shared workdir."""
    out = task.trial_dir / "ranks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def rank_metrics(out: Path) -> dict[str, float]:
    return json.loads((out / "metrics.json").read_text())


def run_ranks(task: TrialTask, run_id: str) -> dict[str, float]:
    """Train and evaluate `task` in task.runtime.processes spawned processes on this machine; rank 0's metrics."""
    world = task.runtime.processes
    out = ranks_folder(task)
    try:
        mp.start_processes(_spawned_rank, args=(task.model_dump_json(), run_id, world, free_port(),
                                                str(out)),
                           nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:  # its message ends with the rank's traceback
        raise RankFailed(f"rank {exc.error_index} of {world}: {last_line(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        raise RankFailed(f"rank {exc.error_index} of {world} died (exit code {exc.exit_code})") from None
    return rank_metrics(out)


# How a trial's ranks start (TrialRuntime.rank_launcher) -> launch(task, run_id) -> rank 0's metrics. "spawn"
# is here; "ray_train" lives with the Ray executor, named lazily (loaded only in a Tune trial that uses it).
RANK_LAUNCHERS: Registry[Callable[[TrialTask, str], dict[str, float]]] = Registry("rank launcher", {
    "spawn": run_ranks,
    "ray_train": "cluster.ray_tune:run_ray_train_ranks",
})


def launch_ranks(task: TrialTask, run_id: str) -> dict[str, float]:
    return RANK_LAUNCHERS[task.runtime.rank_launcher](task, run_id)


# ---- ranks launched by the cluster (SLURM tasks) -----------------------------------------------------------
DECISION_KEY, ACK_KEY = "posweep/decision", "posweep/acknowledged"
TRAIN, SKIP = "train", "skip"
# Task 0 may wait for the trial's lock behind another attempt, or load a big model, before it decides.
DECISION_TIMEOUT = timedelta(hours=24)
ACK_TIMEOUT_S = 600.0


# Set in task 0's process while it runs a trial: (its rank, the decision store).
_launched: Optional[tuple[RankEnvironment, dist.TCPStore]] = None


def run_launched(trial_fn: Callable[[TrialTask], object], task: TrialTask, rank: RankEnvironment):
    """Run `task` as one task of a multi-task job: task 0 runs trial_fn (whose result it returns) and tells
    the others whether it trains; the others train as ranks 1..N-1 when it does, and return None."""
    global _launched
    _forget_mpi_environment()
    store = dist.TCPStore(rank.master_addr, rank.master_port + 1, rank.world, is_master=rank.rank == 0,
                          timeout=DECISION_TIMEOUT)
    if rank.rank != 0:
        decision = store.get(DECISION_KEY).decode()
        store.add(ACK_KEY, 1)
        if decision == TRAIN:
            rank.export()
            _execute(task, NullLogger())
        return None
    _launched = (rank, store)
    try:
        return trial_fn(task)
    finally:
        _launched = None
        if not store.check([DECISION_KEY]):  # no training (a FINISHED run found, an early failure): release them
            store.set(DECISION_KEY, SKIP)
        # task 0 hosts the store: it stays up until every other task has read the decision (or ACK_TIMEOUT_S
        # passed: a task that died never reads it)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while store.add(ACK_KEY, 0) < rank.world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)


# Variables an MPI-aware srun (--mpi=pmi2/pmix) sets, which accelerate reads as a distributed world: task 0
# would then join a process group before deciding (and wait for the others, who wait for its decision).
MPI_WORLD_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                       "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_SIZE",
                       "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE",
                       "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def _forget_mpi_environment() -> None:
    """Ranks here are set with env:// variables (RankEnvironment.export), never read from MPI's."""
    for name in MPI_WORLD_VARIABLES:
        os.environ.pop(name, None)


def launched() -> bool:
    """Whether this process is task 0 of a multi-task job (its other ranks already run)."""
    return _launched is not None


def train_with_launched_ranks(task: TrialTask, logger, report) -> dict[str, float]:
    """Task 0's side: tell the other tasks to train, join them as rank 0 and log into the trial's run."""
    rank, store = _launched
    store.set(DECISION_KEY, TRAIN)
    rank.export()
    return _execute(task, logger, report)
