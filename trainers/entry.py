"""Where a trial's run enters the trial body: the lifecycle (orchestrator.runtime.lifecycle.TRIAL_BODIES) loads
train_and_evaluate in the worker, so nothing above trainers imports torch.

One process trains in place; a trial of several processes starts its ranks (spawned here, a Ray Train run, or
the tasks of a Slurm job already running: trainers.distributed), rank 0 logging into this run.
"""

from __future__ import annotations

from typing import Optional

import torch

from orchestrator.core.methods import METHODS
from orchestrator.core.outcome import (BodyFailed, Checkpointing, DeviceUsage, Report, RungJudge, SharedFiles, TrialLog,
                                       TrialOutcome)
from orchestrator.core.tags import TAG_DEVICE
from orchestrator.core.task import TrialTask
from trainers.distributed import launch_ranks, launched, train_with_launched_ranks
from trainers.train import make_accelerator
from trainers.trial import BodyHooks, execute


def device_usage(accelerator, processes: int = 1) -> DeviceUsage:
    """The device description and count of this trial, for cost accounting: its processes (one device each),
    or what the accelerator spans."""
    device = accelerator.device
    count = max(processes, accelerator.num_processes)
    if device.type == "cuda":
        return DeviceUsage(f"cuda:{torch.cuda.get_device_name(device)}", count)
    return DeviceUsage(device.type, count)


def train_and_evaluate(task: TrialTask, log: TrialLog, judge: RungJudge, checkpointing: Optional[Checkpointing],
                       report: Optional[Report], shared: Optional[SharedFiles]) -> TrialOutcome:
    """The trial body of every real trial (orchestrator.core.outcome.TrialBody). Whatever breaks it is raised as
    BodyFailed with the device it held, so the FAILED run is charged for it."""
    usage = DeviceUsage(count=task.runtime.processes)
    try:
        accelerator = make_accelerator()
        usage = device_usage(accelerator, task.runtime.processes)
        log.set_tags({TAG_DEVICE: usage.device})
        hooks = BodyHooks(log, judge, checkpointing, report, shared)
        if task.runtime.processes == 1:
            outcome = execute(task, METHODS[task.trial.method], hooks, accelerator)
        elif launched():  # the cluster started the other ranks (SLURM tasks); this process is rank 0
            outcome = train_with_launched_ranks(task, hooks)
        else:  # spawned here, or a Ray Train run; rank 0's log is relayed into this run
            outcome = launch_ranks(task, log)
    except Exception as exc:  # noqa: BLE001 - the lifecycle records it as the trial's failure
        raise BodyFailed(usage) from exc
    outcome.usage = usage
    return outcome
