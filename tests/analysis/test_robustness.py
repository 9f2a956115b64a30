"""Robustness analysis on hand-built numbers with known answers."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis.robustness import best_of_k_curve, curve_ks, expected_best_of_k, pareto_front, probability_beats, table1
from analysis.summary import trials_frame


def test_expected_best_of_k_by_hand():
    # {1,2,3}, k=2: draws (1,2)->2, (1,3)->3, (2,3)->3: (2+3+3)/3
    assert expected_best_of_k([3, 1, 2], 0, 2) == (pytest.approx(8 / 3), 0.0)
    assert expected_best_of_k([1, 2, 3], 0, 1)[0] == pytest.approx(2.0)
    assert expected_best_of_k([1, 2, 3], 0, 3)[0] == pytest.approx(3.0)
    # one failed config F among {F, 1, 3}: k=2 draws (F,1)->1, (F,3)->3, (1,3)->3
    assert expected_best_of_k([1, 3], 1, 2) == (pytest.approx(7 / 3), 0.0)
    # k=1: F (1/3 of draws, nothing), 1, 3: the expected best over draws with a result is 2
    mean, p_fail = expected_best_of_k([1, 3], 1, 1)
    assert mean == pytest.approx(2.0) and p_fail == pytest.approx(1 / 3)
    assert math.isnan(expected_best_of_k([], 2, 1)[0])
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        expected_best_of_k([1, 2, 3], 0, 4)


def test_expected_best_of_k_matches_enumerating_every_draw():
    rng = np.random.default_rng(1)
    scores, n_failed = list(rng.normal(size=7)), 2
    configs = scores + [None] * n_failed
    for k in range(1, 10):
        bests = [max(s for s in draw if s is not None) for draw in itertools.combinations(configs, k)
                 if any(s is not None for s in draw)]
        mean, p_fail = expected_best_of_k(scores, n_failed, k)
        assert mean == pytest.approx(np.mean(bests))
        assert p_fail == pytest.approx(1 - len(bests) / math.comb(9, k))


def test_best_of_k_curve_rises_and_its_band_holds_the_estimate():
    curve = best_of_k_curve([0.1, 0.5, 0.2, 0.9, 0.4], n_failed=1, n_boot=300, seed=0)
    assert list(curve["k"]) == [1, 2, 3, 4, 5, 6]
    assert curve["expected_best"].is_monotonic_increasing
    assert curve["expected_best"].iloc[-1] == pytest.approx(0.9)
    assert ((curve["low"] <= curve["expected_best"] + 1e-12) & (curve["expected_best"] <= curve["high"] + 1e-12)).all()
    again = best_of_k_curve([0.1, 0.5, 0.2, 0.9, 0.4], n_failed=1, n_boot=300, seed=0)
    pd.testing.assert_frame_equal(curve, again)


def test_probability_beats_counts_ties_half_and_failures_as_losses():
    assert probability_beats([1, 2, 3], 1, baseline=2) == pytest.approx((1 + 0.5) / 4)
    assert math.isnan(probability_beats([], 0, baseline=0))  # no configs


def test_pareto_front_keeps_runs_no_other_run_beats_on_score_and_kl():
    runs = pd.DataFrame({"run_name": list("ABCDE"), "mean_score": [1.0, 2.0, 1.5, 3.0, 2.0],
                         "kl": [0.1, 0.5, 0.6, 1.0, 0.7]})
    assert list(pareto_front(runs)["run_name"]) == ["A", "B", "D"]


def record(method, name, status, score, **metrics):
    return {"stage": method, "method": method, "run_name": name, "status": status, "trial_key": name,
            "metrics": {"mean_score": score, **metrics} if status == "FINISHED" else {}}


def test_table1_relative_to_dpo_on_a_three_method_toy():
    frame = trials_frame([
        record("dpo", "d1", "FINISHED", 2.0, win_vs_chosen=0.4, kl=1.0, length=10.0, win_vs_sft=0.6),
        record("dpo", "d2", "FINISHED", 1.0, win_vs_chosen=0.3, kl=0.5, length=8.0, win_vs_sft=0.5),
        record("simpo", "s1", "FINISHED", 3.0, win_vs_chosen=0.5, kl=2.0, length=15.0, win_vs_sft=0.7),
        record("simpo", "s2", "FAILED", 0.0),
        record("ln_dpo", "l1", "FAILED", 0.0)])
    table = table1(frame, ["dpo", "simpo", "ln_dpo"]).set_index("method")
    assert table.loc["dpo", "run_name"] == "d1" and table.loc["simpo", "run_name"] == "s1"
    assert table.loc["simpo", "mean_score_vs_dpo"] == pytest.approx(0.5)      # (3 - 2) / 2
    assert table.loc["simpo", "length_vs_dpo"] == pytest.approx(0.5)          # (15 - 10) / 10
    assert table.loc["simpo", "kl_vs_dpo"] == pytest.approx(1.0)
    assert table.loc["dpo", "mean_score_vs_dpo"] == 0
    assert table.loc["simpo", ["finished", "failed"]].tolist() == [1, 1]
    assert table.loc["ln_dpo", "finished"] == 0 and table.loc["ln_dpo", "failed"] == 1
    assert math.isnan(table.loc["ln_dpo", "mean_score_vs_dpo"])


def test_run_at_quantile_uses_nearest_rank_among_finished_runs():
    frame = trials_frame([record("dpo", f"d{i}", "FINISHED", float(i)) for i in range(1, 9)]
                         + [record("dpo", "dx", "FAILED", 0.0)])
    from analysis.robustness import run_at_quantile
    assert run_at_quantile(frame, "dpo", 1.0)["run_name"] == "d8"
    assert run_at_quantile(frame, "dpo", 0.75)["run_name"] == "d6"   # ceil(0.75 * 8) = 6th lowest
    assert run_at_quantile(frame, "simpo", 0.75) is None


def test_head_to_head_by_hand_and_its_paired_bootstrap():
    from analysis.robustness import head_to_head
    a = pd.Series([3.0, 1.0, 2.0, 5.0], index=[10, 11, 12, 13])
    b = pd.Series([1.0, 1.0, 4.0, 0.0, 9.0], index=[10, 11, 12, 13, 99])   # prompt 99: only B has it
    result = head_to_head(a, b, n_boot=500)
    assert result["prompts"] == 4
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert 0 <= result["low"] <= result["win_rate"] <= result["high"] <= 1
    mirror = head_to_head(b, a, n_boot=500)
    assert mirror["win_rate"] == pytest.approx(1 - result["win_rate"])
    same = head_to_head(a, a)
    assert same["win_rate"] == same["low"] == same["high"] == 0.5
    with pytest.raises(ValueError, match="share no evaluation prompt"):
        head_to_head(a, pd.Series([1.0], index=[7]))


def test_table3_at_the_best_and_the_75th_percentile_run():
    from analysis.robustness import table3
    frame = trials_frame([record("dpo", "d1", "FINISHED", 1.0), record("dpo", "d2", "FINISHED", 2.0),
                          record("simpo", "s1", "FINISHED", 3.0), record("simpo", "s2", "FINISHED", 0.5)])
    prompts = [0, 1, 2, 3]
    samples = {"d1": pd.Series([1, 1, 1, 1.0], index=prompts), "d2": pd.Series([2, 2, 2, 2.0], index=prompts),
               "s1": pd.Series([3, 3, 0, 2.0], index=prompts), "s2": pd.Series([0, 0, 0, 0.0], index=prompts)}
    best = table3(frame, samples, ["dpo", "simpo"], q=1.0, n_boot=200).set_index(["method", "opponent"])
    assert best.loc[("simpo", "dpo"), ["run", "opponent_run"]].tolist() == ["s1", "d2"]
    assert best.loc[("simpo", "dpo"), "win_rate"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert best.loc[("dpo", "simpo"), "win_rate"] == pytest.approx(1 - 2.5 / 4)
    q75 = table3(frame, samples, ["dpo", "simpo"], q=0.75, n_boot=200).set_index(["method", "opponent"])
    # ceil(0.75 * 2) = 2nd lowest of two runs: the best run again; with q=0.5 the lower one
    assert q75.loc[("simpo", "dpo"), "run"] == "s1"
    low = table3(frame, samples, ["dpo", "simpo"], q=0.5, n_boot=200).set_index(["method", "opponent"])
    assert low.loc[("simpo", "dpo"), ["run", "opponent_run", "win_rate"]].tolist() == ["s2", "d1", 0.0]


def test_cost_to_reach_counts_expected_draws_without_replacement():
    from analysis.robustness import cost_to_reach
    frame = trials_frame([record("dpo", f"d{i}", "FINISHED", float(i)) for i in range(4)]
                         + [record("dpo", "dx", "FAILED", 0.0)])
    frame["gpu_hours"] = [1.0, 1.0, 1.0, 1.0, 0.5]
    # 5 configs, 1 reaches score 3: (5+1)/(1+1) = 3 draws x 0.9 GPU-h mean
    assert cost_to_reach(frame, "dpo", 3.0, "gpu_hours") == pytest.approx(3 * 0.9)
    assert cost_to_reach(frame, "dpo", 9.0, "gpu_hours") is None


def test_trials_to_reach_by_hand_and_running_trials_are_no_draw():
    from analysis.robustness import cost_to_reach, trials_to_reach
    frame = trials_frame([record("dpo", f"d{i}", "FINISHED", float(i)) for i in range(4)]
                         + [record("dpo", "dx", "FAILED", 0.0), record("dpo", "live", "RUNNING", 0.0)])
    frame["device_hours"] = [1.0, 1.0, 1.0, 1.0, 0.5, 7.0]
    # 5 configs with an outcome (the running one is not a draw yet), 2 reach 2.0: (5+1)/(2+1) = 2 draws
    assert trials_to_reach(frame, "dpo", 2.0) == pytest.approx(2.0)
    assert cost_to_reach(frame, "dpo", 2.0, "device_hours") == pytest.approx(2.0 * 0.9)
    assert trials_to_reach(frame, "dpo", 9.0) is None


def test_table1_appends_reference_rows_relative_to_dpo():
    frame = trials_frame([record("dpo", "d1", "FINISHED", 2.0, length=10.0)])
    table = table1(frame, ["dpo"], baselines={"SFT (selected)": {"run_name": "sft", "mean_score": 1.0, "length": 5.0},
                                              "chosen responses": {"mean_score": 3.0}}).set_index("method")
    assert list(table.index) == ["dpo", "SFT (selected)", "chosen responses"]
    assert table.loc["SFT (selected)", "mean_score_vs_dpo"] == pytest.approx(-0.5)   # (1 - 2) / 2
    assert table.loc["chosen responses", "mean_score_vs_dpo"] == pytest.approx(0.5)
    assert table.loc["SFT (selected)", "length_vs_dpo"] == pytest.approx(-0.5)
    assert math.isnan(table.loc["chosen responses", "length"])


def test_edge_of_grid_names_each_extreme_the_best_run_sits_on():
    from analysis.robustness import edge_of_grid
    frame = trials_frame([record("simpo", f"s{i}", "FINISHED", score) for i, score in enumerate([1.0, 3.0, 2.0, 0.5])]
                         + [record("simpo", "sx", "FAILED", 0.0)])
    frame["learning_rate"] = [1e-4, 1e-4, 3e-4, 3e-4, 1e-5]   # the failed run tried a lower rate: part of the grid
    frame["beta"] = [2.0, 2.5, 2.0, 2.5, 2.0]
    frame["gamma"] = [0.5] * 5                                  # one value: no edge to speak of
    assert edge_of_grid(frame, "simpo", ["learning_rate", "beta", "gamma"]) == ["beta 2.5 (highest of 2)"]
    frame.loc[frame.run_name == "s1", "beta"] = 2.2
    assert edge_of_grid(frame, "simpo", ["learning_rate", "beta", "gamma"]) == []
    assert edge_of_grid(frame, "dpo", ["beta"]) == []            # no finished run


def test_expected_best_of_k_holds_for_a_method_of_thousands_of_runs():
    """A report of 10,000 runs (3,333 per method) raised OverflowError: C(3333, k) has ~1,000 digits. The log-space
    weights match exact rational arithmetic where it is still feasible, and the curve's default k stay few."""
    from fractions import Fraction

    rng = np.random.default_rng(2)
    scores, n_failed = list(rng.normal(size=397)), 3
    for k in (1, 7, 150, 400):
        total = math.comb(400, k)
        exact = sum(Fraction(math.comb(n_failed + j, k - 1), total) * Fraction(s)
                    for j, s in enumerate(sorted(scores)))
        all_failed = Fraction(math.comb(n_failed, k), total) if n_failed >= k else Fraction(0)
        mean, p_fail = expected_best_of_k(scores, n_failed, k)
        assert mean == pytest.approx(float(exact / (1 - all_failed)), rel=1e-9)
        assert p_fail == pytest.approx(float(all_failed), abs=1e-12)
    big = sorted(rng.normal(size=3333))
    best_of_half = expected_best_of_k(big, 0, 1666)[0]  # the best of any 1,666 is at least the 1,666th smallest
    assert big[1665] < best_of_half < big[-1]
    ks = curve_ks(3333)
    assert ks[:50] == list(range(1, 51)) and ks[-1] == 3333 and len(ks) < 100
    assert curve_ks(100) == list(range(1, 101))
