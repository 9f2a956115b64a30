"""Probe trials: the real trial path (lock, MLflow run, outcome, result) around a body that trains nothing
(trainers.probe.ProbeBody), as an executor's trial function. For dispatch benchmarks, executor and tracking tests,
and whole no-op sweeps at scale."""

from __future__ import annotations

from typing import Optional

from orchestrator.core.outcome import Report
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.runtime.lifecycle import run_trial
from trainers.probe import ProbeBody


def probe_trial(task: TrialTask, report: Optional[Report] = None, **options) -> TrialResult:
    """`options`: ProbeBody's fields (steps, seconds, die_once, prompts, timings, seconds_per_epoch)."""
    return run_trial(task, report, body=ProbeBody(**options))
