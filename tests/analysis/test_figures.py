"""Figures render from hand-built frames; the top-k% selection is checked by hand."""

import base64

import pandas as pd

from analysis.figures import (best_of_k_figure, metric_distributions, metric_vs_hyperparameter, png_data_uri,
                              top_runs, topk_distributions)
from analysis.frames import samples_frame, sweep_frame
from analysis.robustness import best_of_k_curve


def frame_and_samples():
    records, samples = [], {}
    for method in ("dpo", "simpo"):
        for i in range(8):
            key = f"{method}{i}"
            status = "FAILED" if i == 7 else "FINISHED"
            metrics = ({"mean_score": i * (1.5 if method == "simpo" else 1.0), "win_vs_chosen": i / 10,
                        "win_vs_sft": i / 9, "kl": i / 3, "length": 5 + i} if status == "FINISHED" else {})
            records.append({"stage": method, "method": method, "run_name": key, "status": status, "trial_key": key,
                            "params": {"beta": str(0.1 * (i + 1))}, "metrics": metrics, "tags": {}})
            samples[key] = [{"prompt_id": p, "score": i + p, "length": 5 + i + p % 3, "kl": i / 3 + p / 10,
                             "chosen_score": 1.0, "sft_score": 0.5} for p in range(6)] if status == "FINISHED" else []
    return sweep_frame(records, ["beta"]), samples_frame(samples)


def test_top_runs_counts_failed_runs_but_never_picks_them():
    frame, _ = frame_and_samples()
    assert list(top_runs(frame, "dpo", 25)["run_name"]) == ["dpo6", "dpo5"]   # ceil(0.25 x 8) = 2
    assert list(top_runs(frame, "dpo", 1)["run_name"]) == ["dpo6"]            # at least one
    assert len(top_runs(frame, "dpo", 100)) == 7                              # the failed run has no score


def _is_png(uri: str) -> bool:
    return base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_renders_to_an_embeddable_png_with_failures_labelled():
    frame, samples = frame_and_samples()
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
