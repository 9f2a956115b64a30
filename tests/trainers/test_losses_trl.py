"""Our losses against TRL's own implementations on identical inputs, in float64 (TRL is the oracle).

DPO (`sigmoid`), LN-DPO (`sigmoid_norm`) and IPO (`ipo`) have no standalone function in TRL 1.x, so the smallest real
path is driven: DPOTrainer._compute_loss on a tiny float64 model and one batch. Our loss is fed the same
per-sequence log-probs TRL uses (its fused LM head, which returns float32 per-token values) and the same
completion lengths, so the comparison is of the loss formulas on identical inputs. SimPO is CPOTrainer.cpo_loss (loss_type="simpo", cpo_alpha=0)
on length-averaged log-probs; TRL's simpo_gamma is an absolute margin, like the paper's γ. ORPO's odds-ratio
term is ORPOTrainer.odds_ratio_loss (which computes in float32); its NLL term is TRL's token-mean cross-entropy
over the chosen completions, i.e. −Σ log πθ(yw) / Σ|yw|.
"""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trainers.data import EncodedSequence  # noqa: E402
from trainers.logprobs import sequence_logps  # noqa: E402
from trainers.losses import get_loss  # noqa: E402
from trainers.models import build_task_tokenizer, build_tiny_model  # noqa: E402
from trainers.packing import PADDED  # noqa: E402
from trainers.synthetic import generate_split  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64)


def padded_batch(trl_batch: dict, pad_id: int) -> dict:
    """TRL's right-padded [chosen; rejected] rows as our padded layout: each row's tokens up to its attention
    mask's end, the prompt being what precedes its completion mask."""
    seqs = [EncodedSequence(ids[:int(mask.sum())].tolist(), int(completion.argmax()))
            for ids, mask, completion in zip(trl_batch["input_ids"], trl_batch["attention_mask"],
                                             trl_batch["completion_mask"])]
    return PADDED.sequences(seqs, pad_id)


def trl_dpo_loss_and_inputs(tmp_path, loss_type: str, beta: float):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = build_task_tokenizer()
    policy = build_tiny_model(SimpleNamespace(**TINY, seed=0), tokenizer).double()
    reference = build_tiny_model(SimpleNamespace(**TINY, seed=1), tokenizer).double()
    pairs = generate_split("train", 8, seed=0)
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": " " + p.chosen, "rejected": " " + p.rejected}
                                 for p in pairs])
    config = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=beta, per_device_train_batch_size=8,
                       report_to=[], use_cpu=True, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        policy.train()  # no dropout in the tiny model; train mode as TRL would be
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logps, ref_logps = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                              fused_lm_head=True, use_cache=False).log_probs.double().sum(1)
                            for m in (trainer.model, trainer.ref_model))                       # (2B,)
        ours, _ = sequence_logps(policy, padded_batch(batch, tokenizer.pad_token_id))
    # our own float64 log-probs agree with TRL's float32 per-token path to float32 precision
    torch.testing.assert_close(ours, logps, rtol=0, atol=1e-4)
    return trl_loss.detach(), logps, ref_logps, batch["completion_mask"].sum(1).double()


@pytest.mark.parametrize("method,trl_type", [("dpo", "sigmoid"), ("ln_dpo", "sigmoid_norm"), ("ipo", "ipo")])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_family_matches_trl_dpo_trainer(tmp_path, method, trl_type, beta):
    trl_loss, logps, ref_logps, lengths = trl_dpo_loss_and_inputs(tmp_path, trl_type, beta)
    n = logps.shape[0] // 2  # the batch is [chosen; rejected]
    ours, _, _ = get_loss(method)(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], lengths[:n], lengths[n:],
                                  beta=beta)
    # TRL's loss is a float32 tensor (its fused head returns float32 log-probs): agreement is float32 rounding
    torch.testing.assert_close(ours.mean(), trl_loss.double(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("beta,gamma", [(1.0, 0.5), (2.0, 1.2), (2.5, 1.6)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma):
    from trl.experimental.cpo import CPOTrainer

    generator = torch.Generator().manual_seed(0)
    chosen, rejected = -30 * torch.rand(2, 16, generator=generator, dtype=torch.float64)
    chosen_len = torch.randint(1, 20, (16,), generator=generator).double()
    rejected_len = torch.randint(1, 20, (16,), generator=generator).double()
    trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    # CPOTrainer averages log-probs over the completion for simpo (average_log_prob=True)
    trl_losses, _, _ = CPOTrainer.cpo_loss(trl_self, chosen / chosen_len, rejected / rejected_len)
    ours, _, _ = get_loss("simpo")(chosen, rejected, None, None, chosen_len, rejected_len, beta=beta, gamma=gamma)
    assert trl_losses.dtype == torch.float64
    torch.testing.assert_close(ours, trl_losses, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_orpo(beta):
    from trl.experimental.orpo import ORPOTrainer

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 20, (2, 16), generator=generator).double()
    chosen, rejected = -lengths * (0.05 + 3 * torch.rand(2, 16, generator=generator, dtype=torch.float64))
    trl_self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    or_losses, *_ = ORPOTrainer.odds_ratio_loss(trl_self, chosen / lengths[0], rejected / lengths[1])
    trl_total = -chosen.sum() / lengths[0].sum() - or_losses.double().mean()
    ours, _, _ = get_loss("orpo")(chosen, rejected, None, None, lengths[0], lengths[1], beta=beta)
    torch.testing.assert_close(ours.mean(), trl_total, rtol=2e-6, atol=1e-7)
