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

Rank 0 logs to the trial's MLflow run (in another process, through a file the trial's process relays: RelayedLog),
writes the checkpoint and the caches, and evaluates; the others train only. Each process trains on its share of every global batch (trainers.train._share), so the loss curve is
the one-process curve with the same global batch. The reference-log-prob cache is filled once (under its
lock) and read by every rank."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.core.methods import METHODS
from orchestrator.core.outcome import TrialLog, TrialOutcome, checkpointing
from orchestrator.core.registry import Registry
from orchestrator.core.task import TrialTask
from orchestrator.infra.net import free_port
from trainers.train import make_accelerator
from trainers.trial import BodyHooks, execute


class RankFailed(RuntimeError):
    """A process of a multi-process trial raised or died; the message is that process's error."""


class NullLog:
    """What ranks other than 0 log to: nothing (only rank 0's numbers reach the trial's run)."""
    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


def no_rungs(rung: int, step: int, metrics: dict[str, float]) -> None:
    """The judge of a rank in another process: never called, as the spec refuses evaluation rungs with
    processes_per_trial > 1 (only a one-process trial's judge reads the store)."""
    raise RuntimeError("evaluation rungs run in one-process trials only (executor.processes_per_trial 1)")


class RelayedLog:
    """Rank 0's TrialLog when it runs in another process (spawned, a Ray Train worker, maybe on another node):
    each write is one JSON line appended to RANKS/log.jsonl, on the sweep's shared workdir, which the trial's own
    process tails into the run as it comes (relayed_log)."""
    run_id = None

    def __init__(self, path: Path):
        self.path = path

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:  # one write per line: the tail never reads half a record it keeps
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._append({"metrics": metrics, "step": step})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"tags": tags})


def replay(lines: list[str], log: TrialLog) -> None:
    """Apply RelayedLog records (complete JSON lines) to `log`."""
    for line in lines:
        record = json.loads(line)
        if "tags" in record:
            log.set_tags(record["tags"])
        else:
            log.log_metrics(record["metrics"], record["step"])


class _Tail:
    """Reads the complete lines appended to a file since the last read (a line still being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode().splitlines()


RELAY_POLL_S = 0.5


@contextlib.contextmanager
def relayed_log(out: Path, log: TrialLog):
    """While the block runs the ranks, forward rank 0's RelayedLog records from out/log.jsonl into `log` (every
    RELAY_POLL_S, and what is left once the ranks are done). A record the store refuses fails the trial."""
    tail, stop, errors = _Tail(out / LOG_FILE), threading.Event(), []

    def forward():
        while not errors:
            try:
                replay(tail.new_lines(), log)
            except Exception as exc:  # noqa: BLE001 - raised in the trial's thread once the ranks end
                errors.append(exc)
            if stop.wait(RELAY_POLL_S):
                return

    thread = threading.Thread(target=forward, name="rank-0-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    replay(tail.new_lines(), log)


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


def leave_process_group() -> None:
    """Destroy this rank's process group, if any, before the process ends: a rank that exits with gloo's threads
    still up may abort (SIGABRT, "terminate called without an active exception": 1 in 8 two-process sweeps here,
    3 in 4 under pytest, before every rank left it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _execute(task: TrialTask, hooks: BodyHooks) -> TrialOutcome:
    """The trial body in this process, as one rank of the distributed environment it is set up for."""
    try:
        return execute(task, METHODS[task.trial.method], hooks, make_accelerator())
    finally:
        leave_process_group()


LOG_FILE, OUTCOME_FILE = "log.jsonl", "outcome.json"


def write_outcome(path: Path, outcome: TrialOutcome) -> None:
    """Rank 0's outcome, for the trial's own process (a multi-process trial never stops early: no rungs)."""
    path.write_text(json.dumps({"metrics": outcome.metrics, "samples": outcome.samples,
                                "checkpoint": outcome.checkpoint and str(outcome.checkpoint),
                                "weights": outcome.weights and str(outcome.weights)}))


def read_outcome(path: Path) -> TrialOutcome:
    saved = json.loads(path.read_text())
    as_path = lambda value: Path(value) if value else None  # noqa: E731
    return TrialOutcome(metrics=saved["metrics"], samples=saved["samples"], checkpoint=as_path(saved["checkpoint"]),
                        weights=as_path(saved["weights"]))


def train_as_rank(task_json: str, rank: int, out: str) -> None:
    """One rank of a multi-process trial whose distributed environment is set (env:// variables, or a process
    group a launcher already formed): rank 0 logs through out/log.jsonl and writes its outcome to
    out/outcome.json; the others log nothing."""
    task = TrialTask.model_validate_json(task_json)
    if rank == 0:
        outcome = _execute(task, BodyHooks(RelayedLog(Path(out, LOG_FILE)), no_rungs, checkpointing(task)))
        write_outcome(Path(out, OUTCOME_FILE), outcome)
    else:
        _execute(task, BodyHooks(NullLog(), no_rungs, checkpointing(task)))


def _spawned_rank(rank: int, task_json: str, world: int, port: int, out: str) -> None:
    RankEnvironment(rank, world, rank, world, "127.0.0.1", port).export()
    train_as_rank(task_json, rank, out)


def last_line(text: str) -> str:
    """The last non-empty line of an error text (a traceback's, the error itself)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def ranks_folder(task: TrialTask) -> Path:
    """An empty folder for one attempt's rank outputs (rank 0's log and outcome), on the sweep's shared workdir."""
    out = task.trial_dir / "ranks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def run_ranks(task: TrialTask, out: Path) -> None:
    """Train and evaluate `task` in task.runtime.processes spawned processes on this machine."""
    world = task.runtime.processes
    try:
        mp.start_processes(_spawned_rank, args=(task.model_dump_json(), world, free_port(), str(out)),
                           nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:  # its message ends with the rank's traceback
        raise RankFailed(f"rank {exc.error_index} of {world}: {last_line(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        raise RankFailed(f"rank {exc.error_index} of {world} died (exit code {exc.exit_code})") from None


# How a trial's ranks start (TrialRuntime.rank_launcher): launch(task, out) runs them all to their end, rank 0
# leaving its log and outcome in `out`. "spawn" is here; "ray_train" lives with the Ray executor, named lazily
# (loaded only in a Tune trial that uses it).
RANK_LAUNCHERS: Registry[Callable[[TrialTask, Path], None]] = Registry("rank launcher", {
    "spawn": run_ranks,
    "ray_train": "cluster.ray_tune:run_ray_train_ranks",
})


def launch_ranks(task: TrialTask, log: TrialLog) -> TrialOutcome:
    """Start the trial's ranks elsewhere (spawned, a Ray Train run) and relay rank 0's log into `log`; its outcome."""
    out = ranks_folder(task)
    with relayed_log(out, log):
        RANK_LAUNCHERS[task.runtime.rank_launcher](task, out)
    return read_outcome(out / OUTCOME_FILE)


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
            _execute(task, BodyHooks(NullLog(), no_rungs, checkpointing(task)))
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


def train_with_launched_ranks(task: TrialTask, hooks: BodyHooks) -> TrialOutcome:
    """Task 0's side: tell the other tasks to train and join them as rank 0, in the trial's own process."""
    rank, store = _launched
    store.set(DECISION_KEY, TRAIN)
    rank.export()
    return _execute(task, hooks)
