"""What the training loop minimises: an objective turns a batch into (loss, stats).

Each method of the catalogue (orchestrator.core.methods) names its objective class; build_objective makes
one for a trial. Loss and stats are means over `count(batch)` (pairs by default, response tokens for SFT), so
the loop can weight micro-batches and processes back into the whole batch's mean. An objective that carries
state across steps (β-DPO's running gap statistics, ε-DPO's β) saves and restores it with the loop's state.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from orchestrator.core.methods import METHODS, Method
from trainers.logprobs import per_sequence, sequence_logps, target_logits, token_logps_from_logits
from trainers.losses import epsilon_steps

Reference = tuple[torch.Tensor, torch.Tensor]  # (N,) chosen and (N,) rejected reference log-probs, by pair index


def pair_count(batch: dict) -> float:
    """What a preference objective's loss and stats are means over: the batch's pairs."""
    return float(batch["index"].shape[0])


class Objective:
    """(model, batch) -> (loss, stats). `reads` says which sequences the loop lays out for it: "pairs" (chosen
    i, then rejected i) or "chosen"."""
    reads = "pairs"

    @classmethod
    def build(cls, method: Method, hparams: dict[str, float], reference: Optional[Reference] = None,
              ref_model=None) -> "Objective":
        """The objective of one trial of `method` (cached reference log-probs, or the reference model itself
        for a method that needs its token logits)."""
        raise NotImplementedError

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def count(self, batch: dict) -> float:
        return pair_count(batch)

    def state_dict(self) -> Optional[dict]:
        """What the objective carries from step to step (None: nothing); saved with the loop's state."""
        return None

    def load_state_dict(self, state: dict) -> None:
        raise ValueError(f"{type(self).__name__} carries no state across steps")


def build_objective(method: Method, hparams: dict[str, float], reference: Optional[Reference] = None,
                    ref_model=None) -> Objective:
    return method.objective_class().build(method, hparams, reference, ref_model)


class SFTObjective(Objective):
    """Mean next-token NLL over the chosen responses' tokens."""
    reads = "chosen"

    @classmethod
    def build(cls, method, hparams, reference=None, ref_model=None) -> "SFTObjective":
        return cls()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps, lengths = sequence_logps(model, batch)                                   # (B,)
        loss = -logps.sum() / lengths.sum()
        return loss, {"loss": loss.item()}

    def count(self, batch: dict) -> float:
        """The chosen responses' scored tokens."""
        return float(batch["lengths"].sum())


sft_objective = SFTObjective()


class ObservedObjective(Objective):
    """`objective` unchanged, with `observe(batch)` called before each of its calls (benchmarks count the tokens
    a step consumed, tests the pairs an objective saw)."""

    def __init__(self, objective: Objective, observe: Callable[[dict], None]):
        self.objective, self.observe, self.reads = objective, observe, objective.reads

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.observe(batch)
        return self.objective(model, batch)

    def count(self, batch: dict) -> float:
        return self.objective.count(batch)

    def state_dict(self) -> Optional[dict]:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)


def pair_stats(losses: torch.Tensor, chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, float]:
    margin = chosen_r - rejected_r
    return {"loss": losses.mean().item(), "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
            "chosen_reward": chosen_r.mean().item(), "rejected_reward": rejected_r.mean().item()}


class PreferenceObjective(Objective):
    """A preference loss of trainers.losses over the policy's sequence log-probs and, for reference-based
    methods, the cached reference log-probs of the batch's pairs. A loss with a state across steps (β-DPO)
    gets it as `state`; it is part of a resume."""

    def __init__(self, loss_fn, hparams: dict[str, float], reference: Optional[Reference], state=None):
        self.loss_fn, self.hparams, self.reference, self.state = loss_fn, hparams, reference, state

    @classmethod
    def build(cls, method, hparams, reference=None, ref_model=None) -> "PreferenceObjective":
        return cls(method.loss_function(), hparams, reference, method.new_state())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        half = batch["index"].shape[0]
        logps, lengths = sequence_logps(model, batch)                                   # (2B,)
        ref_c = ref_r = None
        if self.reference is not None:
            idx = batch["index"].cpu()
            ref_c, ref_r = (r[idx].to(logps.device) for r in self.reference)
        extra = {} if self.state is None else {"state": self.state}
        losses, chosen_r, rejected_r = self.loss_fn(logps[:half], logps[half:], ref_c, ref_r, lengths[:half],
                                                    lengths[half:], **self.hparams, **extra)
        return losses.mean(), pair_stats(losses, chosen_r, rejected_r)

    def state_dict(self) -> Optional[dict]:
        return None if self.state is None else self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)


def preference_objective(method_name: str, hparams: dict[str, float],
                         reference: Optional[Reference]) -> Objective:
    return build_objective(METHODS[method_name], hparams, reference)


class EpsilonDPOObjective(Objective):
    """ε-DPO needs the reference's token logits at every step (to perturb the policy's logits toward and away
    from it), so it keeps the reference model instead of cached log-probs. β starts at hparams["beta"] and
    after every step becomes β / (1 + ε·mean(s)), used from the next step on (one objective call per
    optimizer step: the spec refuses micro-batches and several processes for it)."""

    def __init__(self, loss_fn, hparams: dict[str, float], ref_model):
        self.loss_fn, self.epsilon = loss_fn, float(hparams["epsilon"])
        self.beta = float(hparams["beta"])
        self.ref_model = ref_model.eval()

    @classmethod
    def build(cls, method, hparams, reference=None, ref_model=None) -> "EpsilonDPOObjective":
        if ref_model is None:
            raise ValueError(f"{method.name} needs the reference model (its token logits), not cached log-probs")
        return cls(method.loss_function(), hparams, ref_model)

    def _perturbed_steps(self, logps, logits, ref_logits, batch) -> torch.Tensor:
        """s per pair from the log-ratios of the policy, and of its logits pushed away from (plus) and pulled
        toward (minus) the reference's by ε."""
        epsilon, target, half = self.epsilon, batch["target"], batch["index"].shape[0]
        plus, _ = per_sequence(token_logps_from_logits((1 + epsilon) * logits - epsilon * ref_logits, target), batch)
        minus, _ = per_sequence(token_logps_from_logits((1 - epsilon) * logits + epsilon * ref_logits, target), batch)
        ratio = lambda x: x[:half] - x[half:]  # noqa: E731 - chosen minus rejected, (B,)
        return epsilon_steps(ratio(logps.detach()), ratio(plus), ratio(minus))

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        half, target = batch["index"].shape[0], batch["target"]
        logits = target_logits(model, batch)                                            # (M, V) scored tokens
        logps, lengths = per_sequence(token_logps_from_logits(logits, target), batch)   # (2B,)
        with torch.no_grad():
            ref_logits = target_logits(self.ref_model, batch)
            ref_logps, _ = per_sequence(token_logps_from_logits(ref_logits, target), batch)
            steps = self._perturbed_steps(logps, logits, ref_logits, batch)
        losses, chosen_r, rejected_r = self.loss_fn(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:],
                                                    lengths[:half], lengths[half:], beta=self.beta,
                                                    epsilon=self.epsilon, steps=steps)
        stats = {**pair_stats(losses, chosen_r, rejected_r), "beta": self.beta,
                 "epsilon_steps_plus": (steps == 1).float().mean().item(),
                 "epsilon_steps_minus": (steps == -1).float().mean().item()}
        self.beta = self.beta / (1 + self.epsilon * steps.float().mean().item())
        return losses.mean(), stats

    def state_dict(self) -> Optional[dict]:
        return {"beta": self.beta}                                  # β adapts across steps: part of a resume

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


def epsilon_dpo_objective(hparams: dict[str, float], ref_model) -> Objective:
    return build_objective(METHODS["epsilon_dpo"], hparams, ref_model=ref_model)
