"""How encoded sequences become the rows a model reads (CPU side, before the forward pass).

Two layouts give the same log-probs (to float rounding; tests/trainers/test_packing.py holds them equal):

- **padded**: one right-padded row per sequence (pairs: the chosen rows, then the rejected rows) and a 2-D
  attention mask. Works with every model and attention implementation; the only layout before packing.
- **packed**: no padding between sequences. A *unit* attends only to itself: one sequence, or one preference
  pair laid out as

      prompt | chosen response | rejected response

  with the prompt computed once (prefix sharing): each response attends to the prompt and to itself, never to
  the other response, and its positions continue from the prompt's end, so every token sees exactly what it
  sees in its own padded row. Units are packed first-fit-decreasing into rows as wide as the widest unit: no
  row is wider than a padded batch's, and attention stays quadratic in a row, not in the whole batch.

Both layouts describe the tokens to score the same way, so one log-prob function serves both
(trainers.logprobs): for every scored token (a response token that has a token before it) `source` is the
flat position (row * width + column) of the token that predicts it, `target` its id and `sequence` the
sequence it belongs to (pairs: chosen i -> i, rejected i -> B + i); `lengths` counts the scored tokens of each
sequence. A pair's first chosen and first rejected tokens share one source (the prompt's last token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from trainers.data import EncodedPair, EncodedSequence

PROMPT, CHOSEN, REJECTED = 0, 1, 2   # branches of a unit; every branch sees the prompt branch


@dataclass
class Unit:
    """Tokens that attend only to each other, with their positions, branches and the tokens scored in them."""
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    scored: list[tuple[int, int, int]] = field(default_factory=list)  # (source offset, target offset, sequence)

    def add(self, ids: Sequence[int], start: int, branch: int, sequence: int = -1, source: int = -1) -> None:
        """Append `ids` at positions start, start+1, ... on `branch`. With a `sequence`, each of them is scored for
        it: the first predicted from offset `source` (-1: no predecessor, not scored), the others from the token
        before them. Without one they are context only (a prompt)."""
        offset = len(self.ids)
        self.ids += ids
        self.positions += range(start, start + len(ids))
        self.branches += [branch] * len(ids)
        if sequence < 0:
            return
        for i in range(len(ids)):
            predictor = source if i == 0 else offset + i - 1
            if predictor >= 0:
                self.scored.append((predictor, offset + i, sequence))


def sequence_unit(seq: EncodedSequence, sequence: int) -> Unit:
    """One sequence: its response tokens are scored (a first token at position 0 has no predictor)."""
    unit, p = Unit(), seq.prompt_len
    unit.add(seq.ids[:p], 0, PROMPT)
    unit.add(seq.ids[p:], p, PROMPT, sequence, p - 1)
    return unit


def shares_prompt(pair: EncodedPair) -> bool:
    p = pair.chosen.prompt_len
    return p == pair.rejected.prompt_len and pair.chosen.ids[:p] == pair.rejected.ids[:p]


def pair_unit(pair: EncodedPair, chosen_sequence: int, rejected_sequence: int) -> Unit:
    """prompt | chosen | rejected, the prompt computed once; both responses start after the prompt."""
    p = pair.chosen.prompt_len
    unit = Unit()
    unit.add(pair.chosen.ids[:p], 0, PROMPT)
    unit.add(pair.chosen.ids[p:], p, CHOSEN, chosen_sequence, p - 1)
    unit.add(pair.rejected.ids[p:], p, REJECTED, rejected_sequence, p - 1)
    return unit


def pack_units(units: list[Unit]) -> list[list[int]]:
    """First-fit decreasing into rows as wide as the widest unit; rows of unit indices, deterministic."""
    width = max(len(u.ids) for u in units)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(units)), key=lambda i: -len(units[i].ids)):
        size = len(units[i].ids)
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= size
    return rows


def _scoring(source: list[int], target: list[int], sequence: list[int], n_sequences: int, width: int,
             rows: int) -> dict[str, torch.Tensor]:
    """The scored-token tensors shared by both layouts, plus `keep` (rows, width), the positions whose hidden
    state predicts something (for the model's logits_to_keep), and `gather` (M,), each scored token's row among
    the kept positions (two tokens can share one)."""
    source_t = torch.tensor(source, dtype=torch.long)                                     # (M,)
    keep = torch.zeros(rows * width, dtype=torch.bool)
    keep[source_t] = True
    rank = keep.long().cumsum(0) - 1
    sequence_t = torch.tensor(sequence, dtype=torch.long)
    return {"source": source_t, "target": torch.tensor(target, dtype=torch.long), "sequence": sequence_t,
            "lengths": torch.bincount(sequence_t, minlength=n_sequences), "keep": keep.view(rows, width),
            "gather": rank[source_t]}


def collate_padded(seqs: list[EncodedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence: input_ids and attention_mask (R, T), plus the scored tokens."""
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.tensor([s.ids + [pad_id] * (width - len(s.ids)) for s in seqs], dtype=torch.long)
    lengths = torch.tensor([len(s.ids) for s in seqs]).unsqueeze(1)                       # (R, 1)
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths).long()                 # (R, T)
    source, target, sequence = [], [], []
    for row, s in enumerate(seqs):
        for t in range(max(s.prompt_len, 1), len(s.ids)):
            source.append(row * width + t - 1)
            target.append(s.ids[t])
            sequence.append(row)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            **_scoring(source, target, sequence, len(seqs), width, len(seqs))}


def collate_packed(units: list[Unit], n_sequences: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Units packed into rows: input_ids, position_ids, unit and branch (R, W), each unit's index within its
    row in `unit` (-1 on padding: it attends to nothing but itself), plus the scored tokens."""
    rows = pack_units(units)
    width = max(sum(len(units[i].ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    unit_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    branches = torch.zeros((len(rows), width), dtype=torch.long)
    source, target, sequence = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for slot, i in enumerate(row):
            u, end = units[i], offset + len(units[i].ids)
            input_ids[r, offset:end] = torch.tensor(u.ids)
            position_ids[r, offset:end] = torch.tensor(u.positions)
            unit_ids[r, offset:end] = slot
            branches[r, offset:end] = torch.tensor(u.branches)
            for src, tgt, seq in u.scored:
                source.append(r * width + offset + src)
                target.append(u.ids[tgt])
                sequence.append(seq)
            offset = end
    return {"input_ids": input_ids, "position_ids": position_ids, "unit": unit_ids, "branch": branches,
            **_scoring(source, target, sequence, n_sequences, width, len(rows))}


@dataclass(frozen=True)
class Layout:
    """How a batch is laid out for one model: `packed` (padding-free rows, pairs with their prompt once) or
    padded rows; `reason` says why a model gets padded rows when packing was asked for."""
    packed: bool
    reason: str = ""

    def pairs(self, pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
        """Chosen and rejected sequences of the pairs (sequence i: chosen, B + i: rejected) and `index` (B,)."""
        n = len(pairs)
        if self.packed:
            units = [u for i, p in enumerate(pairs) for u in _pair_units(p, i, n + i)]
            batch = collate_packed(units, 2 * n, pad_id)
        else:
            batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        return batch

    def sequences(self, seqs: list[EncodedSequence], pad_id: int) -> dict[str, torch.Tensor]:
        """Each sequence on its own (sequence i: seqs[i])."""
        if self.packed:
            return collate_packed([sequence_unit(s, i) for i, s in enumerate(seqs)], len(seqs), pad_id)
        return collate_padded(seqs, pad_id)

    def chosen(self, pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
        """The chosen sequences only (SFT), with the pairs' `index` (B,)."""
        batch = self.sequences([p.chosen for p in pairs], pad_id)
        batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        return batch

    def describe(self) -> str:
        return "packed rows, prompt shared by a pair's responses" if self.packed else f"padded rows ({self.reason})"


PADDED = Layout(False, "training.padding_free is off")


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a batch (either layout) that hold a token, not padding."""
    return int(batch["attention_mask"].sum()) if "unit" not in batch else int((batch["unit"] >= 0).sum())


def _pair_units(pair: EncodedPair, chosen: int, rejected: int) -> list[Unit]:
    if shares_prompt(pair):
        return [pair_unit(pair, chosen, rejected)]
    return [sequence_unit(pair.chosen, chosen), sequence_unit(pair.rejected, rejected)]


def unit_length(pair: EncodedPair) -> int:
    """Tokens of a pair as the packed layout holds it (the prompt once): what micro-batches are grouped by."""
    return len(pair.chosen.ids) + len(pair.rejected.ids) - (pair.chosen.prompt_len if shares_prompt(pair) else 0)
