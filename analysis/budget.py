"""Budget curves: the best final score a method's search had found against the device-hours it had spent,
trial by trial in the order the trials ended; for a full grid and for an early-stopped sweep of the same grid.

Every trial with an outcome costs (a stopped or failed trial's hours are spent too); only FINISHED trials have
a final score. The grid's top 10% of a method is the score of its ⌈n/10⌉-th best of n finished runs: a search
"reaches the top 10%" when it has finished a run scoring at least that.
"""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from analysis.robustness import finished_runs, ran_to_an_end
from orchestrator.contract.runs import RunStatus

TOP_FRACTION = 0.1


def budget_curve(frame: pd.DataFrame, method: str, cost: str = "device_hours") -> pd.DataFrame:
    """One row per trial of `method` with an outcome, in the order they ended: `spent` (cumulative `cost`),
    `best` (the best final mean_score among the FINISHED ones so far; NaN before the first), `status`."""
    runs = ran_to_an_end(frame[frame["method"] == method])
    if "end_time" in runs:  # a hand-built frame without end times keeps its row order
        runs = runs.sort_values("end_time", kind="stable")
    finished = runs["status"] == RunStatus.FINISHED
    best = runs["mean_score"].where(finished).cummax().ffill()  # cummax leaves NaN where a trial has no score
    return pd.DataFrame({"spent": runs[cost].fillna(0.0).cumsum().to_numpy(), "best": best.to_numpy(),
                         "status": runs["status"].to_numpy(), "run_name": runs["run_name"].to_numpy()})


def top_threshold(frame: pd.DataFrame, method: str, fraction: float = TOP_FRACTION) -> Optional[float]:
    """The score of the method's ⌈fraction·n⌉-th best of its n finished runs (None: no finished run)."""
    scores = finished_runs(frame, method)["mean_score"].dropna().sort_values(ascending=False)
    if scores.empty:
        return None
    return float(scores.iloc[math.ceil(fraction * len(scores)) - 1])


def spent_to_reach(curve: pd.DataFrame, threshold: Optional[float]) -> Optional[float]:
    """The cost spent when the curve first reached `threshold` (None: never, or no threshold)."""
    if threshold is None:
        return None
    reached = curve[curve["best"] >= threshold]
    return float(reached["spent"].iloc[0]) if len(reached) else None


def rank_in(frame: pd.DataFrame, method: str, score: float) -> int:
    """1 + the number of the method's finished runs in `frame` scoring strictly more than `score`."""
    return 1 + int((finished_runs(frame, method)["mean_score"] > score).sum())


def budget_table(sweeps: dict[str, pd.DataFrame], methods: list[str], grid: str,
                 cost: str = "device_hours") -> pd.DataFrame:
    """Per method and sweep (name -> frame; `grid` names the full grid among them): the cost spent, the best
    final score found and its rank within the grid, the cost at which the grid's top 10% was first reached,
    and the cost spent as a share of the grid's."""
    rows = []
    for method in methods:
        threshold = top_threshold(sweeps[grid], method)
        grid_spent = budget_curve(sweeps[grid], method, cost)["spent"].max()
        for name, frame in sweeps.items():
            curve = budget_curve(frame, method, cost)
            best = curve["best"].max() if len(curve) else float("nan")
            rows.append({"method": method, "sweep": name, "trials": len(curve),
                         "stopped": int((curve["status"] == RunStatus.STOPPED).sum()),
                         f"{cost} spent": curve["spent"].max() if len(curve) else 0.0,
                         "share of the grid's": (curve["spent"].max() / grid_spent
                                                 if len(curve) and grid_spent else float("nan")),
                         "best score": best,
                         "rank in the grid": rank_in(sweeps[grid], method, best) if not pd.isna(best) else None,
                         "grid's top 10% from": threshold,
                         f"{cost} to reach it": spent_to_reach(curve, threshold)})
    table = pd.DataFrame(rows)
    return table.astype({"rank in the grid": "Int64"}) if len(table) else table
