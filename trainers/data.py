"""Tokenization, batching and per-sequence log-probs of preference pairs (sources live in trainers.sources)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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


def collate_sequences(seqs: list[EncodedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and response_mask, each (B, T). Built from one padded
    list and two comparisons (a per-row tensor loop was the loop's main Python cost)."""
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.tensor([s.ids + [pad_id] * (width - len(s.ids)) for s in seqs], dtype=torch.long)
    lengths = torch.tensor([len(s.ids) for s in seqs]).unsqueeze(1)       # (B, 1)
    prompt_lens = torch.tensor([s.prompt_len for s in seqs]).unsqueeze(1)  # (B, 1)
    positions = torch.arange(width).unsqueeze(0)                           # (1, T)
    attention_mask = (positions < lengths).long()
    response_mask = (positions >= prompt_lens) & (positions < lengths)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one (2B, T) batch so one forward pass serves both."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)  # (B,)
    return batch


def next_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1, V) logits that predict tokens 1..T-1."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens and their count, each (B,)."""
    return logps_from_logits(next_token_logits(model, input_ids, attention_mask), input_ids, response_mask)


def logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens under (B, T-1, V) next-token logits, and their count; (B,) each."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision log-softmax loses too much
        logits = logits.float()
    targets = input_ids[:, 1:].unsqueeze(-1)                                            # (B, T-1, 1)
    # gather - logsumexp avoids materialising a second (B, T-1, V) log-softmax tensor
    token_logps = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, -1)
    mask = response_mask[:, 1:].to(token_logps.dtype)                                   # (B, T-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
