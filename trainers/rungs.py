"""Intermediate evaluation at rungs (evaluation.rungs): what a trial measures part-way through training, for
early stopping (orchestrator.core.rungs) and for the curves in MLflow.

At a rung the policy is evaluated as at the end, on a fixed subset of the evaluation prompts
(evaluation.rung_prompts of the first num_prompts, drawn once with evaluation.seed: every trial of the sweep
sees the same ones), giving rung/mean_score, win_vs_chosen, length, and for preference trials win_vs_sft and kl;
plus two generation-free signals on the same prompts' held-out pairs (chosen and rejected responses):

  pair_margin    mean over pairs of r(chosen) - r(rejected), r(y) = log π(y|x) - log π_start(y|x): DPO's
                 implicit reward without β, against the checkpoint the trial started from
  pair_accuracy  share of pairs with a positive margin

A rung leaves training as it found it: it runs in a forked random stream (the final result is the same with
and without rungs: tests/trainers/test_rungs.py) and puts the model back in training mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from trainers.data import EncodedPair, encode_pairs
from trainers.evaluate import EvalSettings, SftBaseline, evaluate
from trainers.pairs import PreferencePair
from trainers.train import reference_logps


def rung_subset(pairs: list[PreferencePair], num_prompts: int, rung_prompts: int, seed: int
                ) -> list[PreferencePair]:
    """The evaluation pairs a rung uses: `rung_prompts` of the first `num_prompts`, drawn with `seed`, in their
    original order (the same subset for every trial and every rung)."""
    pool = min(num_prompts, len(pairs))
    chosen = sorted(random.Random(seed).sample(range(pool), min(rung_prompts, pool)))
    return [pairs[i] for i in chosen]


def pair_metrics(policy: tuple[torch.Tensor, torch.Tensor], start: tuple[torch.Tensor, torch.Tensor]
                 ) -> dict[str, float]:
    """pair_margin and pair_accuracy from (chosen, rejected) summed log-probs, each (N,), of the policy and
    of the starting checkpoint."""
    margin = (policy[0] - start[0]) - (policy[1] - start[1])                       # (N,)
    return {"pair_margin": margin.mean().item(), "pair_accuracy": (margin > 0).float().mean().item()}


@dataclass
class RungEvaluator:
    """Evaluates a policy at rungs. `start_model` gives the checkpoint the trial started from (the SFT model of a
    preference trial, for KL and the implicit reward) and `baseline` the SFT baseline of a preference trial (None
    for SFT trials); both are asked for at the first rung, inside its forked random stream."""
    tokenizer: object
    pairs: list[PreferencePair]
    reward: object
    settings: EvalSettings
    device: torch.device
    max_length: int
    start_model: Callable[[], torch.nn.Module]
    baseline: Callable[[], Optional[SftBaseline]]
    _encoded: list[EncodedPair] = field(default_factory=list)
    _start: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the start's (chosen, rejected) log-probs, (N,) each

    def _logps(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._encoded:
            self._encoded = encode_pairs(self.tokenizer, self.pairs, self.max_length)
        return reference_logps(model, self._encoded, self.tokenizer.pad_token_id, self.settings.batch_size,
                               self.device, self.settings.padding_free)


    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The rung metrics of `model` (names without the rung/ prefix)."""
        was_training = model.training
        cuda = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            try:
                if self._start is None:
                    self._start = self._logps(self.start_model())
                evaluation = evaluate(model, self.tokenizer, self.pairs, self.reward, self.settings, self.device,
                                      self.baseline())
                metrics = {**evaluation.metrics, **evaluation.usage.metrics(),
                           **pair_metrics(self._logps(model), self._start)}
            finally:
                model.train(was_training)
        return metrics
