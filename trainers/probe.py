"""A trial that trains nothing: it goes through the same lock, MLflow run and result path as a real trial,
logs `steps` metric points and reports a score computed from its hyperparameters. For measuring an executor's
dispatch overhead (benchmarks/bench_dispatch.py) and testing executors, tracking under load and search
without paying for training."""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Optional

from orchestrator.task import TrialResult, TrialTask
from trainers.trial import Report, run_trial


def probe_score(hparams: dict) -> float:
    """A smooth score with its maximum at learning_rate 1e-4, beta 1 (for search tests)."""
    lr = float(hparams.get("learning_rate", 1e-4))
    beta = float(hparams.get("beta", 1.0))
    return -((math.log10(lr) + 4) ** 2) - (beta - 1) ** 2


def _probe_body(task: TrialTask, logger, report: Optional[Report], accelerator, *, steps: int, seconds: float,
                die_once: bool) -> dict[str, float]:
    marker = task.trial_dir / "probe-died"
    if die_once and not marker.exists():  # a worker lost mid-trial: the executor must retry it
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    for step in range(1, steps + 1):
        logger.log_metrics({"probe/step_value": float(step)}, step)
        if report:
            report(step, steps)
    if seconds:
        time.sleep(seconds)
    return {"mean_score": probe_score(task.trial.hparams), "probe_steps": float(steps)}


def probe_trial(task: TrialTask, report: Optional[Report] = None, *, steps: int = 0, seconds: float = 0.0,
                die_once: bool = False) -> TrialResult:
    body = functools.partial(_probe_body, steps=steps, seconds=seconds, die_once=die_once)
    return run_trial(task, report, body=body)
