from pathlib import Path

import pytest

from orchestrator.api import builtin_spec_path
from orchestrator.grid import expand_grid, plan_sweep
from orchestrator.contract.spec import GridSpec
from orchestrator.contract.spec_file import load_spec, parse_spec

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

SPEC = """\
name: t
stages:
  sft:
    grid: {learning_rate: [1e-3, 3e-3], epochs: [1, 2]}
  methods:
    simpo:
      grid: {learning_rate: [1e-4]}
      zip: {beta: [2.0, 2.5, 3.0], gamma: [0.5, 1.0, 1.5]}
    dpo:
      grid: {beta: [0.1, 0.3], learning_rate: [1e-4, 3e-4], epochs: [1, 3]}
"""


def test_product_and_zip():
    points = expand_grid(GridSpec(grid={"a": [1, 2], "b": [3]}, zip={"c": [4, 5], "d": [6, 7]}))
    assert points == [{"a": 1, "b": 3, "c": 4, "d": 6}, {"a": 1, "b": 3, "c": 5, "d": 7},
                      {"a": 2, "b": 3, "c": 4, "d": 6}, {"a": 2, "b": 3, "c": 5, "d": 7}]


def test_trial_counts_per_stage():
    stages = {s.stage: s.trials for s in plan_sweep(parse_spec(SPEC))}
    assert [len(stages[k]) for k in ("base", "sft", "simpo", "dpo")] == [1, 4, 3, 8]


def test_yaml_exponent_strings_become_floats_with_defaults():
    sft = {s.stage: s.trials for s in plan_sweep(parse_spec(SPEC))}["simpo"][0]
    assert sft.hparams == {"beta": 2.0, "gamma": 0.5, "learning_rate": 1e-4, "epochs": 1}
    assert isinstance(sft.hparams["learning_rate"], float)


def test_keys_deterministic_unique_and_config_sensitive():
    first = [t.trial_key for s in plan_sweep(parse_spec(SPEC)) for t in s.trials]
    again = [t.trial_key for s in plan_sweep(parse_spec(SPEC)) for t in s.trials]
    assert first == again and len(set(first)) == len(first)
    renamed = [t.trial_key for s in plan_sweep(parse_spec(SPEC.replace("name: t", "name: other")))
               for t in s.trials]
    assert renamed == first  # the sweep's name is not part of a trial's identity
    longer = [t.trial_key for s in plan_sweep(parse_spec(SPEC + "training: {max_length: 64}\n"))
              for t in s.trials]
    assert set(longer).isdisjoint(first)


def test_preference_keys_follow_the_sft_grid():
    base = {s.stage: s for s in plan_sweep(parse_spec(SPEC))}
    changed = {s.stage: s for s in plan_sweep(parse_spec(SPEC.replace("epochs: [1, 2]", "epochs: [1]")))}
    assert base["dpo"].trials[0].trial_key != changed["dpo"].trials[0].trial_key


def test_smoke_thins_grids_and_shortens_trials():
    stages = plan_sweep(parse_spec(SPEC), smoke=True)
    assert all(len(s.trials) <= 2 for s in stages)
    assert all(t.training.max_steps == 30 and t.evaluation.num_prompts == 16 for s in stages for t in s.trials)


def test_run_names_are_readable():
    simpo = {s.stage: s.trials for s in plan_sweep(parse_spec(SPEC))}["simpo"][0]
    assert simpo.run_name == "simpo beta=2 gamma=0.5 lr=0.0001 e=1".replace("beta", "b").replace("gamma", "g")


@pytest.mark.parametrize("name,counts", [
    ("quickstart", None),
    ("dpo", {"sft": 2, "dpo": 20}),
    ("ln_dpo", {"sft": 2, "ln_dpo": 24}),
    ("simpo", {"sft": 2, "simpo": 96}),
    ("paper/phi3_saferlhf", {"sft": 8, "dpo": 40, "ln_dpo": 48, "simpo": 192}),
    ("paper_mini", {"base": 1, "sft": 2, "dpo": 20, "simpo": 96, "ln_dpo": 24}),       # 143 trials
    ("paper/smollm2_hh", {"base": 1, "sft": 2, "dpo": 20, "simpo": 96, "ln_dpo": 24}),
])
def test_shipped_sweeps_validate(name, counts):
    stages = {s.stage: len(s.trials) for s in plan_sweep(load_spec(SWEEPS / f"{name}.yaml"))}
    if counts:
        assert {k: stages[k] for k in counts} == counts
    else:
        assert {"base", "sft", "dpo", "simpo", "ln_dpo"} <= set(stages)


def test_keys_of_trials_from_before_later_settings_are_unchanged():
    """Golden keys computed at commit 13d12e4, before precision, lora, gradient_checkpointing and
    require_chat_template existed: a rerun of an older sweep must still find its finished trials."""
    stages = {s.stage: s for s in plan_sweep(load_spec(builtin_spec_path("quickstart")))}
    assert stages["dpo"].trials[0].trial_key == "8c41a1772de8de3e257d86fd2ff4a4db7f44c83fd2efd31939aa839667d53e28"
    assert stages["sft"].trials[0].trial_key == "0e86d3a59fcb054517480dba4ec7fa2e37da6e2b6c25a3a7711584df2f770198"
    hf = """name: t
model: {kind: hf, hub_id: HuggingFaceTB/SmolLM2-135M-Instruct%s}
stages:
  sft: {grid: {learning_rate: [1.0e-3]}}
  methods:
    dpo: {grid: {beta: [0.1], learning_rate: [1.0e-4]}}
%s"""
    key = lambda model="", training="": plan_sweep(parse_spec(hf % (model, training)))[-1].trials[0].trial_key  # noqa: E731
    assert key() == "e22a6ed2a62f0dde90b142805902a03c311743b1e085d6d51f39690b66be5b5c"
    assert key(", require_chat_template: true") == key()           # a guard, not a result
    assert key(training="training: {gradient_checkpointing: true}") == key()  # same numbers, less memory
    assert key(training="training: {padding_free: false}") == key()  # same numbers, padded rows
    assert key(training="training: {precision: bf16}") != key()
    assert key(training="training: {lora: {r: 8}}") != key()


@pytest.mark.parametrize("name", ["quickstart", "dpo", "simpo", "ln_dpo", "paper_mini", "paper/phi3_saferlhf",
                                  "paper/smollm2_hh"])
def test_the_per_section_canonical_json_is_the_whole_config_dumped_at_once(name):
    """canonical_json serialises each shared section once per plan (planning speed); it must be byte for byte
    the one-shot definition the keys were defined by, or every finished trial would run again."""
    import json

    from orchestrator.contract.trials import KEY_VERSION, key_config

    for stage in plan_sweep(load_spec(SWEEPS / f"{name}.yaml")):
        for trial in stage.trials:
            whole = json.dumps({"v": KEY_VERSION, **key_config(trial.model_dump(mode="json"))}, sort_keys=True,
                               separators=(",", ":"))
            assert trial.canonical_json() == whole
