"""Where a trial's run enters the trial body: the lifecycle (orchestrator.runtime.lifecycle.TRAIN_BODY) loads
train_and_evaluate in the worker, so nothing above trainers imports torch.

One process trains in place; a trial of several processes starts its ranks (spawned here, a Ray Train run, or
the tasks of a Slurm job already running: trainers.distributed), rank 0 logging into this run.
"""

from __future__ import annotations

from typing import Optional

import torch

from orchestrator.core.tags import TAG_DEVICE
from orchestrator.runtime.trial_log import TrialLogger
from orchestrator.runtime.lifecycle import DeviceUsage, Report
from orchestrator.core.methods import METHODS
from orchestrator.core.task import TrialTask
from trainers.distributed import launch_ranks, launched, train_with_launched_ranks
from trainers.train import make_accelerator
from trainers.trial import execute


def device_usage(accelerator, processes: int = 1) -> DeviceUsage:
    """The device description and count of this trial, for cost accounting: its processes (one device each),
    or what the accelerator spans."""
    device = accelerator.device
    count = max(processes, accelerator.num_processes)
    if device.type == "cuda":
        return DeviceUsage(f"cuda:{torch.cuda.get_device_name(device)}", count)
    return DeviceUsage(device.type, count)


def train_and_evaluate(task: TrialTask, logger: TrialLogger, report: Optional[Report],
                       usage: DeviceUsage) -> dict[str, float]:
    """The trial body of every real trial (a lifecycle TrialBody)."""
    accelerator = make_accelerator()
    measured = device_usage(accelerator, task.runtime.processes)
    usage.device, usage.count = measured.device, measured.count
    logger.set_tags({TAG_DEVICE: usage.device})
    if task.runtime.processes > 1:  # rank 0 logs into this run; the others log nothing
        if launched():  # the cluster started the other ranks (SLURM tasks)
            return train_with_launched_ranks(task, logger, report)
        return launch_ranks(task, logger.run_id)  # spawned here, or a Ray Train run
    return execute(task, METHODS[task.trial.method], logger, report, accelerator)
