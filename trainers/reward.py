"""Gold reward models behind one interface: score(prompts, responses) -> one float per pair.

The built-in synthetic reward and any Hugging Face sequence-classification reward model are served the
same way, so evaluation never knows which one it has.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from trainers import synthetic
from orchestrator.contract.registry import unknown_name_message


class RewardModel(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class SyntheticGoldReward:
    """The synthetic task's programmatic gold reward (trainers.synthetic.gold_reward)."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [synthetic.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


class SequenceClassificationReward:
    """Any `AutoModelForSequenceClassification` with one output: the logit is the score of
    (prompt, response) encoded as a text pair."""

    def __init__(self, path: str, trust_remote_code: bool = False, batch_size: int = 16,
                 max_length: int = 512, device: torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # num_labels=1: a reward model has one output. A checkpoint whose head has another size fails to
        # load (a classifier is not a reward model); an encoder without a head gets a new one, seeded so
        # every trial of a sweep scores with the same head.
        torch.manual_seed(0)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[start:start + self.batch_size]),
                                 list(responses[start:start + self.batch_size]), padding=True,
                                 truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits  # (B, 1)
            scores += logits[:, 0].float().cpu().tolist()
        return scores


REWARD_MODELS: dict[str, Callable[..., RewardModel]] = {
    "synthetic": lambda spec: SyntheticGoldReward(),
    "hf": lambda spec: SequenceClassificationReward(spec.path or spec.hub_id, spec.trust_remote_code,
                                                    spec.batch_size),
}


def load_reward_model(reward_spec) -> RewardModel:
    if reward_spec.kind not in REWARD_MODELS:
        raise KeyError(unknown_name_message("reward kind", reward_spec.kind, list(REWARD_MODELS)))
    return REWARD_MODELS[reward_spec.kind](reward_spec)
