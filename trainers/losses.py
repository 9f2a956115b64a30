"""The shared loss module: one registry, name -> pure function over per-sequence tensors.

Every loss has the signature

    loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
         chosen_lengths, rejected_lengths, **hparams) -> (losses, chosen_rewards, rejected_rewards)

All inputs are (B,) tensors: summed log-probabilities of the response tokens and response token counts.
Reference tensors may be None for reference-free methods. Outputs are (B,) per-pair losses and the
implicit rewards (used for reward margin / accuracy curves; detached). No model, no I/O in here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trainers.methods import METHODS, unknown_name_message

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]
LossFn = Callable[..., LossOutput]

LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        if name not in METHODS:
            raise ValueError(f"loss {name!r} has no entry in trainers.methods.METHODS")
        LOSSES[name] = fn
        return fn
    return decorator


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise KeyError(unknown_name_message("loss", name, list(LOSSES)))
    return LOSSES[name]


def _require_reference(name: str, *refs: Optional[Tensor]) -> None:
    if any(r is None for r in refs):
        raise ValueError(f"{name} needs reference log-probs; got None")


@register_loss("dpo")
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """-log σ(β·[(log πθ(yw) − log πref(yw)) − (log πθ(yl) − log πref(yl))])."""
    _require_reference("dpo", ref_chosen_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


@register_loss("ln_dpo")
def ln_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths, *, beta: float) -> LossOutput:
    """-log σ(β/|yw|·(log πθ(yw) − log πref(yw)) − β/|yl|·(log πθ(yl) − log πref(yl)))."""
    _require_reference("ln_dpo", ref_chosen_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps) / chosen_lengths
    rejected = beta * (policy_rejected_logps - ref_rejected_logps) / rejected_lengths
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


@register_loss("simpo")
def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_lengths, rejected_lengths, *, beta: float, gamma: float) -> LossOutput:
    """-log σ(β/|yw|·log πθ(yw) − β/|yl|·log πθ(yl) − γ); the reference is not used."""
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()
