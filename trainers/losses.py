"""The shared loss module: pure functions over per-sequence tensors, one per preference method (the method
catalogue, orchestrator.core.methods, names each as its `loss`).

Every loss has the signature

    loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
         chosen_lengths, rejected_lengths, **hparams) -> (losses, chosen_rewards, rejected_rewards)

All inputs are (B,) tensors: summed log-probabilities of the response tokens and response token counts.
Reference tensors may be None for reference-free methods. Outputs are (B,) per-pair losses and the
implicit rewards (used for reward margin / accuracy curves; detached). No model, no I/O in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from orchestrator.core.methods import METHODS

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]
LossFn = Callable[..., LossOutput]


def get_loss(name: str) -> LossFn:
    """The loss function of a method of the catalogue (orchestrator.core.methods: `loss`)."""
    return METHODS[name].loss_function()


def _require_reference(name: str, *refs: Optional[Tensor]) -> None:
    if any(r is None for r in refs):
        raise ValueError(f"{name} needs reference log-probs; got None")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """-log σ(β·[(log πθ(yw) − log πref(yw)) − (log πθ(yl) − log πref(yl))])."""
    _require_reference("dpo", ref_chosen_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def ln_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """-log σ(β/|yw|·(log πθ(yw) − log πref(yw)) − β/|yl|·(log πθ(yl) − log πref(yl)))."""
    _require_reference("ln_dpo", ref_chosen_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps) / chosen_lengths
    rejected = beta * (policy_rejected_logps - ref_rejected_logps) / rejected_lengths
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_lengths, rejected_lengths, *, beta: float, gamma: float) -> LossOutput:
    """-log σ(β/|yw|·log πθ(yw) − β/|yl|·log πθ(yl) − γ); the reference is not used."""
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """(Δ − 1/(2β))² with Δ the difference of length-averaged log-ratios (Azar et al. 2023, Eq. 17), as
    TRL's DPOTrainer `ipo` computes it (its authors confirmed the per-token averaging)."""
    _require_reference("ipo", ref_chosen_logps, ref_rejected_logps)
    chosen = (policy_chosen_logps - ref_chosen_logps) / chosen_lengths
    rejected = (policy_rejected_logps - ref_rejected_logps) / rejected_lengths
    return (chosen - rejected - 1 / (2 * beta)) ** 2, chosen.detach(), rejected.detach()


def rdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths, rejected_lengths, *, beta: float, alpha: float) -> LossOutput:
    """R-DPO (Park et al. 2024, length-regularized DPO): -log σ(β·[Δlog-ratio] − α·(|yw| − |yl|))."""
    _require_reference("rdpo", ref_chosen_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = chosen - rejected - alpha * (chosen_lengths - rejected_lengths)
    return -F.logsigmoid(margin), chosen.detach(), rejected.detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """ORPO (Hong et al. 2024): NLL of the chosen response − β·log σ(log odds ratio), as TRL's ORPOTrainer.

    Odds use length-averaged log-probs a: log odds(y) = a − log(1 − e^a). TRL's NLL is the token mean over the
    whole batch; written per pair as −log πθ(yw) / mean(|yw|), the batch mean of these losses is exactly that.
    Rewards are β·a, as TRL logs them."""
    chosen_avg = policy_chosen_logps / chosen_lengths
    rejected_avg = policy_rejected_logps / rejected_lengths
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg)) -
                                              torch.log1p(-torch.exp(rejected_avg)))
    nll = -policy_chosen_logps / chosen_lengths.mean()
    return nll - beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO on paired data (Ethayarajh et al. 2024), as TRL's paired `kto_pair` loss computed it: the reference
    points are the batch means of the log-ratios, clamped at 0 and detached (no gradient), the chosen side
    measured against the rejected mean and vice versa. Per pair: the mean of its two weighted losses."""
    _require_reference("kto", ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    chosen_kl = chosen_ratio.mean().clamp(min=0).detach()
    rejected_kl = rejected_ratio.mean().clamp(min=0).detach()
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)))
    return (chosen_losses + rejected_losses) / 2, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class BetaDPOState:
    """Running statistics of the implicit reward gaps across steps (β-DPO's EMA) and its sampling RNG."""
    gap_mean: float = 0.0
    gap_std: float = 0.0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def state_dict(self) -> dict:
        return {"gap_mean": self.gap_mean, "gap_std": self.gap_std, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gap_mean, self.gap_std = state["gap_mean"], state["gap_std"]
        self.generator.set_state(state["generator"])

    def update(self, gaps: Tensor, momentum: float) -> None:
        self.gap_mean = momentum * self.gap_mean + (1 - momentum) * gaps.mean().item()
        self.gap_std = momentum * self.gap_std + (1 - momentum) * gaps.std().item()


def beta_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths, *, beta: float, alpha: float, rho: float = 0.2,
                  momentum: float = 0.9, state: BetaDPOState) -> LossOutput:
    """β-DPO (Wu et al. 2024), following junkangwu/beta-DPO:
    1. gaps g = Δlog-ratio (detached); the running mean/std are updated with them first (EMA, `momentum`);
    2. filter: keep int(B·(1−ρ)) pairs drawn without replacement with weights exp(−½((g−mean)/std)²);
    3. β_batch = β·(1 + α·(mean of kept g − running mean)), at least 1e-3, no gradient;
    4. loss −log σ(β_batch·Δ) averaged over the kept pairs. Dropped pairs get loss 0 and kept pairs are scaled
       by B/kept, so the batch mean of the returned losses is the mean over kept pairs.
    The only loss with state: `state` is updated in place (step 1)."""
    _require_reference("beta_dpo", ref_chosen_logps, ref_rejected_logps)
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    gaps = logits.detach()
    state.update(gaps, momentum)
    std = state.gap_std if state.gap_std > 0 else 1.0  # first step of a one-pair batch: no spread yet
    weights = torch.exp(-0.5 * ((gaps - state.gap_mean) / std) ** 2).double().cpu()
    kept = max(1, int(gaps.numel() * (1 - rho)))
    index = torch.multinomial(weights, kept, replacement=False, generator=state.generator).to(gaps.device)
    mask = torch.zeros_like(gaps)
    mask[index] = 1.0
    beta_used = max(beta * (1 + alpha * (gaps[index].mean().item() - state.gap_mean)), 1e-3)
    losses = -F.logsigmoid(beta_used * logits) * mask * (gaps.numel() / kept)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen, rejected


def epsilon_steps(logratios: Tensor, plus_logratios: Tensor, minus_logratios: Tensor) -> Tensor:
    """s ∈ {+1, 0, −1} per pair (ε-DPO, as oddqueue/e-dpo decides it). The log-ratios (chosen − rejected) are
    those of the policy, of its logits pushed away from the reference ("plus": (1+ε)·l − ε·l_ref) and pulled
    toward it ("minus": (1−ε)·l + ε·l_ref). s = +1 if plus > policy > minus (the ratio grows monotonically
    as the policy moves away from the reference: a bigger step, smaller β, is safe), −1 if minus > policy >
    plus, else 0. Inputs (B,), output (B,) long."""
    plus = (plus_logratios > logratios) & (logratios > minus_logratios)
    minus = (minus_logratios > logratios) & (logratios > plus_logratios)
    return plus.long() - minus.long()


def epsilon_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_lengths, rejected_lengths, *, beta: float, epsilon: float, steps: Tensor) -> LossOutput:
    """ε-DPO (Lee et al. 2025), following oddqueue/e-dpo: per pair β_i = β / (1 + ε·s_i) with s_i from
    `epsilon_steps`; loss −log σ(β_i·Δlog-ratio). `beta` is the current β, which the trainer updates after each
    optimizer step as β ← β / (1 + ε·mean(s)) (trainers.train.epsilon_dpo_objective)."""
    _require_reference("epsilon_dpo", ref_chosen_logps, ref_rejected_logps)
    beta_i = beta / (1 + epsilon * steps.to(policy_chosen_logps.dtype))
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    chosen = beta_i * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected = beta_i * (policy_rejected_logps - ref_rejected_logps).detach()
    return -F.logsigmoid(beta_i * logits), chosen, rejected
