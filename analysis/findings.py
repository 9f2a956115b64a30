"""The paper's findings, checked against a sweep: one verdict per finding F1-F5 of Ahrabian et al. (Findings of
NAACL 2025), decided by the rule in RULE from this sweep's own runs, with 95% bootstrap intervals.

Each finding is split into comparisons of a length-normalised method (SimPO, LN-DPO) with DPO, each an
estimate with an interval and the side of zero the paper puts it on. Pure pandas/numpy over the report's frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from analysis.robustness import REFERENCE_METHOD, finished_runs, head_to_head, run_at_quantile, top_runs

LENGTH_NORMALISED = ("simpo", "ln_dpo")
LEVEL = 0.95

RULE = ("Each finding is split into comparisons of a length-normalised method (SimPO, LN-DPO) with DPO, each a "
        "difference (the method's value minus DPO's, in gold-score points, tokens or nats of KL) with a 95% bootstrap "
        "interval (paired over evaluation prompts where both sides answered the "
        "same prompts; over runs for distributions of runs). A comparison supports the paper when its interval "
        "lies entirely on the paper's side of zero (for a claim that two methods are alike: when its interval "
        "contains zero). A finding holds when every comparison supports it, fails when none does, and is mixed "
        "otherwise. It is not testable when the sweep lacks a finished DPO run or any finished SimPO or LN-DPO "
        "run, or the metric it needs (KL needs an SFT stage).")

HOLDS, FAILS, MIXED, NOT_TESTABLE = "holds", "fails", "mixed", "not testable"


@dataclass(frozen=True)
class Comparison:
    """One method against DPO on one quantity: estimate and interval, a difference in the quantity's own unit
    (not relative: KL and scores can sit near zero, where a relative change is meaningless)."""
    label: str            # "simpo length"
    estimate: float
    low: float
    high: float
    expected: int         # the paper's side: -1 below zero, +1 above, 0 "alike" (zero inside the interval)
    unit: str = ""        # printed after the numbers: "" (gold-score points), "tokens", "nats", "pp" (win rate
                          # minus 50%, in percentage points)

    @property
    def supports(self) -> bool:
        if self.expected == 0:
            return self.low <= 0 <= self.high
        return self.high < 0 if self.expected < 0 else self.low > 0

    def text(self) -> str:
        scale, digits = (100, 1) if self.unit == "pp" else (1, 2)
        number = lambda v: f"{v * scale:+.{digits}f}"  # noqa: E731
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label} {number(self.estimate)} [{number(self.low)}, {number(self.high)}]{unit}"


@dataclass(frozen=True)
class Finding:
    key: str                                   # "F1"
    claim: str                                 # what the paper found, in a line
    paper: str                                 # the paper's numbers
    comparisons: list[Comparison] = field(default_factory=list)
    untestable: str = ""                       # why, when it cannot be tested here

    @property
    def verdict(self) -> str:
        if self.untestable or not self.comparisons:
            return NOT_TESTABLE
        support = sum(c.supports for c in self.comparisons)
        return HOLDS if support == len(self.comparisons) else FAILS if support == 0 else MIXED


def paired_difference(a: pd.Series, b: pd.Series, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over the prompts both answered of a − b (series indexed by prompt id), with a paired bootstrap
    interval (prompts resampled together)."""
    common = a.index.intersection(b.index)
    if common.empty:
        raise ValueError("the two sides share no evaluation prompt")
    diff = a.loc[common].to_numpy(float) - b.loc[common].to_numpy(float)          # (prompts,)
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)      # (n_boot,)
    low, high = np.quantile(boot, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(diff.mean()), float(low), float(high)


def median_shift(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """median(a) − median(b) of two sets of runs' scores, with a bootstrap interval resampling each set's runs."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    boot = (np.median(x[rng.integers(0, len(x), (n_boot, len(x)))], axis=1)
            - np.median(y[rng.integers(0, len(y), (n_boot, len(y)))], axis=1))
    low, high = np.quantile(boot, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(np.median(x) - np.median(y)), float(low), float(high)


@dataclass(frozen=True)
class SweepRuns:
    """What the checks read: the report's trial frame and per-sample frame, and the methods present."""
    frame: pd.DataFrame
    samples: pd.DataFrame
    methods: list[str]
    n_boot: int = 2000

    def per_prompt(self, keys: Sequence[str], column: str) -> pd.Series:
        """Per prompt, the mean of `column` over the given runs' samples (one run: its own values)."""
        rows = self.samples[self.samples["trial_key"].isin(list(keys))].dropna(subset=[column])
        return rows.groupby("prompt_id")[column].mean()

    def best(self, method: str) -> Optional[pd.Series]:
        return run_at_quantile(self.frame, method, 1.0)

    def top_keys(self, method: str, percent: float) -> list[str]:
        return list(top_runs(self.frame, method, percent)["trial_key"])

    def finished_scores(self, method: str) -> list[float]:
        return list(finished_runs(self.frame, method)["mean_score"].dropna())


UNITS = {"score": "", "length": "tokens", "kl": "nats"}


def _versus_dpo(runs: SweepRuns, column: str, keys: Callable[[str], list[str]], expected: int,
                label: str) -> list[Comparison]:
    """Each length-normalised method's runs `keys(method)` against DPO's: the per-prompt difference of `column`."""
    dpo = runs.per_prompt(keys(REFERENCE_METHOD), column)
    out = []
    for method in _present(runs):
        mine = runs.per_prompt(keys(method), column)
        if mine.empty or dpo.empty:
            continue
        out.append(Comparison(f"{method} {label}", *paired_difference(mine, dpo, runs.n_boot), expected,
                              UNITS[column]))
    return out


def _present(runs: SweepRuns) -> list[str]:
    return [m for m in LENGTH_NORMALISED if m in runs.methods and runs.best(m) is not None]


def _best_key(runs: SweepRuns) -> Callable[[str], list[str]]:
    return lambda method: [runs.best(method)["trial_key"]]


def _has(runs: SweepRuns, column: str) -> bool:
    return runs.samples[column].notna().any()


def f1_best_runs_alike_but_shorter(runs: SweepRuns) -> list[Comparison]:
    best = _best_key(runs)
    out = _versus_dpo(runs, "score", best, 0, "score") + _versus_dpo(runs, "length", best, -1, "length")
    return out + (_versus_dpo(runs, "kl", best, -1, "KL") if _has(runs, "kl") else [])


def f2_dpo_loses_at_the_75th_percentile(runs: SweepRuns) -> list[Comparison]:
    """DPO's head-to-head win rate minus 50%, at the best runs (alike) and the 75th-percentile runs (below):
    the same runs, bootstrap and seed as the report's head-to-head tables."""
    scores = {k: g.set_index("prompt_id")["score"] for k, g in runs.samples.groupby("trial_key")}
    out = []
    for q, expected, where in ((1.0, 0, "best"), (0.75, -1, "75th pct")):
        dpo = run_at_quantile(runs.frame, REFERENCE_METHOD, q)
        for method in _present(runs):
            other = run_at_quantile(runs.frame, method, q)
            r = head_to_head(scores[dpo["trial_key"]], scores[other["trial_key"]], runs.n_boot, 0)
            out.append(Comparison(f"dpo vs {method} at the {where} run", r["win_rate"] - 0.5, r["low"] - 0.5,
                                  r["high"] - 0.5, expected, "pp"))
    return out


def f3_scores_shift_right(runs: SweepRuns) -> list[Comparison]:
    dpo = runs.finished_scores(REFERENCE_METHOD)
    return [Comparison(f"{m} median run score", *median_shift(runs.finished_scores(m), dpo, runs.n_boot), 1)
            for m in _present(runs)]


def f4_shorter_at_the_top_fading_below(runs: SweepRuns) -> list[Comparison]:
    top = lambda percent: lambda method: runs.top_keys(method, percent)  # noqa: E731
    out = _versus_dpo(runs, "length", top(1), -1, "length, top 1%")
    fading = []
    for method in _present(runs):  # the gap at the top 25% minus the gap at the top 1%: above zero if it fades
        side = lambda m, p: runs.per_prompt(top(p)(m), "length")  # noqa: E731
        gap = lambda p: side(method, p) - side(REFERENCE_METHOD, p)  # noqa: E731
        wide, narrow = gap(25).dropna(), gap(1).dropna()
        if len(wide) and len(narrow):
            fading.append(Comparison(f"{method} length gap, top 25% minus top 1%",
                                     *paired_difference(wide, narrow, runs.n_boot), 1, "tokens"))
    return out + fading


def f5_lower_kl_at_the_peak(runs: SweepRuns) -> list[Comparison]:
    return _versus_dpo(runs, "kl", lambda m: runs.top_keys(m, 1), -1, "KL, top 1%")


# (key, the paper's claim, its numbers, the check, the metric it needs)
FINDINGS = [
    ("F1", "At their best runs the methods score alike, while SimPO and LN-DPO answer shorter with lower KL "
           "(Table 1).",
     "best run vs DPO's: score SimPO +2.7%, LN-DPO +0.3%; length −22.9%, −15.9%; KL −20.7%, −26.0%",
     f1_best_runs_alike_but_shorter, "length"),
    ("F2", "Head to head, the best runs are near 50%, but at the 75th-percentile runs DPO loses (Table 3).",
     "DPO's win rate at the 75th-percentile run: vs LN-DPO 45.7%, vs SimPO 44.3% (−4.3 pp, −5.7 pp)",
     f2_dpo_loses_at_the_75th_percentile, "score"),
    ("F3", "SimPO and LN-DPO shift the distribution of runs' mean score to the right of DPO's (Figure 1).",
     "shown as distributions, no number", f3_scores_shift_right, "score"),
    ("F4", "In the top 1% of runs SimPO and LN-DPO answer shorter than DPO; the effect fades when worse runs are "
           "included (Figure 2).",
     "shown as distributions, no number", f4_shorter_at_the_top_fading_below, "length"),
    ("F5", "SimPO and LN-DPO have lower KL to SFT than DPO at their peaks (Figure 3).",
     "shown as distributions, no number", f5_lower_kl_at_the_peak, "kl"),
]


def check_findings(frame: pd.DataFrame, samples: pd.DataFrame, methods: Sequence[str],
                   n_boot: int = 2000) -> list[Finding]:
    """Every finding with this sweep's comparisons and verdict (RULE)."""
    runs = SweepRuns(frame, samples, list(methods), n_boot)
    missing = ("no finished DPO run" if runs.best(REFERENCE_METHOD) is None else
               "no finished SimPO or LN-DPO run" if not _present(runs) else "")
    out = []
    for key, claim, paper, check, needs in FINDINGS:
        why = missing or ("" if _has(runs, needs) else f"the samples have no {needs} (it needs an SFT stage)")
        out.append(Finding(key, claim, paper, [] if why else check(runs), why))
    return out


def findings_table(findings: Sequence[Finding]) -> pd.DataFrame:
    """One row per finding: the paper's claim and numbers, this sweep's comparisons with intervals, the verdict."""
    return pd.DataFrame([{"finding": f.key, "the paper": f"{f.claim} {f.paper}.",
                          "this sweep (estimate [95% interval])": f.untestable or "; ".join(
                              f"{c.text()}{'' if c.supports else ' ✗'}" for c in f.comparisons),
                          "verdict": f.verdict} for f in findings])
