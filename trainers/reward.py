"""Gold reward models behind one interface: score(prompts, responses) -> one float per pair.

The built-in synthetic reward and any Hugging Face sequence-classification reward model are served the
same way, so evaluation never knows which one it has.

A reward model reads (prompt, response) as one text pair of at most its max_length tokens. The response is what
it judges, so only the prompt is cut to fit, keeping its end (the turns nearest the response); a response that
does not fit even beside one prompt token keeps its start. Both cuts are counted (RewardScores), and the trial
tags them. Pairs are scored in batches of similar length (sorted), so padding costs little.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from orchestrator.core.registry import Registry
from trainers import synthetic
from trainers.models import progress_frames_off


@dataclass(frozen=True)
class RewardScores:
    values: list[float]      # one score per (prompt, response), in order
    prompts_cut: int = 0     # prompts cut (their start dropped) so that the response fits
    responses_cut: int = 0   # responses longer than the reward model reads (their end dropped)


class RewardModel(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores: ...


class SyntheticGoldReward:
    """The synthetic task's programmatic gold reward (trainers.synthetic.gold_reward)."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores:
        return RewardScores([synthetic.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)])


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
        with progress_frames_off():
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code).to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, positions, self.tokenizer.model_max_length or max_length)
        self.tokenizer.truncation_side = "left"  # a cut prompt keeps its end, next to the response
        self.batch_size = batch_size

    def _fitted_response(self, ids: list[int], room: int) -> str:
        """A response of more than `room` tokens cut to its first `room` tokens, as text that encodes within them."""
        keep = room
        while True:
            text = self.tokenizer.decode(ids[:keep])  # ids of text alone: any special among them is [UNK]-like
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= room or keep <= 1:
                return text
            keep -= 1

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        tokenizer = self.tokenizer
        room = self.max_length - tokenizer.num_special_tokens_to_add(pair=True)  # prompt + response tokens
        prompt_tokens = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        texts, response_tokens = list(responses), [len(ids) for ids in response_ids]
        too_long = [i for i, n in enumerate(response_tokens) if n > room - 1]  # at least one prompt token stays
        for i in too_long:
            texts[i] = self._fitted_response(response_ids[i], room - 1)
            response_tokens[i] = room - 1
        prompts_cut = sum(p + r > room for p, r in zip(prompt_tokens, response_tokens))
        order = sorted(range(len(texts)), key=lambda i: min(prompt_tokens[i] + response_tokens[i], room))
        scores = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            enc = tokenizer([prompts[i] for i in batch], [texts[i] for i in batch], padding=True,
                            truncation="only_first", max_length=self.max_length, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits                              # (B, 1)
            for i, value in zip(batch, logits[:, 0].float().cpu().tolist()):
                scores[i] = value
        return RewardScores(scores, prompts_cut, len(too_long))


REWARD_MODELS: Registry[Callable[..., RewardModel]] = Registry("reward kind", {
    "synthetic": lambda spec: SyntheticGoldReward(),
    "hf": lambda spec: SequenceClassificationReward(spec.path or spec.hub_id, spec.trust_remote_code,
                                                    spec.batch_size),
})


def load_reward_model(reward_spec) -> RewardModel:
    return REWARD_MODELS[reward_spec.kind](reward_spec)
