"""Budget curves (analysis.budget) on hand-built frames, and the report's early-stopping sections."""

import math

import pandas as pd
import pytest

from analysis.budget import budget_curve, budget_curves, budget_table, rank_in, spent_to_reach, top_threshold


def frame(rows):
    """rows: (method, status, mean_score, device_hours, end_time)."""
    return pd.DataFrame([{"method": m, "status": s, "mean_score": score, "device_hours": hours, "end_time": end,
                          "run_name": f"{m} {i}"} for i, (m, s, score, hours, end) in enumerate(rows)])


GRID = frame([("dpo", "FINISHED", 1.0, 1.0, 10), ("dpo", "FINISHED", 3.0, 1.0, 20),
              ("dpo", "FAILED", None, 0.5, 30), ("dpo", "FINISHED", 2.0, 1.0, 40),
              ("dpo", "FINISHED", 4.0, 1.0, 50), ("dpo", "RUNNING", None, None, None)])
ASHA = frame([("dpo", "STOPPED", None, 0.25, 15), ("dpo", "FINISHED", 3.0, 1.0, 5), ("dpo", "STOPPED", None, 0.25, 25),
              ("dpo", "FINISHED", 4.0, 1.0, 35)])


def test_the_curve_accumulates_every_ended_trial_in_the_order_they_ended():
    curve = budget_curve(GRID, "dpo")
    assert list(curve["spent"]) == [1.0, 2.0, 2.5, 3.5, 4.5]               # the RUNNING trial costs nothing yet
    assert list(curve["best"]) == [1.0, 3.0, 3.0, 3.0, 4.0]
    asha = budget_curve(ASHA, "dpo")                                        # by end_time: 5, 15, 25, 35
    assert list(asha["spent"]) == [1.0, 1.25, 1.5, 2.5] and list(asha["best"]) == [3.0, 3.0, 3.0, 4.0]
    assert list(asha["status"]) == ["FINISHED", "STOPPED", "STOPPED", "FINISHED"]


def test_the_top_ten_percent_is_the_ceil_n_over_ten_th_best_finished_run():
    assert top_threshold(GRID, "dpo") == 4.0                                 # 4 finished: ceil(0.4) = the best
    many = frame([("dpo", "FINISHED", float(i), 1.0, i) for i in range(1, 21)])
    assert top_threshold(many, "dpo") == 19.0                                # 20 finished: the 2nd best
    assert top_threshold(GRID, "simpo") is None


def test_cost_to_reach_and_rank():
    assert spent_to_reach(budget_curve(GRID, "dpo"), 4.0) == 4.5
    assert spent_to_reach(budget_curve(ASHA, "dpo"), 4.0) == 2.5
    assert spent_to_reach(budget_curve(ASHA, "dpo"), 5.0) is None
    assert spent_to_reach(budget_curve(ASHA, "dpo"), None) is None
    assert rank_in(GRID, "dpo", 4.0) == 1 and rank_in(GRID, "dpo", 2.5) == 3


def test_the_table_sets_each_sweep_against_the_grid():
    sweeps = {"asha": ASHA, "grid": GRID}
    table = budget_table(sweeps, budget_curves(sweeps, ["dpo"]), grid="grid").set_index("sweep")
    assert table.loc["asha", "device_hours spent"] == 2.5 and table.loc["grid", "device_hours spent"] == 4.5
    assert table.loc["asha", "share of the grid's"] == pytest.approx(2.5 / 4.5)
    assert table.loc["asha", "stopped"] == 2 and table.loc["asha", "trials"] == 4
    assert table.loc["asha", "rank in the grid"] == 1 and table.loc["asha", "best score"] == 4.0
    assert table.loc["asha", "device_hours to reach it"] == 2.5 and table.loc["grid", "device_hours to reach it"] == 4.5
    assert not math.isnan(table.loc["grid", "grid's top 10% from"])


def settings(method, points):
    """One finished run per (beta, learning_rate) point, named as the trial would be."""
    return pd.DataFrame([{"method": method, "status": "FINISHED", "beta": b, "learning_rate": lr, "epochs": 1.0,
                          "run_name": f"{method} b={b} lr={lr}"} for b, lr in points])


def test_a_budget_comparison_needs_the_same_grid():
    from analysis.budget import grid_mismatch

    points = [(0.1, 1e-4), (0.3, 1e-4)]
    assert grid_mismatch(settings("dpo", points), settings("dpo", points[::-1]), ["dpo"]) is None
    assert grid_mismatch(settings("dpo", points), settings("simpo", points), ["dpo"]) == "it has no dpo trial"
    other = grid_mismatch(settings("dpo", points), settings("dpo", [(0.1, 1e-4), (0.5, 3e-4)]), ["dpo"])
    assert other == ("its dpo grid differs: 1 of this sweep's 2 settings are not in it (e.g. dpo b=0.3 lr=0.0001), "
                     "1 of its 2 settings were not run here (e.g. dpo b=0.5 lr=0.0003)")
