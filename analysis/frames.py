"""Typed frames of a sweep for analysis: one row per trial, and one row per (trial, evaluation prompt).

Pure pandas over the plain records tracking returns (orchestrator.core.runs.TrialRecord dumps and the per-sample
dicts of each run's samples.json); nothing here talks to MLflow.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from orchestrator.core.runs import TRIAL_METRICS, USAGE_METRICS

METRIC_COLUMNS = list(TRIAL_METRICS)
COST_COLUMNS = ["wall_seconds", "gpu_hours", "device_hours"]
USAGE_COLUMNS = list(USAGE_METRICS)
SAMPLE_COLUMNS = ["prompt_id", "score", "length", "kl", "sft_score", "chosen_score"]


def _number(text):
    """A param as MLflow holds it (text) -> int or float when it is one, else the text."""
    for parse in (int, float):
        try:
            return parse(text)
        except (TypeError, ValueError):
            continue
    return text


def sweep_frame(records: Iterable[dict], hyperparameters: Iterable[str]) -> pd.DataFrame:
    """One row per trial: stage, method, run_name, status, trial_key, each of `hyperparameters` as a number
    (NaN where a method does not have it), the evaluation metrics, the cost metrics, where its time went (usage),
    the failure reason and when the run ended (ms since the epoch; None while it runs).
    Failed trials keep their row (metrics NaN), so counts and denominators include them."""
    hp = list(hyperparameters)
    rows = []
    for r in records:
        metrics, params, tags = r["metrics"], r.get("params", {}), r.get("tags", {})
        rows.append({"stage": r["stage"], "method": r["method"], "run_name": r["run_name"], "status": r["status"],
                     "trial_key": r["trial_key"],
                     **{k: _number(params[k]) if k in params else float("nan") for k in hp},
                     **{m: metrics.get(m, float("nan")) for m in METRIC_COLUMNS + COST_COLUMNS + USAGE_COLUMNS},
                     "failure": tags.get("posweep.failure"), "end_time": r.get("end_time")})
    columns = ["stage", "method", "run_name", "status", "trial_key", *hp, *METRIC_COLUMNS, *COST_COLUMNS,
               *USAGE_COLUMNS, "failure", "end_time"]
    return pd.DataFrame(rows, columns=columns)


def samples_frame(samples_by_key: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per (trial_key, prompt): the generation's gold score, length and KL, and the SFT and chosen
    responses' scores on that prompt (NaN where a trial has no such value, e.g. KL for SFT trials)."""
    rows = [{"trial_key": key, **{c: s.get(c, float("nan")) for c in SAMPLE_COLUMNS}}
            for key, samples in samples_by_key.items() for s in samples]
    frame = pd.DataFrame(rows, columns=["trial_key", *SAMPLE_COLUMNS])
    return frame.astype({c: float for c in SAMPLE_COLUMNS if c != "prompt_id"})
