"""A toy sweep for analysis tests: DPO and SimPO, 8 runs each (the last one FAILED), 6 prompts per run."""

import pytest

from analysis.frames import samples_frame, sweep_frame


def build_toy_sweep():
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



@pytest.fixture
def toy_sweep():
    """(sweep frame, samples frame)"""
    return build_toy_sweep()
