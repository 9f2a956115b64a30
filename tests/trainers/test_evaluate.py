from types import SimpleNamespace

import pytest
import torch

from trainers.evaluate import EvalSettings, SftBaseline, evaluate, summarize_samples, win_rate
from trainers.models import build_task_tokenizer, build_tiny_model
from trainers.reward import SyntheticGoldReward
from trainers.synthetic import generate_split


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_summarize_samples_hand_computed():
    samples = [{"score": 2.0, "chosen_score": 1.0, "sft_score": 2.0, "kl": 0.5, "length": 4},
               {"score": 0.0, "chosen_score": 3.0, "sft_score": -1.0, "kl": 1.5, "length": 6}]
    assert summarize_samples(samples) == {"mean_score": 1.0, "win_vs_chosen": 0.5, "win_vs_sft": 0.75,
                                          "kl": 1.0, "length": 5.0}


def test_evaluate_records_every_metric_and_zero_kl_against_itself():
    tokenizer = build_task_tokenizer()
    tiny = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64, seed=0)
    model = build_tiny_model(tiny, tokenizer)
    pairs = generate_split("eval", 8, seed=0)
    settings = EvalSettings(temperature=0.7, top_p=0.95, max_new_tokens=8, num_prompts=6, seed=0, batch_size=4)
    chosen = dict(zip([p.prompt_id for p in pairs], SyntheticGoldReward().score([p.prompt for p in pairs],
                                                                                [p.chosen for p in pairs])))
    sft = SftBaseline(model, {p.prompt_id: 0.0 for p in pairs}, chosen)
    metrics, samples = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), settings, torch.device("cpu"), sft)
    assert len(samples) == 6 and set(metrics) == {"mean_score", "win_vs_chosen", "win_vs_sft", "kl", "length"}
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own SFT model here
    assert all(0 <= s["length"] <= 8 for s in samples)
    assert [s["chosen_score"] for s in samples] == [chosen[p.prompt_id] for p in pairs[:6]]
    again, _ = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), settings, torch.device("cpu"), sft)
    assert again == metrics  # seeded sampling
