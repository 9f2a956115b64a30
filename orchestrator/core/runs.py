"""The states of a run and every set of them, named once (a grep for a set's name finds its one definition):

    OUTCOMES       ran to an end (FINISHED, FAILED, STOPPED): what a sweep has paid for (cost, a search's budget,
                   what Optuna was told); KILLED and RUNNING runs run again
    DRAWS          the draws a method's robustness statistics are over (FINISHED, FAILED)
    resume_done    whether a run makes its key done, so a rerun skips it (FINISHED; STOPPED under the same rule)
    latest_per_key which of a key's runs stands for it (FINISHED, else STOPPED, else the most recent)

RunStatus is a str enum: RunStatus.FINISHED == "FINISHED", so statuses read back from MLflow or from a frame's
status column compare with it directly."""

from __future__ import annotations

import math
from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict

from orchestrator.core.tags import TAG_STOPPED_AT_STEP, TAG_STOPPED_UNDER


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

# The draws a method's statistics are over. A RUNNING trial of a sweep still in progress (or KILLED, to run
# again) is neither a success nor a failure; a STOPPED one (early stopping) has no final score and was not
# drawn at random either: it is left out, and the report says so (analysis.report._early_stopping).
DRAWS = (RunStatus.FINISHED, RunStatus.FAILED)


def resume_done(record: TrialRecord, stopping: Optional[str]) -> bool:
    """Whether a run makes its key done, so a rerun of the sweep skips it: FINISHED; or STOPPED under the early-
    stopping rule the sweep stops by now (`stopping`: early_stopping.stop_signature of the spec, None without
    early stopping; the run's rule is its posweep.stopped_under tag). A trial stopped under other rung settings,
    another η, or before early stopping was turned off runs again, to the end or to its own stop."""
    return record.status == RunStatus.FINISHED or (
        record.status == RunStatus.STOPPED and stopping is not None
        and record.tags.get(TAG_STOPPED_UNDER) == stopping)

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
    artifact_uri: Optional[str] = None  # where its artifacts are (MLflow's run.info.artifact_uri)


def run_status(mlflow_status: str, tags: dict[str, str]) -> RunStatus:
    """posweep's state of a run: MLflow's status, except that a FINISHED run early stopping ended (tag
    posweep.stopped_at_step) is STOPPED."""
    if mlflow_status == RunStatus.FINISHED and TAG_STOPPED_AT_STEP in tags:
        return RunStatus.STOPPED
    return RunStatus(mlflow_status)


# Which run of a key stands for it: FINISHED before STOPPED before any other (then the most recent).
_PRECEDENCE = {RunStatus.FINISHED: 0, RunStatus.STOPPED: 1}


def latest_per_key(records: list[TrialRecord]) -> list[TrialRecord]:
    """One record per key: its FINISHED run if any, else its STOPPED one, else its most recent run (records come
    newest first)."""
    by_key: dict[str, TrialRecord] = {}
    rank = lambda r: _PRECEDENCE.get(r.status, 2)  # noqa: E731
    for record in records:
        kept = by_key.get(record.trial_key)
        if kept is None or rank(record) < rank(kept):
            by_key[record.trial_key] = record
    return list(by_key.values())


def running_per_key(records: list[TrialRecord]) -> list[TrialRecord]:
    """The keys whose standing run (latest_per_key) is RUNNING, one record each: running now, or left so by a
    driver that died. Such a key has no FINISHED or STOPPED run, and no ended run newer than that one."""
    return [r for r in latest_per_key(records) if r.status == RunStatus.RUNNING]


def ended(records: list[TrialRecord]) -> list[TrialRecord]:
    """The keys that ran to an outcome (OUTCOMES), one record each (latest_per_key)."""
    return [r for r in latest_per_key(records) if r.status in OUTCOMES]
