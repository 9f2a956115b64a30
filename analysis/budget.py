"""Budget curves: the best final score a method's search had found against the device-hours it had spent,
trial by trial in the order the trials ended; for a full grid and for an early-stopped sweep of the same grid.

Every trial with an outcome costs (a stopped or failed trial's hours are spent too); only FINISHED trials have
a final score. The grid's top 10% of a method is the score of its ⌈n/10⌉-th best of n finished runs: a search
"reaches the top 10%" when it has finished a run scoring at least that.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from analysis.robustness import finished_runs, in_states
from orchestrator.core.methods import METHODS
from orchestrator.core.runs import OUTCOMES, RunStatus
from orchestrator.core.spec import grid_fields

TOP_FRACTION = 0.1


def _settings(frame: pd.DataFrame, method: str) -> dict[tuple, str]:
    """The method's hyperparameter settings in `frame` (values of its grid fields, NaN as None) -> a run name."""
    runs = frame[frame["method"] == method]
    columns = [c for c in sorted(grid_fields(METHODS[method])) if c in runs]
    return {tuple(None if pd.isna(v) else float(v) for v in row): name
            for row, name in zip(runs[columns].itertuples(index=False), runs["run_name"])}


def grid_mismatch(frame: pd.DataFrame, grid_frame: pd.DataFrame, methods: Sequence[str]) -> Optional[str]:
    """Why `grid_frame` is not the full grid of the sweep in `frame` (a budget comparison against another grid
    prints shares and ranks that mean nothing): a method it lacks, or settings one has run and the other not,
    with an example. None when they ran the same settings of every method."""
    for method in methods:
        ours, theirs = _settings(frame, method), _settings(grid_frame, method)
        if not theirs:
            return f"it has no {method} trial"
        extra, missing = [ours[p] for p in ours if p not in theirs], [theirs[p] for p in theirs if p not in ours]
        if extra or missing:
            return (f"its {method} grid differs: " + ", ".join(
                part for part in (extra and f"{len(extra)} of this sweep's {len(ours)} settings are not in it "
                                            f"(e.g. {extra[0]})",
                                  missing and f"{len(missing)} of its {len(theirs)} settings were not run here "
                                              f"(e.g. {missing[0]})") if part))
    return None


def budget_curve(frame: pd.DataFrame, method: str, cost: str = "device_hours") -> pd.DataFrame:
    """One row per trial of `method` with an outcome, in the order they ended: `spent` (cumulative `cost`),
    `score` (its final mean_score; NaN unless FINISHED), `best` (the best score so far; NaN before the first),
    `status` and `run_name`."""
    runs = in_states(frame[frame["method"] == method], OUTCOMES)
    if "end_time" in runs:  # a hand-built frame without end times keeps its row order
        runs = runs.sort_values("end_time", kind="stable")
    score = runs["mean_score"].where(runs["status"] == RunStatus.FINISHED)
    return pd.DataFrame({"spent": runs[cost].fillna(0.0).cumsum().to_numpy(), "score": score.to_numpy(),
                         "best": score.cummax().ffill().to_numpy(),  # cummax leaves NaN where a trial has no score
                         "status": runs["status"].to_numpy(), "run_name": runs["run_name"].to_numpy()})


def budget_curves(sweeps: dict[str, pd.DataFrame], methods: Sequence[str], cost: str = "device_hours"
                  ) -> dict[str, dict[str, pd.DataFrame]]:
    """sweep name -> method -> budget_curve: what the figure draws and the table sums up."""
    return {name: {m: budget_curve(frame, m, cost) for m in methods} for name, frame in sweeps.items()}


def top_count(frame: pd.DataFrame, method: str, fraction: float = TOP_FRACTION) -> int:
    """How many of the method's finished runs its top `fraction` holds: ⌈fraction·n⌉ (0 without one)."""
    return math.ceil(fraction * int(finished_runs(frame, method)["mean_score"].notna().sum()))


def top_threshold(frame: pd.DataFrame, method: str, fraction: float = TOP_FRACTION) -> Optional[float]:
    """The score of the method's ⌈fraction·n⌉-th best of its n finished runs (None: no finished run)."""
    count = top_count(frame, method, fraction)
    if not count:
        return None
    return float(finished_runs(frame, method)["mean_score"].nlargest(count).iloc[-1])


def spent_to_reach(curve: pd.DataFrame, threshold: Optional[float]) -> Optional[float]:
    """The cost spent when the curve first reached `threshold` (None: never, or no threshold)."""
    if threshold is None:
        return None
    reached = curve[curve["best"] >= threshold]
    return float(reached["spent"].iloc[0]) if len(reached) else None


def rank_in(frame: pd.DataFrame, method: str, score: float) -> int:
    """1 + the number of the method's finished runs in `frame` scoring strictly more than `score`."""
    return 1 + int((finished_runs(frame, method)["mean_score"] > score).sum())


def _row(curve: pd.DataFrame, grid_frame: pd.DataFrame, method: str, grid_spent: float, cost: str) -> dict:
    """One method of one sweep against the grid (budget_table's columns)."""
    spent = float(curve["spent"].iloc[-1]) if len(curve) else 0.0
    picked = curve["score"].idxmax() if curve["score"].notna().any() else None
    rank = None if picked is None else rank_in(grid_frame, method, curve.loc[picked, "score"])
    return {"trials": len(curve), "stopped": int((curve["status"] == RunStatus.STOPPED).sum()),
            f"{cost} spent": spent, "share of the grid's": spent / grid_spent if grid_spent else float("nan"),
            "best run": None if picked is None else curve.loc[picked, "run_name"],
            "best score": float("nan") if picked is None else curve.loc[picked, "score"],
            "rank in the grid": rank,
            "in the grid's top 10%": None if rank is None else rank <= top_count(grid_frame, method),
            f"{cost} to reach it": spent_to_reach(curve, top_threshold(grid_frame, method))}


def budget_table(sweeps: dict[str, pd.DataFrame], curves: dict[str, dict[str, pd.DataFrame]], grid: str,
                 cost: str = "device_hours") -> pd.DataFrame:
    """Per method (those of `curves`, from budget_curves) and sweep (`grid` names the full grid among `sweeps`):
    trials and stopped ones, the cost spent and its share of the grid's, the best run found and its rank among
    the grid's finished runs, whether that is in the grid's top 10%, and the cost spent when the grid's top 10%
    (its score: `grid's top 10% from`) was first reached."""
    rows = []
    for method in next(iter(curves.values())):
        grid_curve = curves[grid][method]
        grid_spent = float(grid_curve["spent"].iloc[-1]) if len(grid_curve) else 0.0
        threshold = top_threshold(sweeps[grid], method)
        for name in sweeps:
            rows.append({"method": method, "sweep": name, "grid's top 10% from": threshold,
                         **_row(curves[name][method], sweeps[grid], method, grid_spent, cost)})
    table = pd.DataFrame(rows)
    return table.astype({"rank in the grid": "Int64"}) if len(table) else table
