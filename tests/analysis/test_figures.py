"""Figures render from hand-built frames; the top-k% selection is checked by hand."""

import base64

import pandas as pd

from analysis.figures import (best_of_k_figure, metric_distributions, metric_vs_hyperparameter, pareto_figure,
                              png_data_uri, topk_distributions)
from analysis.robustness import best_of_k_curve, top_runs


def test_top_runs_counts_failed_runs_but_never_picks_them(toy_sweep):
    frame, _ = toy_sweep
    assert list(top_runs(frame, "dpo", 25)["run_name"]) == ["dpo6", "dpo5"]   # ceil(0.25 x 8) = 2
    assert list(top_runs(frame, "dpo", 1)["run_name"]) == ["dpo6"]            # at least one
    assert len(top_runs(frame, "dpo", 100)) == 7                              # the failed run has no score


def _is_png(uri: str) -> bool:
    return base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_renders_to_an_embeddable_png_with_failures_labelled(toy_sweep):
    frame, samples = toy_sweep
    fig1 = metric_distributions(frame, ["dpo", "simpo"], sft={"mean_score": 2.0, "length": 6.0})
    assert len(fig1.axes) == 5
    assert [t.get_text() for t in fig1.axes[0].get_xticklabels()] == ["dpo\n(n=8, 1 failed)", "simpo\n(n=8, 1 failed)"]
    assert any(line.get_linestyle() == "--" for line in fig1.axes[0].get_lines())  # the SFT line
    fig2 = topk_distributions(frame, samples, ["dpo", "simpo"], "length")
    # each panel says how many runs it pools: ceil(25% of 8) = 2, of the 8 with an outcome
    assert [t.get_text() for t in fig2.axes[2].get_xticklabels()] == ["dpo\n(2 of 8 runs)", "simpo\n(2 of 8 runs)"]
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()][0] == "dpo\n(1 of 8 runs)"
    fig3 = topk_distributions(frame, samples, ["dpo", "simpo"], "kl")
    fig4 = metric_vs_hyperparameter(frame, "simpo", "beta")
    assert fig4.axes[0].get_legend().get_texts()[0].get_text() == "1 failed"
    curves = {m: best_of_k_curve(frame[(frame.method == m) & (frame.status == "FINISHED")]["mean_score"], 1, n_boot=50)
              for m in ("dpo", "simpo")}
    fig5 = best_of_k_figure(curves, sft_score=2.0)
    assert [t.get_text() for t in fig5.axes[0].get_legend().get_texts()] == ["dpo", "simpo", "SFT (2.000)"]
    fig6 = pareto_figure(frame, {"dpo": frame[frame.run_name.isin(["dpo0"])]})
    for fig in (fig1, fig2, fig3, fig4, fig5, fig6):
        assert _is_png(png_data_uri(fig))


def test_points_are_coloured_by_learning_rate_and_marked_by_epochs():
    """Against β, the runs of two learning rates × two epoch counts are four legend groups, so the spread at
    one β is explained; a RUNNING run is in no count."""
    rows = [{"method": "dpo", "run_name": f"r{i}", "status": "FINISHED", "trial_key": f"r{i}", "beta": beta,
             "learning_rate": lr, "epochs": epochs, "mean_score": float(i), "kl": 0.1 * i, "length": 5.0 + i}
            for i, (beta, lr, epochs) in enumerate((b, lr, e) for b in (0.1, 0.3) for lr in (1e-4, 3e-4)
                                                   for e in (1, 3))]
    rows.append({**rows[0], "run_name": "live", "trial_key": "live", "status": "RUNNING", "mean_score": None})
    fig = metric_vs_hyperparameter(pd.DataFrame(rows), "dpo", "beta")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "learning_rate=0.0001, epochs=1", "learning_rate=0.0001, epochs=3",
        "learning_rate=0.0003, epochs=1", "learning_rate=0.0003, epochs=3"]
    assert fig._suptitle.get_text() == "dpo: metrics against beta (8 runs; colour: learning_rate; marker: epochs)"
    against_lr = metric_vs_hyperparameter(pd.DataFrame(rows), "dpo", "learning_rate")
    assert [t.get_text() for t in against_lr.axes[0].get_legend().get_texts()] == ["epochs=1", "epochs=3"]
