"""Log-probs without full-vocabulary logits: the chunked head against log_softmax, packed and prefix-shared rows
against padded rows and against each sequence run alone, the probe's fallbacks, and loss curves."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from trainers.data import encode_pairs
from trainers.logprobs import (HeadSupport, TargetLogProbs, choose_layout, describe_head, head_support, packing_refusal,
                               sequence_logps)
from trainers.models import build_task_tokenizer, build_tiny_model
from trainers.objectives import preference_objective, sft_objective
from trainers.packing import PADDED, Layout
from trainers.synthetic import generate_split
from trainers.train import LoopSettings, make_accelerator, make_optimizer, reference_logps, train

TINY = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=64, seed=0)
PACKED = Layout(True)


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_task_tokenizer()
    return tokenizer, encode_pairs(tokenizer, generate_split("train", 64, seed=0), max_length=40)


def unchunked(hidden, weight, bias, target):
    return torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), -1).gather(1, target[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 3, 10, 1000])
def test_chunked_head_equals_log_softmax_and_its_gradients_in_float64(chunk):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randint(0, 50, (10,), generator=generator)
    upstream = torch.randn(10, dtype=torch.float64, generator=generator)
    values, grads = [], []
    for fn in (lambda: TargetLogProbs.apply(hidden, weight, bias, target, chunk), lambda: unchunked(hidden, weight,
                                                                                                    bias, target)):
        out = fn()
        values.append(out.detach())
        grads.append(torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias)))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-12)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunked_head_under_bf16_autocast_rounds_like_the_models_own_head():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    target = torch.randint(0, 40, (8,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = TargetLogProbs.apply(hidden, weight, None, target, 3)
        theirs = unchunked(hidden, weight, None, target.clone())
    assert ours.dtype == torch.float32  # log-softmax in float32, like logps_from_logits did for half logits
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0.05)
    (g_ours,) = torch.autograd.grad(ours.sum(), weight)
    assert g_ours.dtype == torch.float32 and torch.isfinite(g_ours).all()


def oracle_logps(model, seqs) -> torch.Tensor:
    """Each sequence alone, no padding, full logits and log_softmax: the definition."""
    out = []
    for s in seqs:
        logprobs = model(torch.tensor([s.ids])).logits.log_softmax(-1)[0]
        out.append(sum(logprobs[t - 1, s.ids[t]] for t in range(max(s.prompt_len, 1), len(s.ids))))
    return torch.stack(out)


def grads_of(model, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    values = fn()
    (values * torch.arange(1, values.numel() + 1, dtype=values.dtype)).sum().backward()
    return values.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_shared_and_padded_rows_give_the_oracles_logps_and_gradients(setup):
    """float64 tiny Llama: the log-probs agree to 1e-12. Gradients agree to float32 precision only: Llama's
    RMSNorm and rotary embeddings compute in float32 even in a float64 model, and a shared prompt receives the
    sum of both responses' gradients where padded rows give each copy its own."""
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer).double()
    batch = pairs[:12]
    seqs = [p.chosen for p in batch] + [p.rejected for p in batch]
    want, want_grads = grads_of(model, lambda: oracle_logps(model, seqs))
    for layout in (PADDED, PACKED):
        got, got_grads = grads_of(model, lambda: sequence_logps(model, layout.pairs(batch, tokenizer.pad_token_id))[0])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * w.abs().max().item())


class SoftCapped(torch.nn.Module):
    """A causal LM whose forward changes its head's output (Gemma-2 style soft-capping)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out


class NoLogitsToKeep(SoftCapped):
    """A causal LM that takes no logits_to_keep (older modelling code)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("wrapper,support", [(SoftCapped, HeadSupport(True, False)),
                                             (NoLogitsToKeep, HeadSupport(False, False))])
def test_the_probe_sends_models_that_change_their_logits_to_the_plain_path(setup, wrapper, support):
    tokenizer, pairs = setup
    model = wrapper(build_tiny_model(TINY, tokenizer).double())
    assert head_support(build_tiny_model(TINY, tokenizer)) == HeadSupport(True, True)
    assert head_support(model) == support and "full-vocabulary logits" in describe_head(model)
    seqs = [p.chosen for p in pairs[:4]]
    want = oracle_logps(lambda ids: model(input_ids=ids), seqs)
    got, _ = sequence_logps(model, PADDED.sequences(seqs, tokenizer.pad_token_id))
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-10)


def test_models_that_cannot_read_packed_rows_get_padded_rows_with_the_reason(setup):
    tokenizer, _ = setup
    model = build_tiny_model(TINY, tokenizer)
    assert choose_layout(model, True, 40) == Layout(True)
    assert choose_layout(model, False, 40) == PADDED
    model.config.sliding_window = 16
    assert "sliding-window attention (16 tokens)" in packing_refusal(model, 40)
    assert packing_refusal(model, 16) is None  # no sequence is longer than the window: nothing is cut
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert "sliding_attention" in choose_layout(model, True, 40).reason
    model.config.layer_types = None
    model.config._attn_implementation = "flash_attention_2"
    layout = choose_layout(model, True, 40)
    assert not layout.packed and "'flash_attention_2' takes no block mask" in layout.describe()


def loop_settings(**changes) -> LoopSettings:
    return dataclasses.replace(LoopSettings(learning_rate=3e-3, epochs=1, batch_size=16, warmup_ratio=0.0,
                                            weight_decay=0.0, max_grad_norm=1.0, max_steps=4, seed=0, log_every=1),
                               **changes)


@pytest.mark.parametrize("method,hparams", [("sft", {}), ("dpo", {"beta": 0.5}), ("simpo", {"beta": 2.0, "gamma": 0.5}),
                                            ("ipo", {"beta": 0.5}), ("orpo", {"beta": 0.5})])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss_curves_and_weights(setup, method, hparams, attention):
    tokenizer, pairs = setup
    # another model as the reference: margins away from 0, so reward_accuracy does not flip on rounding
    other = build_tiny_model(SimpleNamespace(**{**vars(TINY), "seed": 1}), tokenizer)
    reference = reference_logps(other, pairs, tokenizer.pad_token_id, 16, torch.device("cpu"), padding_free=False)
    runs = []
    for padding_free in (False, True):
        model = build_tiny_model(TINY, tokenizer)
        model.config._attn_implementation = attention
        objective = sft_objective if method == "sft" else preference_objective(method, hparams, reference)
        history = train(model, pairs, objective, loop_settings(padding_free=padding_free), make_accelerator())
        runs.append((history, model))
    (padded, padded_model), (packed, packed_model) = runs
    assert [h["step"] for h in packed] == [1, 2, 3, 4]
    for got, want in zip(packed, padded):
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    for p, q in zip(packed_model.parameters(), padded_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)  # Adam magnifies rounding in near-zero gradients


def test_reference_logps_are_the_same_in_either_layout(setup):
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)
    padded = reference_logps(model, pairs, tokenizer.pad_token_id, 16, torch.device("cpu"), padding_free=False)
    packed = reference_logps(model, pairs, tokenizer.pad_token_id, 16, torch.device("cpu"))
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_fused_adamw_takes_the_steps_of_the_per_parameter_loop(setup):
    tokenizer, _ = setup
    settings = loop_settings(weight_decay=0.01)
    models = [build_tiny_model(TINY, tokenizer) for _ in range(2)]
    optimizers = [make_optimizer(list(models[0].parameters()), settings),
                  torch.optim.AdamW(models[1].parameters(), lr=settings.learning_rate, weight_decay=0.01, foreach=False)]
    assert optimizers[0].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
