"""Bad specs: one clear line naming file, line, field path and what is allowed; nothing starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.spec_file import SpecError, load_spec, parse_spec
from trainers.preflight import InputError, preflight

GOOD = """\
name: t
stages:
  sft:
    grid: {learning_rate: [1.0e-3]}
  methods:
    dpo:
      grid:
        beta: [0.1, 0.5]
        learning_rate: [1.0e-4]
"""


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.yaml")
    return info.value


def input_error_of(text: str) -> InputError:
    """A spec that loads (the schema reads no file) but whose inputs preflight refuses (`sweep run`/`plan`)."""
    with pytest.raises(InputError) as info:
        preflight(parse_spec(text, "s.yaml"))
    return info.value


def test_good_spec_uses_defaults():
    spec = parse_spec(GOOD)
    assert spec.evaluation.temperature == 0.7 and spec.evaluation.top_p == 0.95
    assert spec.model.kind == "tiny" and spec.executor.kind == "local"


def test_unknown_top_level_key_lists_allowed():
    err = error_of(GOOD + "trianing: {}\n")
    assert err.path == "trianing" and err.line == 10
    assert "unknown field 'trianing'" in err.message and "training" in err.message


def test_unknown_nested_key_names_full_path():
    err = error_of(GOOD + "training: {batch_sise: 4}\n")
    assert err.path == "training.batch_sise" and "batch_size" in err.message and err.line == 10


def test_wrong_type():
    err = error_of(GOOD + "training: {batch_size: many}\n")
    assert err.path == "training.batch_size" and "integer" in err.message and "'many'" in err.message


def test_empty_grid_list():
    err = error_of(GOOD.replace("beta: [0.1, 0.5]", "beta: []"))
    assert "stages.methods.dpo.grid" in err.path and "empty list" in err.message


def test_unknown_method_suggests():
    err = error_of(GOOD.replace("    dpo:", "    dp0:"))
    assert err.path == "stages.methods.dp0" and "did you mean 'dpo'" in err.message and err.line == 6


def test_negative_beta_names_index_and_line():
    err = error_of(GOOD.replace("beta: [0.1, 0.5]", "beta: [0.1, -0.5]"))
    assert err.path == "stages.methods.dpo.grid.beta[1]" and "greater than 0" in err.message
    assert "-0.5" in err.message and err.line == 8


def test_unknown_hyperparameter_for_method():
    err = error_of(GOOD.replace("beta: [0.1, 0.5]", "gamma: [0.5]"))
    assert "unknown hyperparameter for dpo 'gamma'" in err.message


def test_missing_required_hyperparameter():
    err = error_of(GOOD.replace("        beta: [0.1, 0.5]\n", ""))
    assert "dpo needs 'beta'" in err.message


def test_missing_reward_folder():
    err = input_error_of(GOOD + "reward: {kind: hf, path: /no/such/reward}\n")
    assert err.field == "reward.path" and "no such folder" in err.message


def test_missing_model_and_data_paths_name_their_field():
    err = input_error_of(GOOD + "model: {kind: hf, path: /no/such/model}\n")
    assert err.field == "model.path" and "no such folder" in err.message
    err = input_error_of(GOOD + "data: {kind: hh_rlhf, path: /no/such.jsonl}\n")
    assert err.field == "data.path" and "no such file" in err.message


def test_a_spec_loads_on_a_machine_without_its_files():
    """Loading is pure: `sweep report` and `sweep status` read a spec whose model, data and reward live on the
    cluster; only `run` and `plan` check the files (preflight)."""
    spec = parse_spec(GOOD + "model: {kind: hf, path: /elsewhere/model, gguf_file: m.gguf}\n"
                             "data: {kind: generic, path: /elsewhere/pairs.jsonl, columns: {prompt: q}}\n"
                             "reward: {kind: hf, path: /elsewhere/reward}\n", "s.yaml")
    assert spec.model.path == "/elsewhere/model" and spec.data.columns.prompt == "q"


def test_wrong_executor_kind():
    err = error_of(GOOD + "executor: {kind: rey}\n")
    assert err.path == "executor" and err.message == "unknown kind 'rey'; allowed: local, ray, slurm"


def test_yaml_syntax_error_has_line():
    err = error_of("name: t\nstages: {sft: [\n")
    assert "invalid YAML" in err.message and err.line is not None


def test_zip_lengths_must_match():
    err = error_of(GOOD.replace("grid:\n        beta: [0.1, 0.5]", "zip:\n        beta: [0.1, 0.5]\n"
                                "        learning_rate: [1.0e-4]\n      grid:\n        epochs: [1]")
                   .replace("        learning_rate: [1.0e-4]\n\n", ""))
    assert "equal lengths" in err.message


def test_duplicate_grid_values_and_zip_rows():
    err = error_of(GOOD.replace("beta: [0.1, 0.5]", "beta: [0.1, 0.1]"))
    assert "duplicate values 0.1" in err.message
    err = error_of(GOOD.replace("grid:\n        beta: [0.1, 0.5]", "zip:\n        beta: [0.1, 0.1]\n      grid:"))
    assert "duplicate rows" in err.message


def test_missing_spec_file():
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec("/no/such/spec.yaml")


@pytest.mark.parametrize("edit", [
    lambda t: t + "bogus: 1\n",
    lambda t: t.replace("beta: [0.1, 0.5]", "beta: [-1]"),
    lambda t: t.replace("    dpo:", "    dpoo:"),
])
def test_cli_exit_2_one_line_no_traceback_no_tracking(tmp_path: Path, edit):
    spec = tmp_path / "bad.yaml"
    spec.write_text(edit(GOOD))
    for command in ("run", "plan"):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, str(spec)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {spec}:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("extra, message", [
    ("search: {kind: grid, early_stopping: {kind: asha}}\n", "needs evaluation.rungs"),
    ("evaluation: {rungs: [0.5]}\nsearch: {kind: grid, early_stopping: {kind: asha, min_rung: 2}}\n",
     "min_rung 2 is past the last of the 1 evaluation rungs"),
    ("evaluation: {rungs: [0.5, 0.2]}\n", "rungs must increase"),
    ("evaluation: {rungs: [0.5, 1.0]}\n", "strictly between 0 and 1"),
    ("evaluation: {rungs: [0.5], num_prompts: 8}\n", "rung_prompts (16) exceeds evaluation.num_prompts (8)"),
    ("evaluation: {rungs: [0.5], rung_every: 10}\n", "got rungs and rung_every"),
    ("evaluation: {rung_steps: [36, 12]}\n", "rung_steps must be positive and increase"),
    ("evaluation: {rung_steps: [12]}\nsearch: {kind: grid, early_stopping: {kind: asha, min_rung: 2}}\n",
     "min_rung 2 is past the last of the 1 evaluation rungs"),
    ("evaluation: {rung_every: 0}\n", "rung_every"),
    ("evaluation: {rungs: [0.5]}\nexecutor: {kind: local, processes_per_trial: 2}\ntraining: {batch_size: 32}\n",
     "cannot be combined with executor.processes_per_trial"),
    ("evaluation: {rungs: [0.5]}\nsearch: {kind: grid, early_stopping: {kind: asha, reduction_factor: 1}}\n",
     "reduction_factor"),
    ("evaluation: {rungs: [0.5]}\nsearch: {kind: grid, early_stopping: {kind: asha, metric: mean_score}}\n",
     "rung/mean_score"),
])
def test_early_stopping_settings_are_checked(extra, message):
    assert message in str(error_of(GOOD + extra))


def test_rung_settings_leave_the_trial_keys_as_they_are():
    """A trial run to its end under early stopping is the grid's trial: rungs do not change its result
    (tests/trainers/test_rungs.py), so they are not part of its key."""
    from orchestrator.grid import plan_sweep

    keys = lambda text: [t.trial_key for s in plan_sweep(parse_spec(text)) for t in s.trials]  # noqa: E731
    stopping = "evaluation: {rungs: [0.2, 0.5], rung_prompts: 8}\nsearch: {kind: grid, early_stopping: {kind: asha}}\n"
    assert keys(GOOD + stopping) == keys(GOOD)


def test_an_override_changes_the_spec_and_its_trial_keys_and_names_itself_when_wrong():
    from orchestrator import api
    from orchestrator.grid import plan_sweep

    base = api.load("quickstart")
    changed = api.load("quickstart", overrides=["training.batch_size=8", "evaluation.num_prompts=32"])
    assert (changed.training.batch_size, changed.evaluation.num_prompts) == (8, 32)
    assert api.load(base, overrides=["training.batch_size=8"]) == changed.model_copy(
        update={"evaluation": base.evaluation})  # a loaded spec takes overrides too
    keys = lambda spec: {t.trial_key for s in plan_sweep(spec) for t in s.trials}  # noqa: E731
    assert keys(changed).isdisjoint(keys(base))
    with pytest.raises(SpecError, match=r"^--set data\.kind=nope: data"):
        api.load("quickstart", overrides=["data.kind=nope"])
    only = api.load("quickstart", only=["simpo"])
    assert list(only.stages.methods) == ["simpo"] and only.stages.sft == base.stages.sft


@pytest.mark.parametrize("executor, shared", [
    ("{kind: local}", True), ("{kind: slurm}", True), ("{kind: ray}", False),
    ("{kind: ray, shared_workdir: true}", True),
    ("{kind: ray, processes_per_trial: 2, ranks: ray_train}", True),  # Ray Train's ranks need a shared folder
])
def test_where_a_sweep_keeps_its_files_by_default(executor, shared):
    assert parse_spec(GOOD + f"executor: {executor}\n").executor.shares_workdir is shared


@pytest.mark.parametrize("executor, message", [
    ("{kind: local, shared_workdir: false}", "the local executor runs every trial on the driver's machine"),
    ("{kind: slurm, shared_workdir: false}", "submitit hands every job its task"),
    ("{kind: ray, shared_workdir: false, processes_per_trial: 2, ranks: ray_train}", "it needs shared_workdir: true"),
])
def test_a_workdir_that_must_be_shared_cannot_be_declared_unshared(executor, message):
    assert message in error_of(GOOD + f"executor: {executor}\n").message
