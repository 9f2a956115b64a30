"""End-of-sweep summary: the untrained model, the best SFT trial and the best trial of each method.

Pure pandas over plain records (what orchestrator.runtime (the MLflow adapter) reads back); no MLflow here.
"""

from __future__ import annotations

from typing import Iterable, Optional

import pandas as pd

from analysis.frames import METRIC_COLUMNS, sweep_frame
from analysis.robustness import best_first_order
from orchestrator.core.runs import PHASE_SECONDS, RunStatus


def trials_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per trial: stage, method, run_name, status, trial_key and the metric columns (NaN if absent)."""
    return sweep_frame(records, [])[["stage", "method", "run_name", "status", "trial_key", *METRIC_COLUMNS]]


def best_of_stage(frame: pd.DataFrame, stage: str, by: str = "mean_score") -> Optional[pd.Series]:
    """The stage's best FINISHED trial by `by`, ties by runs.best_first (None when none finished with a value)."""
    done = frame[(frame["stage"] == stage) & (frame["status"] == RunStatus.FINISHED)].dropna(subset=[by])
    return best_first_order(done, by).iloc[0] if len(done) else None


class WholeTable(pd.DataFrame):
    """A DataFrame that prints every row and column (pandas cuts a wide frame to the terminal's width with '...':
    `print(outcome.summary)` showed `mean_score ... length`)."""

    @property
    def _constructor(self):
        return WholeTable

    def __repr__(self) -> str:
        return self.to_string()


def best_per_stage(frame: pd.DataFrame, stage_order: list[str], by: str = "mean_score") -> pd.DataFrame:
    """The best FINISHED trial of each stage by `by`, in `stage_order`, with finished/failed counts (and stopped,
    when early stopping ended any). Failed and stopped trials are counted, never silently dropped."""
    rows = []
    with_stopped = bool((frame["status"] == RunStatus.STOPPED).any()) if len(frame) else False
    for stage in stage_order:
        trials = frame[frame["stage"] == stage]
        counts = {"finished": int((trials["status"] == RunStatus.FINISHED).sum()),
                  "failed": int((trials["status"] == RunStatus.FAILED).sum()),
                  **({"stopped": int((trials["status"] == RunStatus.STOPPED).sum())} if with_stopped else {})}
        best = best_of_stage(frame, stage, by)
        if best is None:
            rows.append({"stage": stage, "best run": "(none finished)", **counts})
            continue
        rows.append({"stage": stage, "best run": best["run_name"], **{m: best[m] for m in METRIC_COLUMNS},
                     **counts})
    return WholeTable(rows, columns=["stage", "best run", *METRIC_COLUMNS, "finished", "failed",
                                     *(["stopped"] if with_stopped else [])])


def format_summary(table: pd.DataFrame) -> str:
    """Fixed-width text; metrics a trial does not have (win_vs_sft of the SFT stage itself) show as '-'."""
    return table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")


def time_split(frame: pd.DataFrame, by: str = "stage", order: Optional[list[str]] = None) -> pd.DataFrame:
    """Where a finished trial's time goes, per `by` group (stage or method, in `order` when given): the mean seconds
    of each phase (load, reference, train, rungs, eval; eval = generate + reward + KL + the rest) over its
    finished trials, and the tokens it sampled per second of sampling (all its finished trials together). Phases
    no trial logged are left out; a group without a finished trial is left out."""
    done = frame[frame["status"] == RunStatus.FINISHED]
    phases = [p for p in PHASE_SECONDS if p in done.columns and done[p].notna().any()]
    groups = dict(tuple(done.groupby(by, sort=False)))
    rows = []
    for group in [g for g in (order or []) if g in groups] + [g for g in groups if g not in (order or [])]:
        trials = groups[group]
        row = {by: group, "trials": len(trials),
               **{p.removeprefix("time_").removesuffix("_s") + " s": trials[p].mean() for p in phases}}
        if "generated_tokens" in trials and trials["time_generate_s"].sum() > 0:
            row["generated tokens/s"] = trials["generated_tokens"].sum() / trials["time_generate_s"].sum()
        rows.append(row)
    return pd.DataFrame(rows)
