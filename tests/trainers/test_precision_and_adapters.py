"""Precision, activation checkpointing and LoRA on the tiny model: what each changes and what it must not."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from trainers.adapters import AdapterDisabled, apply_lora, merged
from trainers.data import EncodedSequence, encode_pairs
from trainers.logprobs import sequence_logps
from trainers.models import build_task_tokenizer, build_tiny_model
from trainers.objectives import epsilon_dpo_objective, preference_objective, sft_objective
from trainers.packing import Layout
from trainers.synthetic import generate_split
from trainers.train import LoopSettings, make_accelerator, reference_logps, train

TINY = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=64, seed=0)
LORA = SimpleNamespace(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
SETTINGS = LoopSettings(learning_rate=3e-3, epochs=1, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                        max_grad_norm=1.0, max_steps=6, seed=0, log_every=1)


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_task_tokenizer()
    return tokenizer, encode_pairs(tokenizer, generate_split("train", 96, seed=0), max_length=40)


def _model(tokenizer):
    return build_tiny_model(TINY, tokenizer)


def _losses(history):
    return [h["loss"] for h in history]


def test_bf16_trains_on_cpu_with_finite_losses_close_to_fp32(setup):
    tokenizer, pairs = setup
    fp32 = _losses(train(_model(tokenizer), pairs, sft_objective, SETTINGS, make_accelerator()))
    model = _model(tokenizer)
    before = model.model.embed_tokens.weight.detach().clone()
    bf16 = _losses(train(model, pairs, sft_objective, dataclasses.replace(SETTINGS, precision="bf16"),
                         make_accelerator()))
    assert all(torch.isfinite(torch.tensor(bf16))) and bf16[-1] < bf16[0]
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1  # rounded, not another run
    assert model.model.embed_tokens.weight.dtype == torch.float32  # weights stay fp32 (mixed precision)
    assert not torch.equal(before, model.model.embed_tokens.weight)


def test_fp16_on_cpu_is_refused_with_the_reason(setup):
    tokenizer, pairs = setup
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU .* runs on cpu: use bf16 or fp32"):
        train(_model(tokenizer), pairs, sft_objective, dataclasses.replace(SETTINGS, precision="fp16"),
              make_accelerator())


def test_gradient_checkpointing_changes_memory_not_numbers(setup):
    tokenizer, pairs = setup
    reference = reference_logps(_model(tokenizer), pairs, tokenizer.pad_token_id, 16, torch.device("cpu"))
    curves = []
    for checkpointing in (False, True):
        model = _model(tokenizer)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        curves.append(_losses(train(model, pairs, preference_objective("dpo", {"beta": 0.5}, reference), SETTINGS,
                                    make_accelerator())))
    assert curves[0] == pytest.approx(curves[1], abs=1e-6)


def test_lora_trains_only_adapters_and_its_disabled_view_is_the_starting_model(setup):
    tokenizer, pairs = setup
    base = _model(tokenizer)
    start = {k: v.clone() for k, v in base.state_dict().items()}
    device = torch.device("cpu")
    expected = reference_logps(base, pairs, tokenizer.pad_token_id, 16, device)
    policy = apply_lora(base, LORA)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the reference from the same model with adapters off = the starting checkpoint's numbers: the shared
    # reference-log-prob cache (keyed by that checkpoint) applies unchanged
    view = AdapterDisabled(policy)
    assert all(torch.equal(a, b) for a, b in zip(reference_logps(view, pairs, tokenizer.pad_token_id, 16, device),
                                                  expected))
    history = train(policy, pairs, preference_objective("dpo", {"beta": 0.5}, expected), SETTINGS,
                    make_accelerator())
    assert history[-1]["loss"] < history[0]["loss"]
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in policy.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(start[k], base_now[k]) for k in start)  # the base weights never moved
    policy.train()
    after = reference_logps(view, pairs, tokenizer.pad_token_id, 16, device)
    assert all(torch.equal(a, b) for a, b in zip(after, expected))
    assert policy.training  # the view ran the policy in eval mode and left it as it found it
    batch = Layout(True).sequences([EncodedSequence([1, 5, 6, 7, 2], prompt_len=2)], tokenizer.pad_token_id)
    adapted = sequence_logps(policy, batch)[0]
    assert not torch.equal(adapted, sequence_logps(view, batch)[0])  # the adapters did learn something
    plain = merged(policy)  # what an SFT trial saves: adapters folded into plain weights
    assert not any("lora_" in k for k in plain.state_dict())
    assert torch.allclose(sequence_logps(plain, batch)[0], adapted, atol=1e-5)


def test_lora_epsilon_dpo_uses_the_adapter_disabled_view_as_its_reference(setup):
    tokenizer, pairs = setup
    policy = apply_lora(_model(tokenizer), LORA)
    policy.train()
    view = AdapterDisabled(policy)
    objective = epsilon_dpo_objective({"beta": 0.1, "epsilon": 0.01}, view)
    assert policy.training  # building the objective put only the view in eval mode, not the policy
    history = train(policy, pairs, objective, SETTINGS, make_accelerator())
    assert all(torch.isfinite(torch.tensor(_losses(history))))
    # at step 1 the adapters are zero-initialised (B = 0): policy = reference, so the DPO part starts at log 2
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_unknown_lora_target_modules_are_named(setup):
    tokenizer, _ = setup
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] are not modules of this model"):
        apply_lora(_model(tokenizer), SimpleNamespace(**{**vars(LORA), "target_modules": ["qkv_proj"]}))


SWEEP = """\
name: options
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 1, precision: bf16, gradient_checkpointing: true{lora}}}
evaluation: {{num_prompts: 16, max_new_tokens: 12}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-3]}}}}
    epsilon_dpo: {{grid: {{beta: [0.1], epsilon: [0.01], learning_rate: [1.0e-3]}}}}
"""


@pytest.mark.parametrize("lora", [False, True])
def test_a_sweep_with_bf16_checkpointing_and_lora_loads_one_model_per_lora_trial(tmp_path, monkeypatch, lora):
    """Through the real trial: every stage finishes; with LoRA each preference trial loads one model (the
    reference and the KL baseline are its adapter-disabled view). Without LoRA dpo loads three (policy; the
    reference for the cache, freed before training; the SFT model for KL) and epsilon_dpo two (policy;
    the reference it keeps, reused for KL)."""
    from orchestrator.core.spec_file import parse_spec
    from orchestrator.pipeline import run_sweep
    from orchestrator.progress import QUIET
    from orchestrator.runtime.sweep_runs import SweepTracker
    from trainers import trial as trial_module

    loads = []
    real_load = trial_module.load_causal_lm
    monkeypatch.setattr(trial_module, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    text = SWEEP.format(workdir=tmp_path / "work", lora=", lora: {r: 4}" if lora else "")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(parse_spec(text), uri, output=QUIET)
    assert outcome.failed == 0, [r.tags.get("posweep.failure") for r in outcome.records]
    records = {r.stage: r for r in SweepTracker(uri, "options").trials()}
    assert records["sft"].params["training.precision"] == "bf16"
    for stage in ("sft", "dpo", "epsilon_dpo"):
        assert records[stage].metrics["train_steps"] == 4
    assert len(loads) == (1 + 1 + 1 + 1 if lora else 1 + 1 + 3 + 2)


def test_a_bf16_accelerator_left_by_another_library_does_not_leak_into_trials(setup):
    """Bug guard: after TRL's DPOTrainer (its config defaults to bf16) had built an Accelerator in the same
    process, our accelerators inherited bf16 autocast, and fp32 trials silently trained in bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    tokenizer, pairs = setup
    expected = _losses(train(_model(tokenizer), pairs, sft_objective, SETTINGS, make_accelerator()))
    AcceleratorState._reset_state(reset_partial_state=False)
    Accelerator(cpu=True, mixed_precision="bf16")  # what another library's trainer leaves behind
    assert make_accelerator().mixed_precision == "no"
    again = _losses(train(_model(tokenizer), pairs, sft_objective, SETTINGS, make_accelerator()))
    assert again == expected
