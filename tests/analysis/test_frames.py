"""Typed analysis frames from plain tracking records."""

import math

import pandas as pd

from analysis.frames import samples_frame, sweep_frame


def test_sweep_frame_types_hyperparameters_and_keeps_failed_trials():
    records = [
        {"stage": "simpo", "method": "simpo", "run_name": "simpo b=2 g=0.5", "status": "FINISHED", "trial_key": "k1",
         "params": {"beta": "2.0", "gamma": "0.5", "learning_rate": "0.0001", "epochs": "3", "method": "simpo"},
         "metrics": {"mean_score": 1.5, "kl": 0.3, "wall_seconds": 12.0, "gpu_hours": 0.0}, "tags": {}},
        {"stage": "dpo", "method": "dpo", "run_name": "dpo b=0.1", "status": "FAILED", "trial_key": "k2",
         "params": {"beta": "0.1", "learning_rate": "1e-05", "epochs": "1"},
         "metrics": {"wall_seconds": 3.0}, "tags": {"posweep.failure": "NonFiniteLoss: at step 4"}},
    ]
    frame = sweep_frame(records, ["beta", "gamma", "learning_rate", "epochs"])
    assert len(frame) == 2
    simpo, dpo = frame.iloc[0], frame.iloc[1]
    assert simpo["beta"] == 2.0 and simpo["gamma"] == 0.5 and simpo["epochs"] == 3 and simpo["learning_rate"] == 1e-4
    assert math.isnan(dpo["gamma"]) and dpo["learning_rate"] == 1e-5 and dpo["epochs"] == 1
    assert math.isnan(dpo["mean_score"]) and dpo["wall_seconds"] == 3.0
    assert dpo["failure"].startswith("NonFiniteLoss") and pd.isna(simpo["failure"])


def test_samples_frame_has_a_row_per_trial_and_prompt():
    frame = samples_frame({"k1": [{"prompt_id": "p0", "score": 1, "length": 5, "kl": 0.2, "sft_score": 0.5,
                                   "chosen_score": 0.7, "generation": "..."}],
                           "k2": [{"prompt_id": "p0", "score": 2, "length": 6, "chosen_score": 0.7}]})
    assert list(frame["trial_key"]) == ["k1", "k2"]
    assert frame.loc[0, "kl"] == 0.2 and math.isnan(frame.loc[1, "kl"]) and frame["score"].dtype == float
