"""Figures render from hand-built frames; the top-k% selection is checked by hand."""

import base64

from analysis.figures import (best_of_k_figure, metric_distributions, metric_vs_hyperparameter, png_data_uri,
                              top_runs, topk_distributions)
from analysis.robustness import best_of_k_curve


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
    fig3 = topk_distributions(frame, samples, ["dpo", "simpo"], "kl")
    fig4 = metric_vs_hyperparameter(frame, "simpo", "beta")
    assert fig4.axes[0].get_legend().get_texts()[0].get_text() == "1 failed"
    curves = {m: best_of_k_curve(frame[(frame.method == m) & (frame.status == "FINISHED")]["mean_score"], 1, n_boot=50)
              for m in ("dpo", "simpo")}
    fig5 = best_of_k_figure(curves)
    for fig in (fig1, fig2, fig3, fig4, fig5):
        assert _is_png(png_data_uri(fig))
