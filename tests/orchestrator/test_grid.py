from pathlib import Path

import pytest

from orchestrator.api import builtin_spec_path
from orchestrator.core.spec import GridSpec
from orchestrator.core.spec_file import load_spec, parse_spec
from orchestrator.grid import expand_grid, plan_sweep

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


# Keys before issue 22 (commit bd4f0f9): every sample changed with the per-prompt random streams, so no trial of
# that scheme may be taken for one of this scheme.
KEYS_OF_SAMPLER_1 = {"quickstart dpo": "8c41a1772de8de3e257d86fd2ff4a4db7f44c83fd2efd31939aa839667d53e28",
                     "quickstart sft": "0e86d3a59fcb054517480dba4ec7fa2e37da6e2b6c25a3a7711584df2f770198",
                     "hf dpo": "e22a6ed2a62f0dde90b142805902a03c311743b1e085d6d51f39690b66be5b5c"}


def test_trial_keys_are_golden_and_carry_the_sampler():
    """Golden keys of evaluation.sampler_version 2, computed at issue 22: a setting added later must leave them as
    they are (at its default), so a rerun finds its finished trials. The keys of sampler 1 are gone: a store that
    holds trials of the old scheme runs them again instead of mixing both."""
    stages = {s.stage: s for s in plan_sweep(load_spec(builtin_spec_path("quickstart")))}
    keys = {"quickstart dpo": stages["dpo"].trials[0].trial_key, "quickstart sft": stages["sft"].trials[0].trial_key}
    assert keys == {"quickstart dpo": "78a6bc51662015c511aebd1fe515d8ee55f9dcd44478641702902a010a1d18db",
                    "quickstart sft": "62616abf44224f8fb3ba8b5b22aba31224f887325353b9774d2140d51e3a29bb"}
    hf = """name: t
model: {kind: hf, hub_id: HuggingFaceTB/SmolLM2-135M-Instruct%s}
stages:
  sft: {grid: {learning_rate: [1.0e-3]}}
  methods:
    dpo: {grid: {beta: [0.1], learning_rate: [1.0e-4]}}
%s"""
    key = lambda model="", training="": plan_sweep(parse_spec(hf % (model, training)))[-1].trials[0].trial_key  # noqa: E731
    keys["hf dpo"] = key()
    assert keys["hf dpo"] == "c67e8135159f167542c282c9e2841961a161fbbab8b10a3aa9a1518d8aba697c"
    assert not set(keys.values()) & set(KEYS_OF_SAMPLER_1.values())
    assert '"sampler_version":2' in plan_sweep(parse_spec(hf % ("", "")))[-1].trials[0].canonical_json()
    assert key(", require_chat_template: true") == key()           # a guard, not a result
    assert key(training="training: {gradient_checkpointing: true}") == key()  # same numbers, less memory
    assert key(training="training: {padding_free: false}") == key()  # same numbers, padded rows
    assert key(training="evaluation: {batch_size: 3, batch_tokens: 100}") == key()  # batch-invariant sampling
    assert key(training="training: {precision: bf16}") != key()
    assert key(training="training: {lora: {r: 8}}") != key()
    assert key(training="evaluation: {precision: bf16}") != key()
    assert key(training="evaluation: {max_prompt_length: 100}") != key()


@pytest.mark.parametrize("name", ["quickstart", "dpo", "simpo", "ln_dpo", "paper_mini", "paper/phi3_saferlhf",
                                  "paper/smollm2_hh"])
def test_the_per_section_canonical_json_is_the_whole_config_dumped_at_once(name):
    """canonical_json serialises each shared section once per plan (planning speed); it must be byte for byte
    the one-shot definition the keys were defined by, or every finished trial would run again."""
    import json

    from orchestrator.core.trials import KEY_VERSION, key_config

    for stage in plan_sweep(load_spec(SWEEPS / f"{name}.yaml")):
        for trial in stage.trials:
            whole = json.dumps({"v": KEY_VERSION, **key_config(trial.model_dump(mode="json"))}, sort_keys=True,
                               separators=(",", ":"))
            assert trial.canonical_json() == whole
