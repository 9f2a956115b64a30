"""The report's figures (matplotlib, Agg): each function takes analysis frames and returns a Figure.

Figure 1: per method, the distribution over all runs of each metric, the SFT model as a dashed line.
Figures 2-3: per method, the pooled per-sample length / KL of its top-k% runs by score.
Figures 4-7: a metric against a method's hyperparameter, a point per run.
Best-of-k: the expected best score from k random configs per method, with its bootstrap band.
Failed runs are counted in every panel's label ("n=12, 2 failed"), never silently left out.
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
from orchestrator.contract.runs import RunStatus

METRIC_LABELS = {"mean_score": "gold score", "win_vs_chosen": "win rate vs chosen", "win_vs_sft": "win rate vs SFT",
                 "kl": "KL to SFT", "length": "length (tokens)"}


def _label(frame: pd.DataFrame, method: str) -> str:
    runs = frame[frame["method"] == method]
    failed = int((runs["status"] == RunStatus.FAILED).sum())
    return f"{method}\n(n={len(runs)}{f', {failed} failed' if failed else ''})"


def top_runs(frame: pd.DataFrame, method: str, percent: float, by: str = "mean_score") -> pd.DataFrame:
    """The method's top `percent`% runs by `by`: ceil(percent/100 × runs) of them, at least one. Failed runs
    are in the count (they are part of what was paid for) but can never be among the top."""
    runs = frame[frame["method"] == method]
    n = max(math.ceil(percent / 100 * len(runs)), 1)
    return runs[runs["status"] == RunStatus.FINISHED].nlargest(n, by)


def metric_distributions(frame: pd.DataFrame, methods: Sequence[str],
                         sft: Optional[dict[str, float]] = None) -> plt.Figure:
    """Figure 1: one panel per metric, a box plus the individual runs per method."""
    fig, axes = plt.subplots(1, len(METRIC_COLUMNS), figsize=(4 * len(METRIC_COLUMNS), 4), squeeze=False)
    for ax, metric in zip(axes[0], METRIC_COLUMNS):
        values = [frame[(frame["method"] == m) & (frame["status"] == RunStatus.FINISHED)][metric].dropna() for m in methods]
        ax.boxplot([v.to_numpy() for v in values], showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter([i] * len(v), v, s=10, alpha=0.6)
        if sft and metric in sft and not pd.isna(sft[metric]):
            ax.axhline(sft[metric], linestyle="--", color="gray", label="SFT")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(1, len(methods) + 1), [_label(frame, m) for m in methods], fontsize=8)
        ax.set_title(METRIC_LABELS[metric])
    fig.tight_layout()
    return fig


def topk_distributions(frame: pd.DataFrame, samples: pd.DataFrame, methods: Sequence[str], column: str,
                       percents: Sequence[float] = (1, 10, 25)) -> plt.Figure:
    """Figures 2 (column=length) and 3 (column=kl): per top-k%, the pooled per-sample values of each method's
    top runs."""
    fig, axes = plt.subplots(1, len(percents), figsize=(4.5 * len(percents), 4), squeeze=False, sharey=True)
    for ax, percent in zip(axes[0], percents):
        pooled = [samples[samples["trial_key"].isin(top_runs(frame, m, percent)["trial_key"])][column].dropna()
                  for m in methods]
        ax.violinplot([p.to_numpy() if len(p) else [float("nan")] for p in pooled], showmedians=True)
        ax.set_xticks(range(1, len(methods) + 1), [_label(frame, m) for m in methods], fontsize=8)
        ax.set_title(f"top {percent:g}% runs by score")
    axes[0][0].set_ylabel(METRIC_LABELS.get(column, column))
    fig.tight_layout()
    return fig


def metric_vs_hyperparameter(frame: pd.DataFrame, method: str, hyperparameter: str,
                             metrics: Sequence[str] = ("mean_score", "kl", "length")) -> plt.Figure:
    """Figures 4-7: a point per finished run; failed runs as crosses on the x axis at their setting."""
    runs = frame[frame["method"] == method]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    done, failed = runs[runs["status"] == RunStatus.FINISHED], runs[runs["status"] == RunStatus.FAILED]
    for ax, metric in zip(axes[0], metrics):
        ax.scatter(done[hyperparameter], done[metric], s=14)
        if len(failed):
            ax.scatter(failed[hyperparameter], [ax.get_ylim()[0]] * len(failed), marker="x", color="red",
                       label=f"{len(failed)} failed")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(hyperparameter)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    fig.suptitle(f"{method}: metrics against {hyperparameter} ({len(runs)} runs)")
    fig.tight_layout()
    return fig


def best_of_k_figure(curves: dict[str, pd.DataFrame]) -> plt.Figure:
    """Expected best score from k random configs, per method (curves from robustness.best_of_k_curve)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        ax.plot(curve["k"], curve["expected_best"], marker="o", ms=3, label=method)
        ax.fill_between(curve["k"], curve["low"], curve["high"], alpha=0.2)
    ax.set_xlabel("k (configs tried at random)")
    ax.set_ylabel("expected best gold score")
    ax.legend()
    fig.tight_layout()
    return fig


def png_data_uri(fig: plt.Figure, dpi: int = 100) -> str:
    """The figure as an embeddable `data:image/png;base64,...` URI (the report has no other files); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
