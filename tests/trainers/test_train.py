"""The training loop on the tiny model: losses go down, parameters move, divergence is caught."""

import math
from types import SimpleNamespace

import pytest
import torch

from orchestrator.core.methods import METHODS
from trainers.data import EncodedPair, EncodedSequence, encode_pairs, encode_sequence
from trainers.logprobs import sequence_logps
from trainers.models import build_task_tokenizer, build_tiny_model
from trainers.objectives import ObservedObjective, SFTObjective, preference_objective, sft_objective
from trainers.packing import PADDED, Layout
from trainers.synthetic import generate_split
from trainers.train import LoopHooks, LoopSettings, NonFiniteLoss, make_accelerator, reference_logps, train

TINY = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64, seed=0)


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_task_tokenizer()
    pairs = encode_pairs(tokenizer, generate_split("train", 128, seed=0), max_length=40)
    return tokenizer, pairs


def settings(lr, steps=None, epochs=2):
    return LoopSettings(learning_rate=lr, epochs=epochs, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                        max_grad_norm=1.0, max_steps=steps, seed=0, log_every=1)


def test_encode_sequence_keeps_prompt_and_truncates_response():
    tokenizer = build_task_tokenizer()
    seq = encode_sequence(tokenizer, "ask tell koza and bifa ?", "very " * 20, max_length=10)
    assert len(seq.ids) == 10 and seq.prompt_len == 7 and seq.ids[0] == tokenizer.bos_token_id
    full = encode_sequence(tokenizer, "ask tell koza and bifa ?", "very so", max_length=40)
    assert full.ids[-1] == tokenizer.eos_token_id and len(full.ids) == 7 + 3


@pytest.mark.parametrize("layout", [PADDED, Layout(True)], ids=["padded", "packed"])
def test_sequence_logps_match_a_manual_sum(layout):
    tokenizer = build_task_tokenizer()
    model = build_tiny_model(TINY, tokenizer).eval()
    seqs = [encode_sequence(tokenizer, "ask tell koza and bifa ?", r, 40) for r in ("very so", "so")]
    batch = layout.sequences(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, lengths = sequence_logps(model, batch)
        for row, seq in enumerate(seqs):
            ids = torch.tensor([seq.ids])
            logprobs = model(ids).logits.log_softmax(-1)[0]  # (T, V), unpadded
            manual = sum(logprobs[t - 1, seq.ids[t]].item() for t in range(seq.prompt_len, len(seq.ids)))
            assert logps[row].item() == pytest.approx(manual, abs=1e-4)
            assert lengths[row].item() == len(seq.ids) - seq.prompt_len


def test_sft_loss_goes_down(setup):
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)
    history = train(model, pairs, sft_objective, settings(1e-2, epochs=4), make_accelerator())
    assert history[-1]["loss"] < history[0]["loss"] - 0.5


@pytest.mark.parametrize("method,hparams", [
    ("dpo", {"beta": 0.5}), ("simpo", {"beta": 2.0, "gamma": 0.5}), ("ln_dpo", {"beta": 2.0}),
    ("ipo", {"beta": 0.5}), ("rdpo", {"beta": 0.5, "alpha": 0.01}), ("orpo", {"beta": 0.5}), ("kto", {"beta": 0.5}),
    ("beta_dpo", {"beta": 0.5, "alpha": 0.5, "rho": 0.2, "momentum": 0.9}),
])
def test_preference_losses_go_down_and_parameters_move(setup, method, hparams):
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    reference = None
    if METHODS[method].needs_reference:
        reference = reference_logps(build_tiny_model(TINY, tokenizer), pairs, tokenizer.pad_token_id, 32,
                                    torch.device("cpu"))
    objective = preference_objective(method, hparams, reference)
    history = train(model, pairs, objective, settings(3e-3, epochs=4), make_accelerator())
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"]
    assert last["reward_accuracy"] >= first["reward_accuracy"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dpo_at_the_reference_starts_at_log2(setup):
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)
    reference = reference_logps(model, pairs, tokenizer.pad_token_id, 32, torch.device("cpu"))
    history = train(model, pairs, preference_objective("dpo", {"beta": 0.1}, reference),
                    settings(1e-9, steps=1), make_accelerator())
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)


def test_non_finite_loss_raises_with_step(setup):
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)

    class Exploding(SFTObjective):
        def __call__(self, model, batch):
            loss, stats = super().__call__(model, batch)
            return loss * float("inf"), {**stats, "loss": float("inf")}

    exploding = Exploding()

    with pytest.raises(NonFiniteLoss, match="at step 1"):
        train(model, pairs, exploding, settings(1e-3), make_accelerator())


def test_sequence_logps_keep_float64():
    """Bug guard: log-probs of a float64 model were silently cast to float32."""
    tokenizer = build_task_tokenizer()
    model = build_tiny_model(TINY, tokenizer).double()
    batch = PADDED.sequences([encode_sequence(tokenizer, "ask tell koza and bifa ?", "very", 40)],
                             tokenizer.pad_token_id)
    logps, _ = sequence_logps(model, batch)
    assert logps.dtype == torch.float64


def test_epsilon_dpo_trains_and_updates_beta_by_the_mean_step(setup):
    from trainers.objectives import epsilon_dpo_objective

    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer)
    reference = build_tiny_model(SimpleNamespace(**{**vars(TINY), "seed": 1}), tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    history = train(model, pairs, epsilon_dpo_objective({"beta": 0.5, "epsilon": 0.2}, reference),
                    settings(3e-3, epochs=4), make_accelerator())
    assert history[-1]["loss"] < history[0]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert history[0]["beta"] == 0.5
    for prev, nxt in zip(history, history[1:]):  # β ← β / (1 + ε·mean(s)), mean(s) = share(+1) − share(−1)
        mean_step = prev["epsilon_steps_plus"] - prev["epsilon_steps_minus"]
        assert nxt["beta"] == pytest.approx(prev["beta"] / (1 + 0.2 * mean_step))
    assert any(h["epsilon_steps_plus"] > 0 or h["epsilon_steps_minus"] > 0 for h in history)


def test_reference_logps_keep_float64(setup):
    """Bug guard: reference log-probs of a float64 model were stored in a float32 buffer."""
    tokenizer, pairs = setup
    model = build_tiny_model(TINY, tokenizer).double()
    chosen, rejected = reference_logps(model, pairs[:4], tokenizer.pad_token_id, 2, torch.device("cpu"))
    assert chosen.dtype == rejected.dtype == torch.float64


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", ["sft", "beta_dpo", "epsilon_dpo"])
def test_a_killed_loop_resumes_from_its_checkpoint_with_the_uninterrupted_result(setup, tmp_path, method):
    """Killed at step 7 with saves every 3 steps: the rerun restarts from step 6 and ends where an uninterrupted
    run ends (same batches, optimizer, schedule and loss state: beta_dpo's EMA/RNG, epsilon_dpo's beta)."""
    from orchestrator.core.outcome import Checkpointing
    from trainers.objectives import build_objective
    from trainers.train import load_training_state

    tokenizer, pairs = setup
    ref = build_tiny_model(TINY, tokenizer).eval()
    reference = reference_logps(ref, pairs, tokenizer.pad_token_id, 16, torch.device("cpu"))

    def objective():
        if method == "sft":
            return sft_objective
        hp = METHODS[method].params(beta=0.1, **({"epsilon": 0.1} if method == "epsilon_dpo" else {"alpha": 0.5}))
        if method == "epsilon_dpo":
            return build_objective(METHODS[method], hp.model_dump(), ref_model=ref)
        return preference_objective(method, hp.model_dump(), reference)

    run = lambda model, **kw: train(model, pairs, objective(), settings(3e-3, steps=10), make_accelerator(), **kw)
    whole = build_tiny_model(TINY, tokenizer)
    expected = run(whole)

    checkpointing = Checkpointing(tmp_path / "resume", every=3)

    def kill_at_7(step, total, stats):
        if step == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(build_tiny_model(TINY, tokenizer), hooks=LoopHooks(on_log=kill_at_7), checkpointing=checkpointing)
    assert load_training_state(checkpointing)["step"] == 6
    resumed_steps = []
    model = build_tiny_model(TINY, tokenizer)  # fresh weights: everything must come from the checkpoint
    history = run(model, hooks=LoopHooks(on_log=lambda step, total, stats: resumed_steps.append(step)),
                  checkpointing=checkpointing)
    assert resumed_steps == [7, 8, 9, 10]
    assert [h["step"] for h in history] == list(range(1, 11))
    for got, want in zip(history, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_damaged_checkpoint_is_ignored(tmp_path):
    from orchestrator.core.outcome import Checkpointing
    from trainers.train import load_training_state

    checkpointing = Checkpointing(tmp_path, every=1)
    checkpointing.path.write_bytes(b"not a torch file")
    assert load_training_state(checkpointing) is None


def test_micro_batches_group_a_share_by_length():
    """Split after sorting by the pair's packed length (prompt once + both responses), longest first; a share
    that fits in one micro-batch stays as it is."""
    from trainers.train import micro_batches

    def pair(index, prompt, chosen, rejected):
        return EncodedPair(index, EncodedSequence([1] * (prompt + chosen), prompt),
                           EncodedSequence([1] * (prompt + rejected), prompt))

    share = [pair(0, 3, 1, 1), pair(1, 9, 2, 2), pair(2, 1, 1, 2), pair(3, 5, 5, 5), pair(4, 2, 2, 2)]
    assert micro_batches(share, None) == [share] and micro_batches(share, 5) == [share]
    assert [[p.index for p in m] for m in micro_batches(share, 2)] == [[3, 1], [4, 0], [2]]


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.parametrize("micro", [4, 5])
def test_micro_batches_give_the_one_pass_loss_curve_and_weights(setup, method, micro):
    """Gradient accumulation: a batch of 16 in micro-batches of 4 (or uneven 5,5,5,1) trains like one pass
    over 16 — SFT's token mean weighted by each micro-batch's response tokens, DPO's pair mean by its pairs —
    while the objective never sees more than `micro` pairs at once."""
    from dataclasses import replace

    tokenizer, pairs = setup
    reference = reference_logps(build_tiny_model(TINY, tokenizer), pairs, tokenizer.pad_token_id, 16,
                                torch.device("cpu"))
    base = sft_objective if method == "sft" else preference_objective("dpo", {"beta": 0.5}, reference)
    seen: list[int] = []
    objective = ObservedObjective(base, lambda batch: seen.append(batch["index"].shape[0]))
    whole, split = build_tiny_model(TINY, tokenizer), build_tiny_model(TINY, tokenizer)
    one = train(whole, pairs, base, settings(3e-3, steps=6), make_accelerator())
    accumulated = train(split, pairs, objective, replace(settings(3e-3, steps=6), micro_batch_size=micro),
                        make_accelerator())
    assert max(seen) == micro and len(seen) == 6 * math.ceil(16 / micro)
    for got, want in zip(accumulated, one):
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    # summation order differs; Adam's m/sqrt(v) magnifies that in elements whose gradient is near zero (seen:
    # 1.1e-5, and 3e-5 to 5.9e-5 on one of 1,024 once micro-batches were grouped by length and rows packed, after
    # 6 steps of lr 3e-3), so weights are compared at 1e-4: a micro-batch weighted wrongly moves every weight by
    # about one Adam step (3e-3) and the loss curve above by far more than 1e-5
    for p, q in zip(split.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
