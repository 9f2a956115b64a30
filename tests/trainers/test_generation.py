"""Sampling (trainers.generation): the draw with hand-computed numbers, length batches, and batch invariance: a
sample depends on its prompt, the evaluation seed and the weights, not on which prompts share its batch."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

import trainers.generation as generation
from trainers.data import EncodedSequence
from trainers.evaluate import EvalSettings, SftBaseline, encode_prompts, evaluate, generate, sequences_logps
from trainers.generation import SamplingParams, draw, length_batches, stream_seed, stream_uniforms, waves
from trainers.models import build_task_tokenizer, build_tiny_model
from trainers.reward import SyntheticGoldReward
from trainers.synthetic import generate_split

CPU = torch.device("cpu")


def _logits(*probabilities):
    return torch.log(torch.tensor([list(probabilities)], dtype=torch.float32))


def _pick(logits, u, **params):
    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 1, **params}
    return int(draw(logits, torch.tensor([u], dtype=torch.float64), SamplingParams(**settings))[0])


def test_draw_inverse_cdf_over_the_nucleus_hand_computed():
    """p = (0.05, 0.5, 0.15, 0.3) over ids 0..3. By decreasing p: id 1 (0.5), id 3 (0.3), id 2 (0.15), id 0 (0.05);
    cumulative 0.5, 0.8, 0.95, 1.0. top_p 0.8 keeps ids 1 and 3 (mass before id 2 is 0.8, not below 0.8): u = 0.5
    -> 0.5 x 0.8 = 0.40 < 0.5: id 1; u = 0.7 -> 0.56: id 3; u = 0.99 -> 0.792: id 3. top_p 0.81 also keeps id 2
    (mass 0.95): u = 0.9 -> 0.855 > 0.8: id 2."""
    logits = _logits(0.05, 0.5, 0.15, 0.3)
    assert [_pick(logits, u, top_p=0.8) for u in (0.0, 0.5, 0.7, 0.99)] == [1, 1, 3, 3]
    assert _pick(logits, 0.9, top_p=0.81) == 2
    # top_p 1: inverse CDF over ids in order, cumulative 0.05, 0.55, 0.70, 1.0
    assert [_pick(logits, u) for u in (0.01, 0.3, 0.6, 0.75)] == [0, 1, 2, 3]


def test_draw_temperature_and_suppression_hand_computed():
    """Temperature 0.5 squares p: (0.25, 0.25, 0.5)/1 over (0.25, 0.25, 0.5) -> p^2 = (1/16, 1/16, 1/4), normalised
    (1/6, 1/6, 2/3): u = 0.2 -> id 1 (cumulative 1/6, 1/3, 1). Suppressing id 2 leaves (1/2, 1/2): u = 0.6 -> id 1."""
    logits = _logits(0.25, 0.25, 0.5)
    assert _pick(logits, 0.2, temperature=0.5) == 1
    assert _pick(logits, 0.1, temperature=0.5) == 0
    assert _pick(logits, 0.5, temperature=0.5) == 2
    assert [_pick(logits, u, suppressed=(2,)) for u in (0.4, 0.6)] == [0, 1]


def test_draw_ties_go_to_the_lower_id_and_a_wide_nucleus_is_found_beyond_the_candidates(monkeypatch):
    flat = torch.zeros(1, 10)                  # ten equal tokens: top_p 0.55 keeps six, the lowest ids
    assert [_pick(flat, u, top_p=0.55) for u in (0.0, 0.99)] == [0, 5]
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 3)  # the nucleus (6 tokens) is wider: full sort
    assert [_pick(flat, u, top_p=0.55) for u in (0.0, 0.99)] == [0, 5]


def test_draw_rows_do_not_depend_on_each_other():
    torch.manual_seed(0)
    logits, uniforms = torch.randn(8, 50) * 3, torch.rand(8, dtype=torch.float64)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=1, suppressed=(0,))
    together = draw(logits, uniforms, params)
    alone = torch.cat([draw(logits[i:i + 1], uniforms[i:i + 1], params) for i in range(8)])
    assert torch.equal(together, alone)
    assert 0 not in together.tolist()


def test_streams_are_per_prompt_and_seed():
    assert stream_seed(0, "p1") == stream_seed(0, "p1") != stream_seed(0, "p2") != stream_seed(1, "p1")
    assert 0 <= stream_seed(0, "p1") < 2 ** 63
    assert torch.equal(stream_uniforms(5, 4), stream_uniforms(5, 8)[:4])


def test_length_batches_fewest_positions_plus_batch_cost():
    """Lengths 9, 7, 5, 3, 1 (ids 2, 4, 0, 1, 3). With a batch cost of 0 every prompt is its own batch (no padding).
    With a cost of 100 one batch (5 x 9 = 45 positions + 100) beats any split. With max_tokens 20 a batch of
    rows x longest <= 20 holds [9, 7] (18) and then [5, 3, 1] (15)."""
    lengths = [5, 3, 9, 1, 7]
    assert length_batches(lengths, 10, 100, 0, 0) == [[2], [4], [0], [1], [3]]
    assert length_batches(lengths, 10, 100, 0, 100) == [[2, 4, 0, 1, 3]]
    assert length_batches(lengths, 10, 20, 0, 100) == [[2, 4], [0, 1, 3]]
    assert length_batches(lengths, 2, 100, 0, 100) == [[2, 4], [0, 1], [3]]       # max_rows
    assert length_batches(lengths, 10, 26, 10, 100) == [[2], [4], [0], [1, 3]]     # reserve: 2 x (3 + 10) <= 26
    assert length_batches([50], 4, 10, 0) == [[0]]                                   # one row always fits
    # the partition is optimal: a greedy fill would give [[12, 11], [2, 1]] = 24 + 4 + 2 x 10 = 48
    assert length_batches([12, 11, 2, 1], 2, 100, 0, 10) == [[0, 1], [2, 3]]
    assert waves([[0, 1], [2], [3]], [5, 5, 4, 9], 14) == [[[0, 1], [2]], [[3]]]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_task_tokenizer()
    shape = SimpleNamespace(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_positions=128, seed=0)
    return tokenizer, build_tiny_model(shape, tokenizer).eval()


def _settings(**overrides):
    values = dict(temperature=0.7, top_p=0.95, max_new_tokens=12, num_prompts=40, seed=0, batch_size=16)
    return EvalSettings(**{**values, **overrides})


def test_samples_and_metrics_do_not_depend_on_batch_size_or_order(tiny):
    """The same 40 prompts evaluated with batch sizes 1, 5 and 16, each in a shuffled order: identical tokens, scores,
    lengths and win rates. The KL differs in float rounding only (the matmuls see other batch shapes)."""
    tokenizer, model = tiny
    pairs = generate_split("eval", 40, seed=0)
    baseline = SftBaseline(model, {p.prompt_id: 0.0 for p in pairs}, {p.prompt_id: 0.0 for p in pairs})
    results = {}
    for batch_size in (1, 5, 16):
        shuffled = list(pairs)
        random.Random(batch_size).shuffle(shuffled)
        evaluation = evaluate(model, tokenizer, shuffled, SyntheticGoldReward(), _settings(batch_size=batch_size),
                              CPU, baseline)
        results[batch_size] = ({s["prompt_id"]: s for s in evaluation.samples}, evaluation.metrics)
    samples, metrics = results[1]
    for batch_size in (5, 16):
        other, other_metrics = results[batch_size]
        for prompt_id, sample in samples.items():
            assert {k: v for k, v in other[prompt_id].items() if k != "kl"} == \
                   {k: v for k, v in sample.items() if k != "kl"}
            assert other[prompt_id]["kl"] == pytest.approx(sample["kl"], abs=1e-4)
        assert {k: v for k, v in other_metrics.items() if k != "kl"} == {k: v for k, v in metrics.items() if k != "kl"}
        assert other_metrics["kl"] == pytest.approx(metrics["kl"], abs=1e-5)


def test_prefill_apart_equals_prefill_in_the_batch_and_dropping_ended_rows_changes_nothing(tiny, monkeypatch):
    """Full-attention models prefill prompts apart from their decode batch (then move their cache); others prefill
    each batch left-padded. Rows that end are dropped from the batch at some point: neither changes a sample."""
    tokenizer, model = tiny
    pairs = generate_split("eval", 24, seed=1)
    eos = tokenizer.eos_token_id

    def end_often(module, inputs, logits):  # rows end after a few tokens, at different steps
        logits = logits.clone()
        logits[..., eos] += 3.0
        return logits

    hook = model.lm_head.register_forward_hook(end_often)
    settings = _settings(num_prompts=24, batch_size=8, max_new_tokens=16)
    apart = generate(model, tokenizer, pairs, settings, CPU)
    assert len({len(g.ids) for g in apart}) > 1  # some rows ended early
    monkeypatch.setattr(generation, "full_attention_only", lambda model: False)
    in_batch = generate(model, tokenizer, pairs, settings, CPU)
    monkeypatch.setattr(generation, "DROP_SHARE", 1.01)  # never drop an ended row
    kept = generate(model, tokenizer, pairs, settings, CPU)
    hook.remove()
    assert [g.ids for g in apart] == [g.ids for g in in_batch] == [g.ids for g in kept]
    assert [g.logp for g in apart] == pytest.approx([g.logp for g in kept], abs=1e-4)


def test_the_samplers_log_probs_are_the_models_log_probs_of_the_sample(tiny):
    """KL uses the policy's log-probs recorded while sampling (temperature 1, nothing suppressed): the same as a
    separate pass over prompt + sample."""
    tokenizer, model = tiny
    pairs = generate_split("eval", 10, seed=2)
    settings = _settings(num_prompts=10, temperature=1.3, top_p=0.8)
    generations = generate(model, tokenizer, pairs, settings, CPU)
    prompts = encode_prompts(tokenizer, pairs, settings.max_prompt_length).ids
    seqs = [EncodedSequence(ids + g.ids, len(ids)) for ids, g in zip(prompts, generations)]
    separate = sequences_logps(model, seqs, tokenizer.pad_token_id, CPU, settings)
    assert [g.logp for g in generations] == pytest.approx(separate, abs=1e-4)
    assert all(math.isfinite(v) and v < 0 for v in separate)


def test_a_prompt_longer_than_max_prompt_length_keeps_its_end_and_is_counted(tiny):
    tokenizer, model = tiny
    pairs = generate_split("eval", 6, seed=3)
    lengths = [len(ids) for ids in encode_prompts(tokenizer, pairs, 10 ** 6).ids]
    keep = min(lengths) - 1
    evaluation = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), _settings(num_prompts=6, max_prompt_length=keep),
                          CPU)
    assert evaluation.usage.prompts_cut == 6 and evaluation.usage.prompt_tokens == 6 * keep
    whole = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), _settings(num_prompts=6), CPU)
    assert whole.usage.prompts_cut == 0 and whole.usage.prompt_tokens == sum(lengths)


def test_bf16_evaluation_runs_and_reports_its_phases(tiny):
    tokenizer, model = tiny
    pairs = generate_split("eval", 8, seed=4)
    baseline = SftBaseline(model, {p.prompt_id: 0.0 for p in pairs}, {p.prompt_id: 0.0 for p in pairs})
    evaluation = evaluate(model, tokenizer, pairs, SyntheticGoldReward(), _settings(num_prompts=8, precision="bf16"),
                          CPU, baseline)
    usage = evaluation.usage.metrics()
    assert set(usage) == {"time_generate_s", "time_reward_s", "time_kl_s", "generated_tokens",
                          "generated_tokens_per_s"}
    lengths = sum(s["length"] for s in evaluation.samples)  # the tokens before each response's end
    assert lengths <= usage["generated_tokens"] <= lengths + len(evaluation.samples)
    assert usage["time_generate_s"] > 0 and usage["time_kl_s"] > 0 and usage["generated_tokens_per_s"] > 0
    assert abs(evaluation.metrics["kl"]) < 1.0  # the policy against itself, in bf16


def test_the_spec_offers_exactly_the_registered_engines():
    from typing import get_args

    from orchestrator.core.spec import EvaluationSpec

    assert set(get_args(EvaluationSpec.model_fields["engine"].annotation)) == set(generation.ENGINES.names())
    assert get_args(EvaluationSpec.model_fields["sampler_version"].annotation) == (generation.SAMPLER_VERSION,)
