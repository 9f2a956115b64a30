"""The report's figures (matplotlib, Agg): each function takes analysis frames and returns a Figure.

Figure 1: per method, the distribution over all runs of each metric, the SFT model as a dashed line.
Figures 2-3: per method, the pooled per-sample length / KL of its top-k% runs by score.
Then a metric against each hyperparameter that varies in a method's grid (its own, learning rate, epochs), a
point per run coloured by learning rate and marked by epochs.
Best-of-k: the expected best score from k random configs per method, with its bootstrap band and SFT's line.
Pareto: score against KL, each method's runs and its front.
Budget: per method, the best final score found against the device-hours spent, one step line per sweep.
Failed runs are counted in every panel's label ("n=12, 2 failed"), never silently left out; runs still
RUNNING (a report made during the sweep) are in no count.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frames import METRIC_COLUMNS  # noqa: E402
from analysis.robustness import finished_runs, method_draws, top_runs  # noqa: E402
from orchestrator.core.runs import RunStatus
from orchestrator.core.spec import TrainHParams

METRIC_LABELS = {"mean_score": "gold score", "win_vs_chosen": "win rate vs chosen", "win_vs_sft": "win rate vs SFT",
                 "kl": "KL to SFT", "length": "length (tokens)"}


def _label(frame: pd.DataFrame, method: str) -> str:
    runs = method_draws(frame, method)
    failed = int((runs["status"] == RunStatus.FAILED).sum())
    return f"{method}\n(n={len(runs)}{f', {failed} failed' if failed else ''})"


def metric_distributions(frame: pd.DataFrame, methods: Sequence[str],
                         sft: Optional[dict[str, float]] = None) -> plt.Figure:
    """Figure 1: one panel per metric (two rows of three), a box plus the individual runs per method."""
    columns = 3
    rows = math.ceil(len(METRIC_COLUMNS) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(METRIC_COLUMNS):]:
        ax.remove()
    for ax, metric in zip(axes, METRIC_COLUMNS):
        values = [finished_runs(frame, m)[metric].dropna() for m in methods]
        ax.boxplot([v.to_numpy() for v in values], showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter([i] * len(v), v, s=10, alpha=0.6)
        if sft and metric in sft and not pd.isna(sft[metric]):
            ax.axhline(sft[metric], linestyle="--", color="gray", label="SFT")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(1, len(methods) + 1), [_label(frame, m) for m in methods], fontsize=10)
        ax.set_title(METRIC_LABELS[metric], fontsize=12)
    fig.tight_layout()
    return fig


def topk_distributions(frame: pd.DataFrame, samples: pd.DataFrame, methods: Sequence[str], column: str,
                       percents: Sequence[float] = (1, 10, 25)) -> plt.Figure:
    """Figures 2 (column=length) and 3 (column=kl): per top-k%, the pooled per-sample values of each method's
    top runs."""
    fig, axes = plt.subplots(1, len(percents), figsize=(4.5 * len(percents), 4), squeeze=False, sharey=True)
    for ax, percent in zip(axes[0], percents):
        tops = {m: top_runs(frame, m, percent) for m in methods}
        pooled = [samples[samples["trial_key"].isin(tops[m]["trial_key"])][column].dropna() for m in methods]
        ax.violinplot([p.to_numpy() if len(p) else [float("nan")] for p in pooled], showmedians=True)
        if column == "kl":
            ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(1, len(methods) + 1), [_top_label(frame, m, tops[m]) for m in methods], fontsize=9)
        ax.set_title(f"top {percent:g}% runs by score")
    axes[0][0].set_ylabel(METRIC_LABELS.get(column, column))
    fig.tight_layout()
    return fig


def _top_label(frame: pd.DataFrame, method: str, top: pd.DataFrame) -> str:
    """'dpo\n(3 of 96 runs)': the runs a top-k% panel pools, out of the method's runs with an outcome."""
    return f"{method}\n({len(top)} of {len(method_draws(frame, method))} runs)"


# The training hyperparameters every method's grid may vary (learning_rate, epochs), whose spread a method's own
# hyperparameter cannot explain: points are coloured by the first and marked by the second when they vary (the
# paper's grids cross β with both).
GROUPING = tuple(TrainHParams.model_fields)
MARKERS = "os^Dv<>p*h"


def _groups(runs: pd.DataFrame, hyperparameter: str) -> tuple[list[str], list[tuple[tuple, pd.DataFrame]]]:
    """(the GROUPING columns other than the x axis that vary, [(their values, the runs with them)])."""
    by = [g for g in GROUPING if g != hyperparameter and g in runs and runs[g].nunique() > 1]
    if not by:
        return [], [((), runs)]
    return by, [(key if isinstance(key, tuple) else (key,), group) for key, group in runs.groupby(by, sort=True)]


def metric_vs_hyperparameter(frame: pd.DataFrame, method: str, hyperparameter: str,
                             metrics: Sequence[str] = ("mean_score", "kl", "length")) -> plt.Figure:
    """Figures 4 onwards: a point per finished run, coloured by learning rate and marked by epochs where those
    vary (else one colour); failed runs as red crosses on the x axis at their setting."""
    runs = method_draws(frame, method)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    done, failed = runs[runs["status"] == RunStatus.FINISHED], runs[runs["status"] == RunStatus.FAILED]
    by, groups = _groups(done, hyperparameter)
    styles = [{v: style(i) for i, v in enumerate(sorted(done[column].unique()))}
              for column, style in zip(by, (lambda i: f"C{i}", lambda i: MARKERS[i % len(MARKERS)]))]
    for ax, metric in zip(axes[0], metrics):
        for values, group in groups:
            ax.scatter(group[hyperparameter], group[metric], s=18,
                       label=", ".join(f"{c}={v:g}" for c, v in zip(by, values)) or None,
                       color=styles[0][values[0]] if by else "C0",
                       marker=styles[1][values[1]] if len(by) > 1 else "o")
        if len(failed):
            ax.scatter(failed[hyperparameter], [ax.get_ylim()[0]] * len(failed), marker="x", color="red",
                       label=f"{len(failed)} failed")
        if by or len(failed):
            ax.legend(loc="best", fontsize=7)
        ax.set_xlabel(hyperparameter)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    fig.suptitle(f"{method}: metrics against {hyperparameter} ({len(runs)} runs"
                 + "".join(f"; {what}: {c}" for what, c in zip(("colour", "marker"), by)) + ")")
    fig.tight_layout()
    return fig


def best_of_k_figure(curves: dict[str, pd.DataFrame], sft_score: Optional[float] = None) -> plt.Figure:
    """Expected best score from k random configs, per method (curves from robustness.best_of_k_curve), and the
    selected SFT model's score as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, curve in curves.items():
        ax.plot(curve["k"], curve["expected_best"], marker="o", ms=3, label=method)
        ax.fill_between(curve["k"], curve["low"], curve["high"], alpha=0.2)
    if sft_score is not None and not pd.isna(sft_score):
        ax.axhline(sft_score, linestyle="--", color="gray", label=f"SFT ({sft_score:.3f})")
    ax.set_xlabel("k (configs tried at random)")
    ax.set_ylabel("expected best gold score")
    ax.legend()
    fig.tight_layout()
    return fig


def pareto_figure(frame: pd.DataFrame, fronts: dict[str, pd.DataFrame]) -> plt.Figure:
    """Score against KL: every finished run of each method as a faint point, its Pareto front as a line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (method, front) in enumerate(fronts.items()):
        runs = finished_runs(frame, method)
        ax.scatter(runs["kl"], runs["mean_score"], s=12, alpha=0.35, color=f"C{i}")
        ax.plot(front["kl"], front["mean_score"], marker="o", ms=4, color=f"C{i}", label=f"{method} front")
    ax.set_xlabel(METRIC_LABELS["kl"])
    ax.set_ylabel(METRIC_LABELS["mean_score"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def budget_figure(curves: dict[str, dict[str, pd.DataFrame]], thresholds: dict[str, Optional[float]],
                  cost: str = "device_hours") -> plt.Figure:
    """One panel per method: for each sweep (name -> method -> analysis.budget.budget_curve), the best final score
    found against the cost spent, as a step line; dashed: the grid's top-10% score of the method."""
    methods = list(thresholds)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, (sweep, by_method) in enumerate(curves.items()):
            curve = by_method.get(method)
            if curve is not None and len(curve):
                ax.step(curve["spent"], curve["best"], where="post", color=f"C{i}", label=sweep)
        if thresholds[method] is not None:
            ax.axhline(thresholds[method], linestyle="--", color="gray", label="grid's top 10%")
        ax.set_title(method)
        ax.set_xlabel(cost.replace("_", "-") + " spent")
        ax.set_ylabel("best final gold score found")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def png_data_uri(fig: plt.Figure, dpi: int = 100) -> str:
    """The figure as an embeddable `data:image/png;base64,...` URI (the report has no other files); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
