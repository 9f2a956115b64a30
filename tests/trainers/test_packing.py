"""Row layouts by hand: padded rows, prefix-shared pair units, first-fit-decreasing packing, and the scored tokens
every layout describes the same way."""

import torch

from trainers.data import EncodedPair, EncodedSequence
from trainers.logprobs import packed_allowed
from trainers.packing import (CHOSEN, PADDED, PROMPT, REJECTED, Layout, collate_packed, pack_units, pair_unit,
                              sequence_unit, unit_length)

# prompt [1, 5, 6]; chosen response [7, 2]; rejected response [8, 9, 2]
PAIR = EncodedPair(0, EncodedSequence([1, 5, 6, 7, 2], 3), EncodedSequence([1, 5, 6, 8, 9, 2], 3))


def scored(batch) -> list[tuple[int, int, int]]:
    return list(zip(batch["source"].tolist(), batch["target"].tolist(), batch["sequence"].tolist()))


def test_padded_rows_by_hand():
    seqs = [EncodedSequence([1, 5, 6, 2], prompt_len=2), EncodedSequence([1, 7, 2], prompt_len=1)]
    batch = PADDED.sequences(seqs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # row 0 scores 6 (predicted at flat position 1) and 2 (at 2); row 1 scores 7 (at 4) and 2 (at 5)
    assert scored(batch) == [(1, 6, 0), (2, 2, 0), (4, 7, 1), (5, 2, 1)]
    assert batch["lengths"].tolist() == [2, 2]
    assert batch["keep"].tolist() == [[False, True, True, False], [True, True, False, False]]
    assert batch["gather"].tolist() == [0, 1, 2, 3]


def test_a_token_at_position_zero_is_never_scored():
    batch = PADDED.sequences([EncodedSequence([7, 8, 2], prompt_len=0)], pad_id=0)
    assert scored(batch) == [(0, 8, 0), (1, 2, 0)] and batch["lengths"].tolist() == [2]
    assert scored(Layout(True).sequences([EncodedSequence([7, 8, 2], prompt_len=0)], pad_id=0)) == scored(batch)


def test_a_pair_unit_computes_its_prompt_once_by_hand():
    unit = pair_unit(PAIR, chosen_sequence=0, rejected_sequence=1)
    assert unit.ids == [1, 5, 6, 7, 2, 8, 9, 2]
    assert unit.positions == [0, 1, 2, 3, 4, 3, 4, 5]           # each response continues from the prompt's end
    assert unit.branches == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3
    # both responses' first tokens are predicted by the prompt's last token (offset 2)
    assert unit.scored == [(2, 3, 0), (3, 4, 0), (2, 5, 1), (5, 6, 1), (6, 7, 1)]
    assert unit_length(PAIR) == 8


def test_the_attention_of_a_pair_unit_by_hand():
    """Prompt causal; chosen sees the prompt and itself; rejected sees the prompt and itself, never chosen;
    the pad column (unit -1) sees only itself and is seen by no one."""
    unit = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0]])
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],   # chosen 7
        [1, 1, 1, 1, 1, 0, 0, 0, 0],   # chosen 2
        [1, 1, 1, 0, 0, 1, 0, 0, 0],   # rejected 8: prompt, itself
        [1, 1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1],   # padding
    ]
    assert packed_allowed(unit, branch)[0].long().tolist() == expected


def test_units_of_different_rows_and_units_never_see_each_other():
    allowed = packed_allowed(torch.tensor([[0, 0, 1, 1]]), torch.zeros(1, 4, dtype=torch.long))[0]
    assert allowed.long().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_first_fit_decreasing_into_rows_as_wide_as_the_widest_unit():
    units = [sequence_unit(EncodedSequence([1] * n, 1), i) for i, n in enumerate([3, 7, 4, 2, 5])]
    # widest 7: [7], [5, 2], [4, 3]
    assert pack_units(units) == [[1], [4, 3], [2, 0]]


def test_packed_pairs_by_hand():
    other = EncodedPair(1, EncodedSequence([1, 4, 2], 2), EncodedSequence([1, 4, 3, 2], 2))
    batch = Layout(True).pairs([PAIR, other], pad_id=0)
    # units of 8 and 5 tokens: one row each (8 + 5 > 8), the second padded to 8
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 4, 2, 3, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 2, 3, 0, 0, 0]]
    assert batch["unit"].tolist() == [[0] * 8, [0] * 5 + [-1] * 3]
    # sequences: chosen 0, 1; rejected 2, 3
    assert scored(batch) == [(2, 7, 0), (3, 2, 0), (2, 8, 2), (5, 9, 2), (6, 2, 2),
                             (9, 2, 1), (9, 3, 3), (11, 2, 3)]
    assert batch["lengths"].tolist() == [2, 1, 3, 2] and batch["index"].tolist() == [0, 1]
    # position 2 predicts both first response tokens: kept once, gathered twice
    kept = batch["keep"].view(-1).nonzero().squeeze(1).tolist()
    assert kept == [2, 3, 5, 6, 9, 11]
    assert [kept[g] for g in batch["gather"].tolist()] == batch["source"].tolist()


def test_a_pair_whose_prompts_differ_is_two_sequence_units():
    """Defensive: encode_pairs always gives a pair one prompt, but a hand-built pair may not."""
    odd = EncodedPair(0, EncodedSequence([1, 5, 7, 2], 2), EncodedSequence([1, 6, 8, 2], 2))
    batch = Layout(True).pairs([odd], pad_id=0)
    padded = PADDED.pairs([odd], pad_id=0)
    assert sorted(batch["target"].tolist()) == sorted(padded["target"].tolist())
    assert batch["lengths"].tolist() == padded["lengths"].tolist() == [2, 2]
    assert unit_length(odd) == 8


def test_chosen_only_batches_for_sft():
    batch = Layout(True).chosen([PAIR], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2]] and batch["lengths"].tolist() == [2]
    assert batch["index"].tolist() == [0]


def test_collate_packed_keeps_the_sequence_count_when_a_sequence_scores_nothing():
    batch = collate_packed([sequence_unit(EncodedSequence([7], 0), 0), sequence_unit(EncodedSequence([1, 2], 1), 1)],
                           2, pad_id=0)
    assert batch["lengths"].tolist() == [0, 1]
