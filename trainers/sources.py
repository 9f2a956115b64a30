"""Data sources: a data spec -> preference pairs for the "train" and "eval" splits (registry by spec kind).

File-based sources read .jsonl, .jsonl.gz, .json (a list) or .parquet files, or a hub dataset through
`datasets.load_dataset` (which needs the network or a filled HF cache). Each row becomes one
PreferencePair through the kind's row adapter; a row it cannot use raises RowError, which becomes a
DataError naming the file and line, or is skipped and counted when the spec says `on_malformed: skip`.

Splits: "eval" comes from the spec's `eval` source when it has one (its first n_eval usable rows), else from
the last n_eval usable rows of the source itself; "train" is then every other row (at most n_train).
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.core.registry import Registry
from trainers import synthetic
from trainers.pairs import PreferencePair


class RowError(ValueError):
    """A row the adapter cannot turn into a pair (message says why)."""


class DataError(ValueError):
    """A data source problem, naming the file (and line) and what was expected."""


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[PreferencePair]
    skipped: int  # malformed rows passed over (on_malformed: skip)


# ---- reading rows ------------------------------------------------------------------------------------
def _file_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line or row number, decoded row) of a local file."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, RowError(f"invalid JSON ({exc.msg} at column {exc.colno})")
    elif name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file holds a list of rows; got {type(rows).__name__}")
        yield from enumerate(rows, 1)
    elif name.endswith(".parquet"):
        import pandas as pd
        yield from enumerate(pd.read_parquet(path).to_dict(orient="records"), 1)
    else:
        raise DataError(f"{path}: unsupported data file; use .jsonl, .jsonl.gz, .json or .parquet")


def _hub_rows(hub_id: str, split: str) -> Iterator[tuple[int, object]]:
    import datasets
    yield from enumerate(datasets.load_dataset(hub_id, split=split), 1)


def _rows(spec) -> tuple[str, Iterator[tuple[int, object]]]:
    if spec.path:
        return spec.path, _file_rows(Path(spec.path).expanduser())
    return f"{spec.hub_id}[{spec.split}]", _hub_rows(spec.hub_id, spec.split)


def _field(row, name: str) -> str:
    if not isinstance(row, dict):
        raise RowError(f"a row is a JSON object; got {type(row).__name__}")
    if name not in row:
        raise RowError(f"missing column {name!r} (row has: {', '.join(map(str, row)) or 'nothing'})")
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"column {name!r} must be a non-empty string")
    return value


# ---- row adapters: (spec, row, prompt_id) -> PreferencePair -------------------------------------------
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def hh_rlhf_turns(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [("user", "a"), ("assistant", "b"), ...]."""
    turns: list[tuple[str, str]] = []
    rest = text
    while rest:
        starts = [(rest.find(m), m) for m in (HUMAN, ASSISTANT) if rest.find(m) >= 0]
        if not starts:
            raise RowError("text outside the Human/Assistant turns")
        at, marker = min(starts)
        if at > 0 and turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + rest[:at])
        rest = rest[at + len(marker):]
        nxt = [rest.find(m) for m in (HUMAN, ASSISTANT) if rest.find(m) >= 0]
        end = min(nxt) if nxt else len(rest)
        turns.append(("user" if marker == HUMAN else "assistant", rest[:end].strip()))
        rest = rest[end:]
    return turns


def hh_rlhf_pair(spec, row, prompt_id: str) -> PreferencePair:
    """Anthropic HH-RLHF: chosen/rejected are whole dialogues that share every turn but the last
    Assistant one. The shared turns are the prompt; the two last Assistant turns are the responses."""
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise RowError("no Assistant turn in 'chosen'")
    prompt_text = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt_text):
        raise RowError("'chosen' and 'rejected' differ before the last Assistant turn")
    chosen_reply, rejected_reply = chosen[len(prompt_text):].strip(), rejected[len(prompt_text):].strip()
    if not chosen_reply or not rejected_reply:
        raise RowError("an empty final Assistant turn")
    messages = tuple(hh_rlhf_turns(chosen[:cut]))
    if not messages or messages[-1][0] != "user":
        raise RowError("the dialogue before the last Assistant turn does not end with a Human turn")
    return PreferencePair(prompt_id, prompt_text.strip(), chosen_reply, rejected_reply, messages)


def saferlhf_pair(spec, row, prompt_id: str) -> PreferencePair:
    """PKU-SafeRLHF rows: prompt, response_0/1, better_response_id, safer_response_id, is_response_{0,1}_safe.

    rule "safe_vs_unsafe" (default): keep only pairs where exactly one response is safe; that one is chosen.
    rule "safer": every pair; chosen = safer_response_id. rule "better": every pair; chosen =
    better_response_id (the helpfulness preference). Rows the rule drops are not errors."""
    prompt = _field(row, "prompt")
    responses = (_field(row, "response_0"), _field(row, "response_1"))
    if spec.rule == "safe_vs_unsafe":
        safe = (row.get("is_response_0_safe"), row.get("is_response_1_safe"))
        if not all(isinstance(s, bool) for s in safe):
            raise RowError("is_response_0_safe / is_response_1_safe must be true or false")
        if safe[0] == safe[1]:
            raise _Dropped()
        winner = 0 if safe[0] else 1
    else:
        column = "safer_response_id" if spec.rule == "safer" else "better_response_id"
        winner = row.get(column)
        if winner not in (0, 1):
            raise RowError(f"{column} must be 0 or 1")
    return PreferencePair(prompt_id, prompt, responses[winner], responses[1 - winner])


def column_pair(spec, row, prompt_id: str) -> PreferencePair:
    """Generic rows: the spec's column mapping names the prompt, chosen and rejected columns."""
    c = spec.columns
    return PreferencePair(prompt_id, _field(row, c.prompt), _field(row, c.chosen), _field(row, c.rejected))


class _Dropped(Exception):
    """A well-formed row that the source's filter rule leaves out (not counted as malformed)."""


ROW_ADAPTERS: Registry[Callable[..., PreferencePair]] = Registry("data file kind", {
    "hh_rlhf": hh_rlhf_pair,
    "saferlhf": saferlhf_pair,
    "generic": column_pair,
})


def checked_pair(spec, pair: PreferencePair) -> PreferencePair:
    """A pair refused for what it holds: responses that are the same (no preference to learn), or a text over
    data.max_row_chars (tokenizing a 50 MB row takes minutes and gigabytes before max_length cuts it)."""
    if pair.chosen.strip() == pair.rejected.strip():
        raise RowError("'chosen' and 'rejected' are the same response: the pair carries no preference")
    longest = max(len(pair.prompt), len(pair.chosen), len(pair.rejected))
    if longest > spec.max_row_chars:
        raise RowError(f"a text of {longest:,} characters, over data.max_row_chars ({spec.max_row_chars:,})")
    return pair


def _read_all(spec) -> LoadedPairs:
    where, rows = _rows(spec)
    adapter = ROW_ADAPTERS[spec.kind]
    pairs, skipped = [], 0
    for line, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            pairs.append(checked_pair(spec, adapter(spec, row, f"{spec.kind}-{line}")))
        except _Dropped:
            continue
        except RowError as exc:
            if spec.on_malformed == "skip":
                skipped += 1
                continue
            raise DataError(f"{where}:{line}: {exc} (set data.on_malformed: skip to pass over such rows)") from None
    if not pairs:
        raise DataError(f"{where}: no usable preference pairs ({skipped} malformed rows skipped)")
    return LoadedPairs(pairs, skipped)


def _eval_source(spec) -> LoadedPairs:
    other = _read_all(spec.eval)
    return LoadedPairs(other.pairs[:spec.n_eval], other.skipped)


def _file_splits(spec) -> tuple[LoadedPairs, LoadedPairs]:
    """(train, eval), each source read once. Malformed rows of a source count once: on the train split, and
    on the eval split only when it has a source of its own."""
    loaded = _read_all(spec)
    if spec.eval is not None:
        train, evaluation = loaded.pairs, _eval_source(spec)
    else:
        if len(loaded.pairs) <= spec.n_eval:
            raise DataError(f"{spec.path or spec.hub_id}: {len(loaded.pairs)} usable pairs, not enough for "
                            f"n_eval={spec.n_eval} held-out pairs plus training pairs")
        train, evaluation = loaded.pairs[:-spec.n_eval], LoadedPairs(loaded.pairs[-spec.n_eval:], 0)
    return LoadedPairs(train[:spec.n_train] if spec.n_train else train, loaded.skipped), evaluation


def _file_split(spec, split: str) -> LoadedPairs:
    if spec.eval is not None and split == "eval":  # the training source is not read at all
        return _eval_source(spec)
    return _file_splits(spec)[split == "eval"]


@functools.lru_cache(maxsize=8)
def _synthetic_pairs(split: str, n: int, seed: int, label_noise: float) -> tuple[PreferencePair, ...]:
    """Pure and deterministic, so trials of one process share one copy (generating is not free: ~0.15 s)."""
    return tuple(synthetic.generate_split(split, n, seed, label_noise))


def _synthetic_split(spec, split: str, shared: bool) -> LoadedPairs:
    args = (split, spec.n_train if split == "train" else spec.n_eval, spec.seed, spec.label_noise)
    return LoadedPairs(list(_synthetic_pairs(*args) if shared else synthetic.generate_split(*args)), 0)


DATA_SOURCES: Registry[Callable[..., LoadedPairs]] = Registry("data kind", {
    "synthetic": _synthetic_split,
    # files are read again by every trial: a file may change between trials, and reading is cheap
    **{kind: (lambda spec, split, shared: _file_split(spec, split)) for kind in ROW_ADAPTERS},
})


def load_split(data_spec, split: str, shared: bool = False) -> LoadedPairs:
    """The split's pairs; shared=True may reuse what this process already built for the same spec."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; known: train, eval")
    return DATA_SOURCES[data_spec.kind](data_spec, split, shared)


def load_splits(data_spec, shared: bool = False) -> tuple[LoadedPairs, LoadedPairs]:
    """(train, eval) with every source read once; the two `skipped` counts add up to the malformed rows."""
    if data_spec.kind in ROW_ADAPTERS:
        return _file_splits(data_spec)
    return load_split(data_spec, "train", shared), load_split(data_spec, "eval", shared)


def load_pairs(data_spec, split: str) -> list[PreferencePair]:
    return load_split(data_spec, split).pairs
