"""Evaluation on held-out prompts: sample, score with the gold reward, compare, measure KL and length.

Metrics (DESIGN.md, paper §5), per trial:
  mean_score     mean gold score of the policy's generations
  win_vs_chosen  share of prompts where the generation outscores the dataset's chosen response (ties 1/2)
  win_vs_sft     share where it outscores the SFT model's generation for the same prompt (ties 1/2)
  kl             mean over samples of Σ_t [log πθ(y_t|·) − log π_SFT(y_t|·)] on the policy's own samples
                 (untempered log-probs of both models; the EOS token counts when it was sampled)
  length         generated tokens before the response ends, in the policy's tokenizer: exactly the tokens
                 whose text the gold reward scores

Sampling never emits a token that is not text: pad, BOS and unknown are suppressed (their probability set to
0, the rest renormalized), and any other special token (EOS, a chat template's end-of-turn) ends the response.
Before, a sampled `<pad>` mid-response counted in `length` but was dropped from the scored text, so the
reward's length penalty never saw it (issue 17: 11.5% of SimPO's samples on sweeps/paper_mini.yaml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from trainers.data import EncodedSequence, encode_prompt
from trainers.logprobs import choose_layout, sequence_logps
from trainers.reward import RewardModel
from trainers.pairs import PreferencePair


@dataclass(frozen=True)
class EvalSettings:
    temperature: float
    top_p: float
    max_new_tokens: int
    num_prompts: int
    seed: int
    batch_size: int
    padding_free: bool = True  # the KL pass in packed rows where the model can (training.padding_free)


@dataclass(frozen=True)
class Generation:
    ids: list[int]     # sampled tokens, the token that ended the response included when one was sampled
    length: int        # tokens before that end: the ones the reward's text is made of


@dataclass(frozen=True)
class SamplingVocabulary:
    """Which special tokens sampling suppresses and which end a response (ids of the policy's tokenizer)."""
    suppressed: tuple[int, ...]   # pad, BOS, unknown: never text, never an ending
    stops: tuple[int, ...]        # EOS first, then every other special token

    @classmethod
    def of(cls, tokenizer) -> "SamplingVocabulary":
        eos = tokenizer.eos_token_id
        suppressed = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id} - {eos, None}
        others = sorted(set(tokenizer.all_special_ids) - suppressed - {eos})
        return cls(tuple(sorted(suppressed)), (eos, *others))

    def generation(self, row: list[int]) -> Generation:
        """One row of generate's output (right-padded after its end) cut at its first stop."""
        end = next((i for i, token in enumerate(row) if token in self.stops), None)
        return Generation(row, len(row)) if end is None else Generation(row[:end + 1], end)


@torch.no_grad()
def generate(model, tokenizer, pairs: Sequence[PreferencePair], settings: EvalSettings,
             device: torch.device) -> list[Generation]:
    model.eval()
    torch.manual_seed(settings.seed)
    vocabulary = SamplingVocabulary.of(tokenizer)
    pad = tokenizer.pad_token_id
    out: list[Generation] = []
    for start in range(0, len(pairs), settings.batch_size):
        encoded = [encode_prompt(tokenizer, p.prompt, p.messages) for p in pairs[start:start + settings.batch_size]]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # (B, P)
        attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        sampled = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                 temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                 max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=list(vocabulary.stops),
                                 suppress_tokens=list(vocabulary.suppressed) or None)[:, width:].tolist()  # (B, <=N)
        out += [vocabulary.generation(row) for row in sampled]
    return out


@torch.no_grad()
def generation_logps(model, tokenizer, pairs: Sequence[PreferencePair], generations: Sequence[Generation],
                     device: torch.device, batch_size: int, padding_free: bool = True) -> list[float]:
    """Summed log-prob (temperature 1) of each generation given its prompt, in packed rows where the model can
    (no left or right padding) and through the chunked output layer (trainers.logprobs)."""
    model.eval()
    seqs = []
    for pair, gen in zip(pairs, generations):
        prompt_ids = encode_prompt(tokenizer, pair.prompt, pair.messages)
        seqs.append(EncodedSequence(prompt_ids + gen.ids, len(prompt_ids)))
    layout = choose_layout(model, padding_free, max(len(s.ids) for s in seqs))
    logps: list[float] = []
    for start in range(0, len(seqs), batch_size):
        batch = layout.sequences(seqs[start:start + batch_size], tokenizer.pad_token_id)
        values, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        logps += values.cpu().tolist()
    return logps


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of items where score beats baseline; ties count half."""
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline, strict=True))
    return wins / len(scores)


def summarize_samples(samples: list[dict]) -> dict[str, float]:
    """Trial metrics from per-sample records (keys as written by `evaluate`)."""
    scores = [s["score"] for s in samples]
    metrics = {
        "mean_score": sum(scores) / len(scores),
        "win_vs_chosen": win_rate(scores, [s["chosen_score"] for s in samples]),
        "length": sum(s["length"] for s in samples) / len(samples),
    }
    if all("sft_score" in s for s in samples):
        metrics["win_vs_sft"] = win_rate(scores, [s["sft_score"] for s in samples])
    if all("kl" in s for s in samples):
        metrics["kl"] = sum(s["kl"] for s in samples) / len(samples)
    return metrics


@dataclass
class SftBaseline:
    """What a preference trial compares against, computed once by the selected SFT trial: the SFT model
    (for KL), its generations' gold scores and the chosen responses' gold scores (prompt_id -> score)."""
    model: Optional[torch.nn.Module]
    scores: dict[str, float]
    chosen_scores: dict[str, float]


def evaluate(model, tokenizer, pairs: list[PreferencePair], reward: RewardModel, settings: EvalSettings,
             device: torch.device, sft: Optional[SftBaseline] = None) -> tuple[dict[str, float], list[dict]]:
    """Returns (metrics, per-sample records) over the first `settings.num_prompts` evaluation pairs."""
    pairs = pairs[:settings.num_prompts]
    prompts = [p.prompt for p in pairs]
    generations = generate(model, tokenizer, pairs, settings, device)
    texts = [tokenizer.decode(g.ids, skip_special_tokens=True) for g in generations]
    scores = reward.score(prompts, texts)
    chosen_scores = ([sft.chosen_scores[p.prompt_id] for p in pairs] if sft is not None
                     else reward.score(prompts, [p.chosen for p in pairs]))  # scored once, by the SFT trial
    samples = [{"prompt_id": p.prompt_id, "prompt": p.prompt, "generation": text, "length": g.length,
                "score": score, "chosen_score": chosen}
               for p, g, text, score, chosen in zip(pairs, generations, texts, scores, chosen_scores)]
    if sft is not None:
        for sample in samples:
            sample["sft_score"] = sft.scores[sample["prompt_id"]]
        if sft.model is not None:
            own = generation_logps(model, tokenizer, pairs, generations, device, settings.batch_size,
                                   settings.padding_free)
            ref = generation_logps(sft.model, tokenizer, pairs, generations, device, settings.batch_size,
                                   settings.padding_free)
            for sample, lp, lq in zip(samples, own, ref):
                sample["kl"] = lp - lq
    metrics = summarize_samples(samples)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite evaluation metrics: {', '.join(bad)}")
    return metrics, samples
