"""Catalogue of training methods: name -> hyperparameter model and what the method needs.

Torch-free on purpose: the spec validates grids against this catalogue before anything heavy is
imported. trainers/losses.py registers one loss function per preference method named here (a test keeps
the two in step).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    """Method-specific hyperparameters (the grid's non-training keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(MethodParams):
    pass


class DPOParams(MethodParams):
    beta: float = Field(gt=0, description="inverse temperature of the implicit reward")


class LNDPOParams(MethodParams):
    beta: float = Field(gt=0, description="inverse temperature on length-normalised log-ratios")


class SimPOParams(MethodParams):
    beta: float = Field(gt=0, description="scale of the length-normalised log-likelihood reward")
    gamma: float = Field(ge=0, description="target reward margin (absolute, as in the paper's Table 2)")


class IPOParams(MethodParams):
    beta: float = Field(gt=0, description="τ: the target log-ratio margin is 1/(2τ)")


class RDPOParams(MethodParams):
    beta: float = Field(gt=0, description="inverse temperature, as in DPO")
    alpha: float = Field(ge=0, description="length regularizer: margin reduced by α·(|yw| − |yl|)")


class ORPOParams(MethodParams):
    beta: float = Field(gt=0, description="λ, weight of the odds-ratio term against the SFT NLL (TRL's beta)")


class KTOParams(MethodParams):
    beta: float = Field(gt=0, description="inverse temperature of the value function")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the chosen (desirable) losses")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the rejected (undesirable) losses")


class BetaDPOParams(MethodParams):
    beta: float = Field(gt=0, description="base β, scaled per batch by the reward-gap statistics")
    alpha: float = Field(ge=0, description="a: β_batch = β·(1 + a·(mean selected gap − running gap mean))")
    rho: float = Field(0.2, ge=0, lt=1, description="share of each batch the reward-gap filter drops")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the running gap mean and std")


class EpsilonDPOParams(MethodParams):
    beta: float = Field(gt=0, description="initial β; updated after every optimizer step")
    epsilon: float = Field(gt=0, lt=1, description="ε: size of the logit perturbation toward/away from the reference")


@dataclass(frozen=True)
class Method:
    name: str
    params: type[MethodParams]
    kind: str  # "untrained" (evaluated only), "sft" (NLL on chosen responses) or "preference"
    needs_reference: bool
    summary: str
    # Token logits of the reference at every step (not just its sequence log-probs): the reference model stays
    # in memory during training and the reference-log-prob cache cannot serve it.
    needs_reference_logits: bool = False
    # The loss uses statistics of the whole batch (means, filters, a β updated from batch means): sharding a
    # batch over several processes would change it, so such a method runs in one process per trial.
    batch_statistics: bool = False

    @property
    def trains(self) -> bool:
        """Whether the method has an optimizer loop (and so learning_rate/epochs in its grid)."""
        return self.kind != "untrained"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


register_method(Method("untrained", NoParams, "untrained", False,
                       "the initial model, evaluated without training (the sweep's floor)"))
register_method(Method("sft", NoParams, "sft", False, "supervised fine-tuning on the chosen responses"))
register_method(Method("dpo", DPOParams, "preference", True,
                       "-log σ(β·[log πθ(yw)/πref(yw) − log πθ(yl)/πref(yl)])"))
register_method(Method("simpo", SimPOParams, "preference", False,
                       "-log σ(β/|yw|·log πθ(yw) − β/|yl|·log πθ(yl) − γ)"))
register_method(Method("ln_dpo", LNDPOParams, "preference", True,
                       "-log σ(β/|yw|·log πθ(yw)/πref(yw) − β/|yl|·log πθ(yl)/πref(yl))"))
register_method(Method("ipo", IPOParams, "preference", True,
                       "(log πθ(yw)/πref(yw)/|yw| − log πθ(yl)/πref(yl)/|yl| − 1/(2β))²"))
register_method(Method("rdpo", RDPOParams, "preference", True,
                       "-log σ(β·[log πθ(yw)/πref(yw) − log πθ(yl)/πref(yl)] − α·(|yw| − |yl|))"))
register_method(Method("orpo", ORPOParams, "preference", False,
                       "−log πθ(yw)/|yw|·(token mean) − β·log σ(log odds(yw) − log odds(yl)), odds on mean log-probs"))
register_method(Method("beta_dpo", BetaDPOParams, "preference", True,
                       "DPO with β calibrated per batch from reward gaps, after a Gaussian gap filter (Wu et al. 2024)",
                       batch_statistics=True))
register_method(Method("epsilon_dpo", EpsilonDPOParams, "preference", True,
                       "DPO with per-pair β/(1+ε·s), s from logit monotonicity under ε-perturbation (Lee et al. 2025)",
                       needs_reference_logits=True, batch_statistics=True))
register_method(Method("kto", KTOParams, "preference", True,
                       "w+·(1 − σ(β·(r(yw) − z_l))) and w−·(1 − σ(β·(z_w − r(yl)))), z = clamp(batch mean r, 0)",
                       batch_statistics=True))


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """"unknown method 'dp0' (did you mean 'dpo'?); known: dpo, ln_dpo, simpo" — shared by registries."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known))}"


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(unknown_name_message("method", name, list(METHODS)))
    return METHODS[name]
