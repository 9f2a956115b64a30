"""The states of a run, as MLflow names them. A str enum: RunStatus.FINISHED == "FINISHED", so statuses read
back from MLflow or from a frame's status column compare with it directly."""

from __future__ import annotations

import math
from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict

from orchestrator.core.tags import TAG_STOPPED_AT_STEP


class RunStatus(str, Enum):
    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"      # the trial ran to an error (its reason in posweep.failure) or was lost
    KILLED = "KILLED"      # interrupted, or left RUNNING by a dead process: a rerun runs the trial again
    # posweep's own, not MLflow's: early stopping ended the trial at a rung (MLflow status FINISHED, tag
    # posweep.stopped_at_step; tracking.run_status). Its run holds rung/* metrics and its cost, no final ones.
    STOPPED = "STOPPED"

    def __str__(self) -> str:
        return self.value


# Trials that ran to an outcome; KILLED and RUNNING ones run again on a rerun.
OUTCOMES = (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.STOPPED)


def resume_done(status: RunStatus, stopped_under: Optional[str], stopping: Optional[str]) -> bool:
    """Whether a run makes its key done, so a rerun of the sweep skips it: FINISHED; or STOPPED under the early-
    stopping rule the sweep stops by now (`stopping`: early_stopping.stop_signature of the spec, None without
    early stopping). A trial stopped under other rung settings, another η, or before early stopping was turned off
    runs again, to the end or to its own stop."""
    return status == RunStatus.FINISHED or (
        status == RunStatus.STOPPED and stopping is not None and stopped_under == stopping)

# The metric every stage's best trial is chosen by, higher is better: the SFT checkpoint preference stages start
# from, the best trial per stage in the summary, the model each method keeps and registers.
SELECTION_METRIC = "mean_score"


def best_first(value: float, trial_key: str) -> tuple[float, str]:
    """Sort key that puts the best trial first: the higher SELECTION_METRIC value, a missing or non-finite one
    last, and between equal values the smaller trial key. The one rule for every "best": the SFT checkpoint
    preference stages start from, the end-of-run summary, the registry's @best and the report."""
    return (-value if value is not None and math.isfinite(value) else math.inf, trial_key)
# What every evaluated trial logs (trainers.evaluate), in the order tables and the MLflow runs view show them.
TRIAL_METRICS = ("mean_score", "win_vs_chosen", "win_vs_sft", "kl", "length")
# Where a trial's wall time went (trainers.trial: load, reference log-probs, training, rung evaluations, the final
# evaluation; and inside that evaluation, trainers.evaluate: sampling, the gold reward, the SFT model's KL pass) and
# how fast it sampled: what `sweep status` and the report's cost section show per stage and method.
TRIAL_PHASES = ("time_load_s", "time_reference_s", "time_train_s", "time_rungs_s", "time_checkpoint_s", "time_eval_s")
EVAL_PHASES = ("time_generate_s", "time_reward_s", "time_kl_s")   # parts of time_eval_s
PHASE_SECONDS = (*TRIAL_PHASES, *EVAL_PHASES)
USAGE_METRICS = (*PHASE_SECONDS, "generated_tokens", "generated_tokens_per_s")


class TrialRecord(BaseModel):
    """A trial run as read back from MLflow (plain data for the orchestrator and analysis)."""
    model_config = ConfigDict(use_enum_values=True)  # status kept as its plain string, == RunStatus members
    run_id: str
    run_name: str
    trial_key: str
    stage: str
    method: str
    status: RunStatus
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: Optional[int] = None   # ms since the epoch
    end_time: Optional[int] = None


def run_status(mlflow_status: str, tags: dict[str, str]) -> RunStatus:
    """posweep's state of a run: MLflow's status, except that a FINISHED run early stopping ended (tag
    posweep.stopped_at_step) is STOPPED."""
    if mlflow_status == RunStatus.FINISHED and TAG_STOPPED_AT_STEP in tags:
        return RunStatus.STOPPED
    return RunStatus(mlflow_status)
