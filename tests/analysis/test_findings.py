"""The paper's findings F1-F5 checked on hand-built sweeps, one per verdict: holds, fails, mixed, not testable;
and tied to the report's Table 1 and head-to-head tables (the same runs, the same numbers)."""

import pandas as pd
import pytest

from analysis.findings import (FAILS, HOLDS, MIXED, NOT_TESTABLE, Comparison, check_findings, median_shift,
                               paired_difference)
from analysis.frames import samples_frame, sweep_frame
from analysis.robustness import table1, table3

PROMPTS = range(30)
RUNS = 8


def robust(i, p):
    """A method the paper describes: best run as good as DPO's, runs below it barely worse, shorter answers
    (5 tokens at the best run, 9 below it), lower KL."""
    return {"score": 1.0 - 0.05 * i + 0.01 * (p % 3), "length": 5.0 + (4.0 if i else 0.0) + p % 2,
            "kl": 0.5 + 0.1 * i + 0.01 * (p % 2)}


def dpo(i, p):
    """DPO: the same best run, then scores that fall fast (0.5 per rank), 10 tokens, KL 1."""
    return {"score": 1.0 - 0.5 * i + 0.01 * (p % 3), "length": 10.0 + p % 2, "kl": 1.0 + 0.1 * i + 0.01 * (p % 2)}


def fragile(i, p):
    """The opposite of the paper: best run far below DPO's, runs below it fall faster, longer, higher KL."""
    return {"score": 0.2 - 0.8 * i + 0.01 * (p % 3), "length": 20.0 - (4.0 if i else 0.0) + p % 2,
            "kl": 2.0 + 0.1 * i + 0.01 * (p % 2)}


def sweep(**behaviours):
    """A sweep frame and samples frame: RUNS runs per method (rank i = 0 is the best), metrics the means of
    the samples, as trainers.evaluate logs them."""
    records, samples = [], {}
    for method, behaviour in behaviours.items():
        for i in range(RUNS):
            key = f"{method}{i}"
            rows = [{"prompt_id": p, **behaviour(i, p), "chosen_score": 0.0, "sft_score": 0.0} for p in PROMPTS]
            samples[key] = rows
            metrics = {m: sum(r[m] for r in rows) / len(rows) for m in ("score", "length", "kl")}
            records.append({"stage": method, "method": method, "run_name": key, "status": "FINISHED",
                            "trial_key": key, "params": {},
                            "metrics": {"mean_score": metrics["score"], "length": metrics["length"],
                                        "kl": metrics["kl"], "win_vs_chosen": 0.5, "win_vs_sft": 0.5},
                            "tags": {}})
    return sweep_frame(records, []), samples_frame(samples)


def verdicts(frame, samples, methods):
    return {f.key: f.verdict for f in check_findings(frame, samples, methods, n_boot=200)}


def test_every_finding_holds_on_a_sweep_shaped_like_the_paper():
    frame, samples = sweep(dpo=dpo, simpo=robust, ln_dpo=robust)
    found = check_findings(frame, samples, ["dpo", "simpo", "ln_dpo"], n_boot=200)
    assert {f.key: f.verdict for f in found} == {k: HOLDS for k in ("F1", "F2", "F3", "F4", "F5")}
    f1 = {c.label: c for c in found[0].comparisons}
    assert f1["simpo length"].estimate == pytest.approx(5.5 - 10.5)             # best runs, means over prompts
    assert f1["simpo score"].estimate == 0 and f1["simpo score"].supports      # alike: zero inside
    f4 = {c.label: c for c in found[3].comparisons}
    # top 25% = ceil(0.25 x 8) = 2 runs: gap (5.5 + 9.5)/2 - 10.5 = -3 against -5 at the top 1%: fades by 2
    assert f4["simpo length gap, top 25% minus top 1%"].estimate == pytest.approx(2.0)


def test_every_finding_fails_on_the_opposite_sweep():
    frame, samples = sweep(dpo=dpo, simpo=fragile, ln_dpo=fragile)
    assert verdicts(frame, samples, ["dpo", "simpo", "ln_dpo"]) == {k: FAILS for k in ("F1", "F2", "F3", "F4", "F5")}


def test_findings_are_mixed_when_one_method_agrees_and_the_other_does_not():
    frame, samples = sweep(dpo=dpo, simpo=robust, ln_dpo=fragile)
    assert verdicts(frame, samples, ["dpo", "simpo", "ln_dpo"]) == {k: MIXED for k in ("F1", "F2", "F3", "F4", "F5")}


def test_not_testable_without_dpo_without_a_length_normalised_method_or_without_kl():
    frame, samples = sweep(dpo=dpo, simpo=robust)
    frame.loc[frame.method == "dpo", "status"] = "FAILED"
    found = check_findings(frame, samples, ["dpo", "simpo"], n_boot=50)
    assert {f.verdict for f in found} == {NOT_TESTABLE} and found[0].untestable == "no finished DPO run"
    frame, samples = sweep(dpo=dpo, ipo=robust)
    assert {f.untestable for f in check_findings(frame, samples, ["dpo", "ipo"])} == {"no finished SimPO or LN-DPO run"}
    frame, samples = sweep(dpo=dpo, simpo=robust)
    samples["kl"] = float("nan")  # no SFT stage: no KL
    found = {f.key: f for f in check_findings(frame, samples, ["dpo", "simpo"], n_boot=50)}
    assert found["F5"].verdict == NOT_TESTABLE and "no kl" in found["F5"].untestable
    assert found["F1"].verdict == HOLDS and not [c for c in found["F1"].comparisons if "KL" in c.label]


def test_the_findings_use_table_1s_and_the_head_to_head_tables_numbers():
    """F1's differences are Table 1's metric differences between the best runs; F2's are Tables 2-3's."""
    frame, samples = sweep(dpo=dpo, simpo=robust, ln_dpo=fragile)
    found = {f.key: f for f in check_findings(frame, samples, ["dpo", "simpo", "ln_dpo"], n_boot=300)}
    t1 = table1(frame, ["dpo", "simpo", "ln_dpo"]).set_index("method")
    for comparison in found["F1"].comparisons:
        method, quantity = comparison.label.split(" ")
        column = {"score": "mean_score", "length": "length", "KL": "kl"}[quantity]
        assert comparison.estimate == pytest.approx(t1.loc[method, column] - t1.loc["dpo", column])
    scores = {k: g.set_index("prompt_id")["score"] for k, g in samples.groupby("trial_key")}
    for q, where in ((1.0, "best"), (0.75, "75th pct")):
        t3 = table3(frame, scores, ["dpo", "simpo", "ln_dpo"], q, n_boot=300).set_index(["method", "opponent"])
        for method in ("simpo", "ln_dpo"):
            [c] = [c for c in found["F2"].comparisons if c.label == f"dpo vs {method} at the {where} run"]
            row = t3.loc[("dpo", method)]
            assert (c.estimate, c.low, c.high) == pytest.approx((row.win_rate - 0.5, row.low - 0.5, row.high - 0.5))


def test_comparison_support_rule_and_text():
    assert Comparison("x", -0.2, -0.3, -0.1, -1).supports and not Comparison("x", -0.2, -0.3, 0.1, -1).supports
    assert Comparison("x", 0.2, 0.1, 0.3, 1).supports and not Comparison("x", 0.2, 0.1, 0.3, -1).supports
    assert Comparison("x", 0.0, -0.1, 0.1, 0).supports and not Comparison("x", 0.2, 0.1, 0.3, 0).supports
    assert Comparison("simpo length", -1.25, -2.0, -0.5, -1, "tokens").text() == "simpo length -1.25 [-2.00, -0.50] tokens"
    assert Comparison("simpo score", 0.3, -0.1, 0.7, 0).text() == "simpo score +0.30 [-0.10, +0.70]"
    assert Comparison("dpo vs simpo", -0.043, -0.1, 0.01, -1, "pp").text() == "dpo vs simpo -4.3 [-10.0, +1.0] pp"


def test_paired_difference_and_median_shift_by_hand():
    a = pd.Series([2.0, 4.0, 6.0], index=[1, 2, 3])
    b = pd.Series([1.0, 2.0, 3.0, 99.0], index=[1, 2, 3, 4])       # prompt 4: only b answered it
    estimate, low, high = paired_difference(a, b, n_boot=500)
    assert estimate == pytest.approx(2.0) and 1.0 <= low <= estimate <= high <= 3.0   # differences 1, 2, 3
    assert median_shift([1, 2, 3], [0, 0, 1], n_boot=100)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="share no evaluation prompt"):
        paired_difference(a, pd.Series([1.0], index=[9]))
