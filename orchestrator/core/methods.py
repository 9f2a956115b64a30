"""The method catalogue: one definition per method — its hyperparameters, what it needs, and where its torch
code lives (loss function, per-trial loss state, objective), named as lazy 'module:attribute' references that
only the trial body loads.

Torch-free on purpose: the spec validates grids against this catalogue before anything heavy is imported.
A new method is one MethodParams model, one register_method here, one loss function in trainers/losses.py and
one test with hand-computed numbers (tests/trainers/test_losses.py also loads every reference below).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.registry import Registry, load_reference


class MethodParams(BaseModel):
    """Method-specific hyperparameters (the grid's non-training keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


PREFERENCE_OBJECTIVE = "trainers.objectives:PreferenceObjective"


class StageKind(str, Enum):
    """What a method's stage is, and how the sweep treats it: the modules that tell stages apart ask this, never a
    stage's name."""
    UNTRAINED = "untrained"    # the initial model, evaluated only: the sweep's floor (stage BASE_STAGE)
    SFT = "sft"                # NLL on chosen responses; its best trial is the checkpoint preference stages start from
    PREFERENCE = "preference"  # a preference method; its stage is named after it, and only these stop early

    def __str__(self) -> str:
        return self.value


# The names of the two stages before the preference ones (a preference stage is named after its method).
BASE_STAGE, SFT_STAGE = "base", "sft"


@dataclass(frozen=True)
class Method:
    name: str
    params: type[MethodParams]
    kind: StageKind
    needs_reference: bool
    summary: str
    # Token logits of the reference at every step (not just its sequence log-probs): the reference model stays
    # in memory during training and the reference-log-prob cache cannot serve it.
    needs_reference_logits: bool = False
    # The loss uses statistics of the whole batch (means, filters, a β updated from batch means): sharding a
    # batch over several processes would change it, so such a method runs in one process per trial.
    batch_statistics: bool = False
    # Lazy references into the trial body (trainers/): the pure loss function over per-sequence tensors, a
    # factory of the state it carries across a trial's steps, and the objective class that trains the method.
    loss: Optional[str] = None
    state: Optional[str] = None
    objective: Optional[str] = None

    @property
    def trains(self) -> bool:
        """Whether the method has an optimizer loop (and so learning_rate/epochs in its grid)."""
        return self.kind is not StageKind.UNTRAINED

    def loss_function(self):
        if self.loss is None:
            raise ValueError(f"method {self.name!r} has no loss function")
        return load_reference(self.loss)

    def new_state(self):
        """A fresh per-trial loss state, or None for a loss without one."""
        return load_reference(self.state)() if self.state else None

    def objective_class(self):
        if self.objective is None:
            raise ValueError(f"method {self.name!r} trains nothing")
        return load_reference(self.objective)


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    METHODS.add(method.name, method)
    return method


def _preference(name: str, params: type[MethodParams], needs_reference: bool, summary: str, **more) -> Method:
    """A preference method trained by the generic objective over its loss function trainers.losses.<name>_loss."""
    return register_method(Method(name, params, StageKind.PREFERENCE, needs_reference, summary,
                                  loss=f"trainers.losses:{name}_loss",
                                  objective=more.pop("objective", PREFERENCE_OBJECTIVE), **more))


register_method(Method("untrained", NoParams, StageKind.UNTRAINED, False,
                       "the initial model, evaluated without training (the sweep's floor)"))
register_method(Method("sft", NoParams, StageKind.SFT, False, "supervised fine-tuning on the chosen responses",
                       objective="trainers.objectives:SFTObjective"))
_preference("dpo", DPOParams, True, "-log σ(β·[log πθ(yw)/πref(yw) − log πθ(yl)/πref(yl)])")
_preference("simpo", SimPOParams, False, "-log σ(β/|yw|·log πθ(yw) − β/|yl|·log πθ(yl) − γ)")
_preference("ln_dpo", LNDPOParams, True, "-log σ(β/|yw|·log πθ(yw)/πref(yw) − β/|yl|·log πθ(yl)/πref(yl))")
_preference("ipo", IPOParams, True, "(log πθ(yw)/πref(yw)/|yw| − log πθ(yl)/πref(yl)/|yl| − 1/(2β))²")
_preference("rdpo", RDPOParams, True, "-log σ(β·[log πθ(yw)/πref(yw) − log πθ(yl)/πref(yl)] − α·(|yw| − |yl|))")
_preference("orpo", ORPOParams, False,
            "−log πθ(yw)/|yw|·(token mean) − β·log σ(log odds(yw) − log odds(yl)), odds on mean log-probs")
_preference("beta_dpo", BetaDPOParams, True,
            "DPO with β calibrated per batch from reward gaps, after a Gaussian gap filter (Wu et al. 2024)",
            batch_statistics=True, state="trainers.losses:BetaDPOState")
_preference("epsilon_dpo", EpsilonDPOParams, True,
            "DPO with per-pair β/(1+ε·s), s from logit monotonicity under ε-perturbation (Lee et al. 2025)",
            needs_reference_logits=True, batch_statistics=True, objective="trainers.objectives:EpsilonDPOObjective")
_preference("kto", KTOParams, True,
            "w+·(1 − σ(β·(r(yw) − z_l))) and w−·(1 − σ(β·(z_w − r(yl)))), z = clamp(batch mean r, 0)",
            batch_statistics=True)
