from types import SimpleNamespace

import pytest
import torch

from trainers.evaluate import (EvalSettings, SamplingVocabulary, SftBaseline, evaluate, generate, summarize_samples,
                               win_rate)
from trainers.generation import Sample
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
                                                                                [p.chosen for p in pairs]).values))
    sft = SftBaseline(model, {p.prompt_id: 0.0 for p in pairs}, chosen)
    evaluation = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), settings, torch.device("cpu"), sft)
    metrics, samples = evaluation.metrics, evaluation.samples
    assert len(samples) == 6 and set(metrics) == {"mean_score", "win_vs_chosen", "win_vs_sft", "kl", "length"}
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own SFT model here
    assert all(0 <= s["length"] <= 8 for s in samples)
    assert [s["chosen_score"] for s in samples] == [chosen[p.prompt_id] for p in pairs[:6]]
    again = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), settings, torch.device("cpu"), sft).metrics
    assert again == metrics  # seeded sampling


def _tiny(tokenizer):
    tiny = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64, seed=0)
    return build_tiny_model(tiny, tokenizer)


def test_sampling_emits_no_pad_bos_or_unknown_and_length_counts_the_scored_text():
    """A policy that puts most of its mass on <pad>, <s> and <unk> (what SimPO drifted towards on the quickstart):
    before, those tokens were sampled mid-response, counted in `length` and dropped from the scored text."""
    tokenizer = build_task_tokenizer()
    model = _tiny(tokenizer)
    non_text = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]

    def favour_non_text(module, inputs, logits):
        logits = logits.clone()
        logits[..., non_text] += 8.0
        return logits

    model.lm_head.register_forward_hook(favour_non_text)
    pairs = generate_split("eval", 16, seed=0)
    settings = EvalSettings(temperature=1.0, top_p=1.0, max_new_tokens=12, num_prompts=16, seed=0, batch_size=8)
    generations = generate(model, tokenizer, pairs, settings, torch.device("cpu"))
    assert not any(t in non_text for g in generations for t in g.ids)
    assert any(g.length > 0 for g in generations)
    samples = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), settings, torch.device("cpu")).samples
    for sample in samples:  # the word-level task tokenizer: one token per word of the scored text
        assert sample["length"] == len(tokenizer(sample["generation"], add_special_tokens=False).input_ids)


def test_special_tokens_other_than_pad_bos_unknown_end_the_response():
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=2, bos_token_id=1, unk_token_id=None,
                                all_special_ids=[1, 2, 7])  # pad = EOS, as for tokenizers that had no pad
    vocabulary = SamplingVocabulary.of(tokenizer)
    assert vocabulary.suppressed == (1,) and vocabulary.stops == (2, 7)
    cut = lambda ids: (vocabulary.generation(Sample(ids, 0.0)).ids, vocabulary.generation(Sample(ids, 0.0)).length)  # noqa: E731
    assert cut([5, 6, 7]) == ([5, 6, 7], 2)   # an end-of-turn token ends it, counted in ids (KL), not length
    assert cut([5, 2]) == ([5, 2], 1)
    assert cut([5, 6]) == ([5, 6], 2)          # never ended: every token is text


def test_a_stop_token_ends_the_sampled_row():
    """The engine ends a row at its first stop token (kept in ids): a policy that favours an end-of-turn token."""
    tokenizer = build_task_tokenizer()
    model = _tiny(tokenizer)
    stop = tokenizer.eos_token_id

    def favour_stop(module, inputs, logits):
        logits = logits.clone()
        logits[..., stop] += 6.0
        return logits

    model.lm_head.register_forward_hook(favour_stop)
    settings = EvalSettings(temperature=1.0, top_p=1.0, max_new_tokens=12, num_prompts=8, seed=0, batch_size=8)
    generations = generate(model, tokenizer, generate_split("eval", 8, seed=0), settings, torch.device("cpu"))
    assert all(g.ids.count(stop) <= 1 for g in generations)
    assert all(g.ids[-1] == stop and g.length == len(g.ids) - 1 for g in generations if stop in g.ids)
    assert any(len(g.ids) < 12 for g in generations)
