"""How a method behaves across its whole grid, not just at its best run (issue 5's analysis core).

Pure pandas/numpy over the trials frame (analysis.summary.trials_frame). Failed trials stay in every
denominator: a config that failed is a draw a user paid for and got nothing from.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from analysis.frames import METRIC_COLUMNS
from orchestrator.core.runs import DRAWS, RunStatus, best_first

REFERENCE_METHOD = "dpo"  # the paper normalizes by DPO's best run


def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def _log_comb(log_fact: np.ndarray, a, b):
    """log C(a, b) for b <= a (numbers or arrays), from the log_factorials table."""
    return log_fact[a] - log_fact[b] - log_fact[a - b]


def expected_best_of_k(scores: Sequence[float], n_failed: int, k: int) -> tuple[float, float]:
    """(expected best score, probability that every draw failed) for k configs drawn at random without
    replacement from n = len(scores) + n_failed configs. Exact order statistics: with all n configs sorted
    (failed ones below every finished one), the i-th smallest is the best of the draw with probability
    C(i-1, k-1) / C(n, k). The expectation is over the draws that have at least one finished config.
    The binomials are taken in log space: C(3333, 1666) has about 1,000 digits, past any float (a method of
    3,333 runs, a report of 10,000: OverflowError before)."""
    finished = np.sort(np.asarray(scores, dtype=float))
    n = len(finished) + n_failed
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of configs); got {k}")
    if not len(finished):
        return float("nan"), 1.0
    log_fact = _log_factorials(n)
    log_total = _log_comb(log_fact, n, k)
    all_failed = float(np.exp(_log_comb(log_fact, n_failed, k) - log_total)) if n_failed >= k else 0.0
    below = n_failed + np.arange(len(finished))  # configs below each finished one, in sorted order
    drawn = below >= k - 1
    weights = np.zeros(len(finished))
    weights[drawn] = np.exp(_log_comb(log_fact, below[drawn], k - 1) - log_total)
    return float((weights * finished).sum() / (1 - all_failed)), all_failed


# Past this many configs the curve is drawn at every k up to DENSE_K, then at about 40 k spread evenly on a log
# scale up to n: each point costs n_boot bootstrap evaluations of O(n), so every k of a 3,333-run method would be
# 3,333 × 1,000 of them per method
DENSE_K = 50


def curve_ks(n: int) -> list[int]:
    """The k at which a best-of-k curve of n configs is evaluated: every k up to 100 configs, else every k up to
    DENSE_K and about 40 more up to n (n itself included)."""
    if n <= 2 * DENSE_K:
        return list(range(1, n + 1))
    spread = np.unique(np.round(np.geomspace(DENSE_K, n, 40)).astype(int))
    return sorted(set(range(1, DENSE_K + 1)) | {int(k) for k in spread} | {n})


def best_of_k_curve(scores: Sequence[float], n_failed: int, ks: Optional[Sequence[int]] = None,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Expected best-of-k for each k (default curve_ks) with a bootstrap band: the method's configs (failures
    included) are resampled with replacement `n_boot` times and the curve recomputed; the band is the central
    `level`."""
    n = len(scores) + n_failed
    ks = list(ks) if ks is not None else curve_ks(n)
    outcomes = np.concatenate([np.asarray(scores, dtype=float), np.full(n_failed, np.nan)])
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, len(ks)), np.nan)
    for b in range(n_boot):
        sample = outcomes[rng.integers(0, n, n)]
        done = sample[~np.isnan(sample)]
        for j, k in enumerate(ks):
            boot[b, j] = expected_best_of_k(done, n - len(done), k)[0] if len(done) else np.nan
    rows = []
    for j, k in enumerate(ks):
        mean, p_fail = expected_best_of_k(scores, n_failed, k)
        low, high = np.nanquantile(boot[:, j], [(1 - level) / 2, 1 - (1 - level) / 2])
        rows.append({"k": k, "expected_best": mean, "low": float(low), "high": float(high),
                     "p_all_failed": p_fail})
    return pd.DataFrame(rows)


def probability_beats(scores: Sequence[float], n_failed: int, baseline: float) -> float:
    """Chance that one config drawn at random beats `baseline` (ties count half; a failed config does not)."""
    s = np.asarray(scores, dtype=float)
    n = len(s) + n_failed
    return float(((s > baseline).sum() + 0.5 * (s == baseline).sum()) / n) if n else float("nan")


def pareto_front(frame: pd.DataFrame, score: str = "mean_score", cost: str = "kl") -> pd.DataFrame:
    """Runs no other run beats on both axes (higher `score`, lower `cost`), sorted by cost."""
    runs = frame.dropna(subset=[score, cost]).sort_values([cost, score], ascending=[True, False])
    front, best = [], -np.inf
    for index, row in runs.iterrows():
        if row[score] > best:
            front.append(index)
            best = row[score]
    return runs.loc[front]


def finished_runs(frame: pd.DataFrame, method: str) -> pd.DataFrame:
    """The method's FINISHED runs: the ones with metrics."""
    return frame[(frame["method"] == method) & (frame["status"] == RunStatus.FINISHED)]


def in_states(frame: pd.DataFrame, states: Sequence[RunStatus]) -> pd.DataFrame:
    """The rows whose status is one of `states` (a set of orchestrator.core.runs: DRAWS, OUTCOMES)."""
    return frame[frame["status"].isin(states)]


def method_draws(frame: pd.DataFrame, method: str) -> pd.DataFrame:
    """The method's draws (DRAWS: FINISHED or FAILED): the trials its statistics are over."""
    return in_states(frame[frame["method"] == method], DRAWS)


def table1(frame: pd.DataFrame, methods: Sequence[str], reference: str = REFERENCE_METHOD,
           baselines: Optional[dict[str, dict]] = None) -> pd.DataFrame:
    """The best FINISHED run of each method by mean_score with every metric, then one row per baseline (name ->
    its metrics and run_name: SFT, the untrained model, the dataset's chosen responses), and each metric's
    relative change against the reference method's best run: (m - m_ref) / |m_ref| (no such columns when the
    reference method has no finished run)."""
    rows = []
    for method in methods:
        runs = finished_runs(frame, method)
        failed = int(((frame["method"] == method) & (frame["status"] == RunStatus.FAILED)).sum())
        if runs.empty:
            rows.append({"method": method, "run_name": None, "finished": 0, "failed": failed})
            continue
        best = best_first_order(runs).iloc[0]
        rows.append({"method": method, "run_name": best["run_name"], "finished": len(runs), "failed": failed,
                     **{m: best[m] for m in METRIC_COLUMNS}})
    for name, metrics in (baselines or {}).items():
        rows.append({"method": name, "run_name": metrics.get("run_name"),
                     **{m: metrics.get(m, np.nan) for m in METRIC_COLUMNS}})
    table = pd.DataFrame(rows, columns=["method", "run_name", "finished", "failed", *METRIC_COLUMNS])
    table = table.astype({"finished": "Int64", "failed": "Int64"}).set_index("method")  # counts, blank for baselines
    if reference in table.index and table.loc[reference, "run_name"] is not None:
        for m in METRIC_COLUMNS:
            ref = table.loc[reference, m]
            table[f"{m}_vs_{reference}"] = (table[m] - ref) / abs(ref) if ref else np.nan
    return table.reset_index()


def best_first_order(runs: pd.DataFrame, by: str = "mean_score") -> pd.DataFrame:
    """`runs` best first (runs.best_first: higher `by` first, NaN last, equal values by smaller trial key)."""
    order = sorted(range(len(runs)), key=lambda i: best_first(runs[by].iloc[i], runs["trial_key"].iloc[i]))
    return runs.iloc[order]


def run_at_quantile(frame: pd.DataFrame, method: str, q: float, by: str = "mean_score") -> Optional[pd.Series]:
    """The method's FINISHED run at quantile `q` of `by` (nearest rank: q=1 the best run, q=0.75 the run a
    quarter of the way down from the top; equal values ordered by runs.best_first), or None when none finished."""
    runs = best_first_order(finished_runs(frame, method), by)
    if runs.empty:
        return None
    rank = max(int(np.ceil(q * len(runs))), 1)
    return runs.iloc[len(runs) - rank]


def head_to_head(scores_a: pd.Series, scores_b: pd.Series, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, float]:
    """How often run A's generation outscores run B's on the same prompt (series indexed by prompt id; ties
    count half), over the prompts both have, with a paired bootstrap interval (prompts resampled together)."""
    common = scores_a.index.intersection(scores_b.index)
    if common.empty:
        raise ValueError("the two runs share no evaluation prompt")
    a, b = scores_a.loc[common].to_numpy(float), scores_b.loc[common].to_numpy(float)
    outcome = (a > b) + 0.5 * (a == b)                                   # (prompts,) in {0, 0.5, 1}
    rng = np.random.default_rng(seed)
    boot = outcome[rng.integers(0, len(outcome), (n_boot, len(outcome)))].mean(axis=1)
    low, high = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"win_rate": float(outcome.mean()), "low": float(low), "high": float(high), "prompts": len(common)}


def table3(frame: pd.DataFrame, samples: dict[str, pd.Series], methods: Sequence[str], q: float,
           n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Head-to-head win rates between every ordered pair of methods, each at its run at quantile `q` (1: the
    best run, 0.75: the 75th-percentile run). `samples` maps a run's trial_key to its per-prompt gold scores."""
    picked = {m: run_at_quantile(frame, m, q) for m in methods}
    rows = []
    for a, b in itertools.permutations(methods, 2):
        if picked[a] is None or picked[b] is None:
            continue
        result = head_to_head(samples[picked[a]["trial_key"]], samples[picked[b]["trial_key"]], n_boot, seed)
        rows.append({"method": a, "opponent": b, "run": picked[a]["run_name"],
                     "opponent_run": picked[b]["run_name"], **result})
    return pd.DataFrame(rows, columns=["method", "opponent", "run", "opponent_run", "win_rate", "low", "high",
                                       "prompts"])


def trials_to_reach(frame: pd.DataFrame, method: str, threshold: float) -> Optional[float]:
    """Expected number of the method's configs a user tries, in random order, until one scores at least
    `threshold`: (n + 1) / (m + 1) draws without replacement (n configs with an outcome, failed ones included;
    m of them reaching it). None when no config reaches it."""
    runs = method_draws(frame, method)
    m = int((runs["mean_score"] >= threshold).sum())
    return (len(runs) + 1) / (m + 1) if m else None


def cost_to_reach(frame: pd.DataFrame, method: str, threshold: float, cost: str) -> Optional[float]:
    """trials_to_reach times the method's mean `cost` (e.g. gpu_hours) per trial with an outcome."""
    draws = trials_to_reach(frame, method, threshold)
    if draws is None:
        return None
    return draws * float(method_draws(frame, method)[cost].fillna(0).mean())


def edge_of_grid(frame: pd.DataFrame, method: str, hyperparameters: Sequence[str]) -> list[str]:
    """Where the method's best FINISHED run sits at the lowest or highest value its grid tried of a numeric
    hyperparameter that took several values: e.g. ["learning_rate 0.0001 (lowest of 2)"]. There the grid
    cannot tell whether a value beyond it would score higher."""
    runs = frame[frame["method"] == method]
    best = run_at_quantile(frame, method, 1.0)
    if best is None:
        return []
    edges = []
    for hp in hyperparameters:
        values = pd.to_numeric(runs[hp], errors="coerce").dropna().unique() if hp in runs else []
        if len(values) < 2 or pd.isna(pd.to_numeric(best[hp], errors="coerce")):
            continue
        for side, bound in (("lowest", values.min()), ("highest", values.max())):
            if float(best[hp]) == float(bound):
                edges.append(f"{hp} {best[hp]:g} ({side} of {len(values)})")
    return edges


def top_runs(frame: pd.DataFrame, method: str, percent: float, by: str = "mean_score") -> pd.DataFrame:
    """The method's top `percent`% runs by `by`: ceil(percent/100 × runs with an outcome) of them, at least
    one. Failed runs are in the count (they are part of what was paid for) but can never be among the top."""
    runs = method_draws(frame, method)
    n = max(math.ceil(percent / 100 * len(runs)), 1)
    return runs[runs["status"] == RunStatus.FINISHED].nlargest(n, by)
