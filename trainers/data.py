"""Tokenization of preference pairs (sources live in trainers.sources; batches in trainers.packing; log-probs in
trainers.logprobs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainers.pairs import PreferencePair


@dataclass(frozen=True)
class EncodedSequence:
    ids: list[int]      # prompt + response + eos, already truncated
    prompt_len: int     # number of leading ids that belong to the prompt (never trained on)


def encode_prompt(tokenizer, prompt: str, messages: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Prompt ids: the tokenizer's chat template with a generation prompt when it has one, else
    BOS (if the tokenizer has one) + the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": r, "content": c} for r, c in messages] or [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_sequence(tokenizer, prompt: str, response: str, max_length: int,
                    messages: Sequence[tuple[str, str]] = ()) -> EncodedSequence:
    """Keep the whole prompt when it fits (its end if not) and cut the response to fit max_length."""
    prompt_ids = encode_prompt(tokenizer, prompt, messages)[-(max_length - 1):]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    return EncodedSequence(ids, len(prompt_ids))


@dataclass(frozen=True)
class EncodedPair:
    index: int
    chosen: EncodedSequence
    rejected: EncodedSequence


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> list[EncodedPair]:
    return [EncodedPair(i, encode_sequence(tokenizer, p.prompt, p.chosen, max_length, p.messages),
                        encode_sequence(tokenizer, p.prompt, p.rejected, max_length, p.messages))
            for i, p in enumerate(pairs)]
