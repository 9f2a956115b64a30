import math

from analysis.summary import best_per_stage, format_summary, trials_frame


def record(stage, name, status, score, **extra):
    metrics = {"mean_score": score, "win_vs_chosen": 0.5, "length": 5.0, **extra} if status == "FINISHED" else {}
    return {"stage": stage, "method": stage, "run_name": name, "status": status, "trial_key": name,
            "metrics": metrics}


def test_best_per_stage_counts_failures_and_keeps_order():
    frame = trials_frame([record("sft", "s1", "FINISHED", 1.0), record("sft", "s2", "FINISHED", 2.0),
                          record("dpo", "d1", "FAILED", 0.0), record("dpo", "d2", "FINISHED", 3.0, kl=1.0,
                                                                      win_vs_sft=0.7),
                          record("simpo", "p1", "FAILED", 0.0)])
    table = best_per_stage(frame, ["sft", "dpo", "simpo"])
    assert list(table["stage"]) == ["sft", "dpo", "simpo"]
    assert list(table["best run"]) == ["s2", "d2", "(none finished)"]
    assert list(table["finished"]) == [2, 1, 0] and list(table["failed"]) == [0, 1, 1]
    assert math.isnan(table.loc[0, "kl"]) and table.loc[1, "kl"] == 1.0
    assert "(none finished)" in format_summary(table)
