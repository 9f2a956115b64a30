"""What an executor carries to the trial function and brings back. Plain data (pydantic): it crosses
process and machine boundaries (Ray, SLURM) as JSON/pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ConfigDict

from orchestrator.core.runs import RunStatus
from orchestrator.core.spec import AshaSpec, Strict
from orchestrator.core.trials import TrialSpec


class TrialRuntime(Strict):
    """Where a trial runs and what it starts from; none of it is part of the trial key."""
    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    workdir: str                          # absolute; the driver's (shared by the nodes when shared_workdir)
    init_checkpoint: Optional[str] = None  # HF folder of the selected SFT trial (preference stages)
    init_trial_key: Optional[str] = None
    sft_samples: Optional[str] = None      # JSON per-sample records of the selected SFT trial
    # executor.shared_workdir: false: the nodes share no disk with the driver. A trial keeps its files under
    # node_dir (default: TMPDIR/posweep-nodes) and reads what other trials left (the selected SFT trial's, init_run_id)
    # from the store, through the tracking server when it serves served_root (the store's file:// artifact root)
    shared_workdir: bool = True
    node_dir: Optional[str] = None
    init_run_id: Optional[str] = None
    served_root: Optional[str] = None
    # Reuse work across trials (reference log-probs, the SFT baseline's generations and scores). Off only to
    # measure what sharing saves (`sweep run --no-shared-work`); results are the same either way.
    share_work: bool = True
    # Save the training state every N optimizer steps so a killed, preempted or requeued trial resumes there
    # (executor.checkpoint_every); None: a rerun starts the trial over.
    checkpoint_every: Optional[int] = None
    stage_key: str = ""                    # identifies the stage's grid or search (tagged on every trial run)
    processes: int = 1                     # data-parallel processes of the trial (executor.processes_per_trial)
    rank_launcher: str = "spawn"           # how they start (trainers.distributed.RANK_LAUNCHERS)
    sharding: str = "ddp"                  # ddp | fsdp (executor.sharding)
    rank_resources: dict[str, float] = {}  # per rank, for a launcher that places ranks itself (ray_train)
    # checkpoints.keep: a preference trial logs its trained weights as run artifacts (model/) and the method's
    # best is kept (best_per_method) or all are (all); None: no preference weights are saved
    keep_models: Optional[str] = None
    register_models: bool = False          # checkpoints.registry: the kept best in the Model Registry
    system_metrics_interval: Optional[float] = None  # seconds between system-metric samples; None: off
    # search.early_stopping: the trial stops at a rung of evaluation.rungs when ASHA says so (None: never)
    early_stopping: Optional[AshaSpec] = None


class TrialTask(Strict):
    trial: TrialSpec
    runtime: TrialRuntime

    @property
    def trial_dir(self) -> Path:
        return trial_dir(self.runtime.workdir, self.trial.trial_key)


def trial_dir(workdir: str | Path, trial_key: str) -> Path:
    """Per-trial files (checkpoint/, samples.json); keyed by trial, so reruns of a key share them."""
    return Path(workdir) / "trials" / trial_key[:16]


class TrialResult(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)
    trial_key: str
    run_id: Optional[str]
    status: RunStatus             # FINISHED | FAILED | STOPPED
    metrics: dict[str, float] = {}
    error: Optional[str] = None
    wall_seconds: float = 0.0
    lost: bool = False            # no result came back (worker or job died beyond its retries)
    unrecorded: bool = False      # the tracking store did not answer: the outcome is not in MLflow
