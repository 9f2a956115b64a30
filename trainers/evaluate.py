"""Evaluation on held-out prompts: sample, score with the gold reward, compare, measure KL and length.

Metrics (the paper's §5; docs/report.md shows them), per trial:
  mean_score     mean gold score of the policy's generations
  win_vs_chosen  share of prompts where the generation outscores the dataset's chosen response (ties 1/2)
  win_vs_sft     share where it outscores the SFT model's generation for the same prompt (ties 1/2)
  kl             mean over samples of Σ_t [log πθ(y_t|·) − log π_SFT(y_t|·)] on the policy's own samples
                 (untempered log-probs of both models; the EOS token counts when it was sampled)
  length         generated tokens before the response ends, in the policy's tokenizer: exactly the tokens
                 whose text the gold reward scores

How (trainers.generation): every prompt is cut to evaluation.max_prompt_length tokens (keeping its end, as
training does) and sampled from its own random stream, in batches of similar length under a token budget; the
policy's log-probs of its samples come with them, so the KL needs one more pass, the SFT model's, in
length-sorted batches too. Sampling never emits a token that is not text (pad, BOS, unknown) and ends at any
other special token (EOS, a chat template's end-of-turn). The reward model cuts prompts, never responses
(trainers.reward). Where the time goes is measured per phase (EvalUsage: time_generate_s, time_reward_s,
time_kl_s, generated tokens and tokens/s).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from trainers.data import EncodedSequence, encode_prompt
from trainers.generation import ENGINES, Request, Sample, SamplingParams, length_batches, stream_seed
from trainers.logprobs import choose_layout, sequence_logps
from trainers.pairs import PreferencePair
from trainers.reward import RewardModel
from trainers.train import autocast


@dataclass(frozen=True)
class EvalSettings:
    temperature: float
    top_p: float
    max_new_tokens: int
    num_prompts: int
    seed: int
    batch_size: int                      # rows of a generation, KL or reward batch at most
    batch_tokens: int = 32768            # a generation batch's rows x (longest prompt + max_new_tokens) at most
    max_prompt_length: int = 2 ** 31     # prompts keep their last this-many tokens
    precision: str = "fp32"              # fp32 | bf16: autocast of the policy's and SFT model's forward passes
    engine: str = "transformers"         # trainers.generation.ENGINES
    padding_free: bool = True            # the KL pass in packed rows where the model can (training.padding_free)

    def sampling(self, vocabulary: "SamplingVocabulary") -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, vocabulary.suppressed,
                              vocabulary.stops)


@dataclass(frozen=True)
class Generation:
    ids: list[int]     # sampled tokens, the token that ended the response included when one was sampled
    length: int        # tokens before that end: the ones the reward's text is made of
    logp: float = 0.0  # Σ log π(y_t|·) over ids under the model that sampled them (temperature 1)


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

    def generation(self, sample: Sample) -> Generation:
        """A sample (which ends at its first stop token, if it sampled one) with its text length."""
        ended = bool(sample.ids) and sample.ids[-1] in self.stops
        return Generation(sample.ids, len(sample.ids) - ended, sample.logp)


@dataclass(frozen=True)
class EncodedPrompts:
    ids: list[list[int]]   # each prompt's ids, cut to max_prompt_length
    cut: int               # how many were longer (their start dropped)


def encode_prompts(tokenizer, pairs: Sequence[PreferencePair], max_prompt_length: int) -> EncodedPrompts:
    whole = [encode_prompt(tokenizer, p.prompt, p.messages) for p in pairs]
    return EncodedPrompts([ids[-max_prompt_length:] for ids in whole],
                          sum(len(ids) > max_prompt_length for ids in whole))


@dataclass
class EvalUsage:
    """Where one evaluation's time went, and its sizes. `metrics()` is what a trial logs."""
    time_generate_s: float = 0.0
    time_reward_s: float = 0.0
    time_kl_s: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0        # real prompt tokens generated from (after the cut)
    prefill_positions: int = 0    # positions the prefill computed, padding included
    prompts_cut: int = 0          # prompts longer than max_prompt_length
    reward_prompts_cut: int = 0   # prompts the reward model read cut (their start) to fit the response
    reward_responses_cut: int = 0  # responses too long for the reward model (their end unread)

    def metrics(self) -> dict[str, float]:
        rate = self.generated_tokens / self.time_generate_s if self.time_generate_s > 0 else 0.0
        return {"time_generate_s": self.time_generate_s, "time_reward_s": self.time_reward_s,
                "time_kl_s": self.time_kl_s, "generated_tokens": float(self.generated_tokens),
                "generated_tokens_per_s": rate}

    def cuts(self) -> dict[str, int]:
        return {"prompts": self.prompts_cut, "reward_prompts": self.reward_prompts_cut,
                "reward_responses": self.reward_responses_cut}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]   # summarize_samples
    samples: list[dict]         # one record per prompt
    usage: EvalUsage


def generate(model, tokenizer, pairs: Sequence[PreferencePair], settings: EvalSettings, device: torch.device,
             prompts: Optional[EncodedPrompts] = None, usage: Optional[EvalUsage] = None) -> list[Generation]:
    """One generation per pair, each from the prompt's own random stream (trainers.generation)."""
    prompts = prompts or encode_prompts(tokenizer, pairs, settings.max_prompt_length)
    vocabulary = SamplingVocabulary.of(tokenizer)
    engine = ENGINES[settings.engine](model, tokenizer.pad_token_id, device, settings.batch_size,
                                      settings.batch_tokens, lambda: autocast(device, settings.precision))
    requests = [Request(ids, stream_seed(settings.seed, p.prompt_id)) for p, ids in zip(pairs, prompts.ids)]
    started = time.perf_counter()
    samples, counts = engine.generate(requests, settings.sampling(vocabulary))
    if usage is not None:
        usage.time_generate_s += time.perf_counter() - started
        usage.generated_tokens += counts.generated_tokens
        usage.prompt_tokens += counts.prompt_tokens
        usage.prefill_positions += counts.prefill_positions
    return [vocabulary.generation(s) for s in samples]


@torch.no_grad()
def sequences_logps(model, seqs: Sequence[EncodedSequence], pad_id: int, device: torch.device,
                    settings: EvalSettings) -> list[float]:
    """Summed log-prob (temperature 1) of each sequence's tokens after its prompt, in order: sequences sorted by
    length into batches under the token budget, packed rows where the model can (no padding), the chunked
    output layer (trainers.logprobs), autocast at evaluation.precision."""
    model.eval()
    layout = choose_layout(model, settings.padding_free, max(len(s.ids) for s in seqs))
    logps = [0.0] * len(seqs)
    lengths = [len(s.ids) for s in seqs]
    for batch in length_batches(lengths, settings.batch_size, settings.batch_tokens):
        rows = layout.sequences([seqs[i] for i in batch], pad_id)
        with autocast(device, settings.precision):
            values, _ = sequence_logps(model, {k: v.to(device) for k, v in rows.items()})
        for i, value in zip(batch, values.float().cpu().tolist()):
            logps[i] = value
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


def _scored(reward: RewardModel, prompts: list[str], responses: list[str], usage: EvalUsage) -> list[float]:
    started = time.perf_counter()
    scores = reward.score(prompts, responses)
    usage.time_reward_s += time.perf_counter() - started
    usage.reward_prompts_cut += scores.prompts_cut
    usage.reward_responses_cut += scores.responses_cut
    return scores.values


def evaluate(model, tokenizer, pairs: list[PreferencePair], reward: RewardModel, settings: EvalSettings,
             device: torch.device, sft: Optional[SftBaseline] = None) -> Evaluation:
    """Metrics, per-sample records and usage over the first `settings.num_prompts` evaluation pairs."""
    pairs = pairs[:settings.num_prompts]
    prompts = [p.prompt for p in pairs]
    encoded = encode_prompts(tokenizer, pairs, settings.max_prompt_length)
    usage = EvalUsage(prompts_cut=encoded.cut)
    generations = generate(model, tokenizer, pairs, settings, device, encoded, usage)
    texts = [tokenizer.decode(g.ids, skip_special_tokens=True) for g in generations]
    scores = _scored(reward, prompts, texts, usage)
    chosen_scores = ([sft.chosen_scores[p.prompt_id] for p in pairs] if sft is not None
                     else _scored(reward, prompts, [p.chosen for p in pairs], usage))  # once, by the SFT trial
    samples = [{"prompt_id": p.prompt_id, "prompt": p.prompt, "generation": text, "length": g.length,
                "score": score, "chosen_score": chosen}
               for p, g, text, score, chosen in zip(pairs, generations, texts, scores, chosen_scores)]
    if sft is not None:
        for sample in samples:
            sample["sft_score"] = sft.scores[sample["prompt_id"]]
        if sft.model is not None:
            started = time.perf_counter()
            seqs = [EncodedSequence(ids + g.ids, len(ids)) for ids, g in zip(encoded.ids, generations)]
            reference = sequences_logps(sft.model, seqs, tokenizer.pad_token_id, device, settings)
            usage.time_kl_s += time.perf_counter() - started
            for sample, g, lq in zip(samples, generations, reference):
                sample["kl"] = g.logp - lq
    metrics = summarize_samples(samples)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite evaluation metrics: {', '.join(bad)}")
    return Evaluation(metrics, samples, usage)
