"""Data adapters on small files written here (the shared HH-RLHF file is used by tests/integration)."""

import gzip
import json

import pytest

from orchestrator.core.spec_file import SpecError, parse_spec
from trainers.sources import DataError, hh_rlhf_turns, load_pairs, load_split

STAGES = "stages: {sft: {grid: {learning_rate: [1.0e-3]}}, methods: {dpo: {grid: {beta: [0.1], learning_rate: [1.0e-4]}}}}\n"


def data_spec(text: str):
    return parse_spec(f"name: t\n{text}\nevaluation: {{num_prompts: 1}}\n" + STAGES).data


def write_jsonl(path, rows, gz=False):
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def hh_row(i, last_chosen="Sure, here it is.", last_rejected="No."):
    prompt = f"\n\nHuman: question {i}?\n\nAssistant: What for?\n\nHuman: curiosity\n\nAssistant:"
    return {"chosen": f"{prompt} {last_chosen}", "rejected": f"{prompt} {last_rejected}"}


def test_hh_rlhf_turns_and_pair(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [hh_row(i) for i in range(5)], gz=True)
    spec = data_spec(f"data: {{kind: hh_rlhf, path: {path}, n_eval: 2}}")
    train, evaluation = load_pairs(spec, "train"), load_pairs(spec, "eval")
    assert len(train) == 3 and len(evaluation) == 2
    assert {p.prompt_id for p in train}.isdisjoint(p.prompt_id for p in evaluation)
    pair = train[0]
    assert pair.chosen == "Sure, here it is." and pair.rejected == "No."
    assert pair.messages == (("user", "question 0?"), ("assistant", "What for?"), ("user", "curiosity"))
    assert pair.prompt.startswith("Human: question 0?") and pair.prompt.endswith("Assistant:")
    assert hh_rlhf_turns("\n\nHuman: a\n\nAssistant: b") == [("user", "a"), ("assistant", "b")]


def test_malformed_row_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    rows = [hh_row(0), "{not json", hh_row(2, last_chosen=""), hh_row(3), hh_row(4)]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh.jsonl:2: invalid JSON"):
        load_pairs(data_spec(f"data: {{kind: hh_rlhf, path: {path}, n_eval: 1}}"), "train")
    loaded = load_split(data_spec(f"data: {{kind: hh_rlhf, path: {path}, n_eval: 1, on_malformed: skip}}"), "train")
    assert loaded.skipped == 2 and len(loaded.pairs) == 2


def saferlhf_row(i, safe0, safe1, better=0, safer=1):
    return {"prompt": f"p{i}", "response_0": f"r0-{i}", "response_1": f"r1-{i}", "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": safer}


def test_saferlhf_rules(tmp_path):
    rows = [saferlhf_row(0, True, False), saferlhf_row(1, False, False), saferlhf_row(2, False, True, better=0),
            saferlhf_row(3, True, True), saferlhf_row(4, False, True)]
    path = write_jsonl(tmp_path / "safe.jsonl", rows)
    safe_only = load_pairs(data_spec(f"data: {{kind: saferlhf, path: {path}, n_eval: 1}}"), "train")
    # exactly-one-safe rows only (0, 2, 4); the last is held out for evaluation; the safe response is chosen
    assert [(p.prompt, p.chosen) for p in safe_only] == [("p0", "r0-0"), ("p2", "r1-2")]
    better = load_pairs(data_spec(f"data: {{kind: saferlhf, path: {path}, n_eval: 1, rule: better}}"), "train")
    assert len(better) == 4 and better[2].chosen == "r0-2"


def test_generic_columns_and_separate_eval_source(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": f"q{i}", "good": "g", "bad": "b"} for i in range(6)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [hh_row(i) for i in range(3)])
    spec = data_spec(f"data: {{kind: generic, path: {train}, n_eval: 2, n_train: 4,\n"
                     f"  columns: {{prompt: q, chosen: good, rejected: bad}}, eval: {{kind: hh_rlhf, path: {held_out}}}}}")
    assert [p.prompt for p in load_pairs(spec, "train")] == ["q0", "q1", "q2", "q3"]
    assert [p.prompt_id for p in load_pairs(spec, "eval")] == ["hh_rlhf-1", "hh_rlhf-2"]


def test_spec_rejects_unknown_columns_and_missing_files(tmp_path):
    """The schema reads no file; preflight (sweep run/plan) refuses unknown columns and missing files."""
    from trainers.preflight import InputError, Preflight, check_data

    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "x", "good": "g", "bad": "b"}])
    with pytest.raises(InputError) as info:
        check_data(data_spec(f"data: {{kind: generic, path: {train}}}"), Preflight())
    assert "columns 'prompt', 'chosen', 'rejected' not in" in str(info.value) and "its columns: q, good, bad" in str(info.value)
    with pytest.raises(InputError, match="no such file"):
        check_data(data_spec("data: {kind: hh_rlhf, path: /no/such.jsonl}"), Preflight())
    with pytest.raises(SpecError, match="exactly one of path"):
        data_spec("data: {kind: hh_rlhf}")
    with pytest.raises(SpecError, match="exactly one of path"):
        parse_spec("name: t\nmodel: {kind: hf}\n" + STAGES)


def test_too_few_rows_for_the_held_out_split(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_row(0), hh_row(1)])
    with pytest.raises(DataError, match="not enough for n_eval=2"):
        load_pairs(data_spec(f"data: {{kind: hh_rlhf, path: {path}, n_eval: 2}}"), "train")


def test_eval_split_from_its_own_source_never_reads_the_training_file(tmp_path):
    """Work in the wrong place: loading the eval split used to read (and parse) the whole training source."""
    train = write_jsonl(tmp_path / "train.jsonl", [hh_row(0), "{broken"])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [hh_row(i) for i in range(2)])
    spec = data_spec(f"data: {{kind: hh_rlhf, path: {train}, n_eval: 2, eval: {{kind: hh_rlhf, path: {held_out}}}}}")
    assert len(load_pairs(spec, "eval")) == 2
    with pytest.raises(DataError, match="train.jsonl:2"):
        load_pairs(spec, "train")


def test_both_splits_read_each_source_once_and_count_malformed_rows_once(tmp_path, monkeypatch):
    """Bug guard: a trial read its file once per split and added both splits' skipped counts, so
    data_skipped_rows counted every malformed row twice (4 here instead of 2)."""
    from trainers import sources

    rows = [hh_row(0), "{not json", hh_row(2, last_chosen=""), hh_row(3), hh_row(4)]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    reads = []
    real_read_all = sources._read_all
    monkeypatch.setattr(sources, "_read_all", lambda spec: reads.append(spec.path) or real_read_all(spec))
    train, evaluation = sources.load_splits(
        data_spec(f"data: {{kind: hh_rlhf, path: {path}, n_eval: 1, on_malformed: skip}}"))
    assert reads == [str(path)]
    assert (len(train.pairs), len(evaluation.pairs)) == (2, 1)
    assert train.skipped + evaluation.skipped == 2
