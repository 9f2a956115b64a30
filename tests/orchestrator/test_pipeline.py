"""End to end on the built-in task (smoke-sized): spec -> trials -> train -> evaluate -> MLflow."""

import math
from pathlib import Path

import mlflow
import pytest
import torch

from orchestrator.core.runs import EVAL_PHASES, TRIAL_PHASES
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_FAILURE, TAG_LAYOUT, TAG_PARENT, TAG_REF_CACHE, TAG_WEIGHTS
from orchestrator.grid import plan_sweep, tracked_name
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.kept_models import registered_model_name
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.runtime.trial_log import TrialLogger
from trainers import losses

SPEC = """\
name: e2e
workdir: {workdir}
data: {{kind: synthetic, n_train: 256, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 5}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft:
    grid: {{learning_rate: [3.0e-3], epochs: [2]}}
  methods:
    dpo:
      grid: {{beta: [0.1, 0.5], learning_rate: [3.0e-4]}}
    simpo:
      grid: {{beta: [2.0], gamma: [0.5], learning_rate: [3.0e-4]}}
    ln_dpo:
      grid: {{beta: [1.0, 2.0], learning_rate: [3.0e-4]}}
    epsilon_dpo:
      grid: {{beta: [0.1], epsilon: [0.1], learning_rate: [3.0e-4]}}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = parse_spec(SPEC.format(workdir=root / "work"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, smoke=True, output=QUIET)
    return spec, uri, outcome


def test_every_trial_finished_with_metrics_in_range(sweep):
    spec, uri, outcome = sweep
    assert outcome.ran == 8 and outcome.failed == 0 and outcome.skipped == 0
    records = SweepTracker(uri, tracked_name(spec, smoke=True)).trials()
    by_stage = {}
    for r in records:
        by_stage.setdefault(r.stage, []).append(r)
    assert {k: len(v) for k, v in by_stage.items()} == {"base": 1, "sft": 1, "dpo": 2, "simpo": 1, "ln_dpo": 2,
                                                       "epsilon_dpo": 1}
    for r in records:
        assert r.status == "FINISHED"
        m = r.metrics
        assert 0 <= m["win_vs_chosen"] <= 1 and m["length"] > 0 and math.isfinite(m["mean_score"])
        if r.stage in ("dpo", "simpo", "ln_dpo", "epsilon_dpo"):
            assert 0 <= m["win_vs_sft"] <= 1 and math.isfinite(m["kl"])
            assert r.params["beta"] in ("0.1", "0.5", "1.0", "2.0", "0.1") and r.tags["posweep.init_trial_key"]
            assert r.tags[TAG_PARENT]  # a child of its stage run


def test_trials_say_how_their_rows_were_laid_out_and_where_their_time_went(sweep):
    spec, uri, _ = sweep
    for r in SweepTracker(uri, tracked_name(spec, smoke=True)).trials():
        m = r.metrics
        phases = ["load", "eval", "generate", "reward"] + (["reference", "train"] if r.stage != "base" else []) + (
            ["kl"] if r.stage not in ("base", "sft") else [])
        assert all(m[f"time_{p}_s"] > 0 for p in phases), r.stage
        assert sum(m.get(p, 0.0) for p in TRIAL_PHASES) <= m["wall_seconds"]
        assert sum(m.get(p, 0.0) for p in EVAL_PHASES) <= m["time_eval_s"]
        assert m["generated_tokens"] > 0 and m["generated_tokens_per_s"] > 0
        if r.stage == "sft":
            assert m["time_checkpoint_s"] > 0
        if r.stage == "base":
            assert TAG_LAYOUT not in r.tags  # nothing trained
        else:
            assert r.tags[TAG_LAYOUT] == ("packed rows, prompt shared by a pair's responses; chunked log-probs at "
                                          "the scored positions")


def test_reference_log_probs_are_computed_once_per_sweep(sweep):
    spec, uri, _ = sweep
    tracker = SweepTracker(uri, tracked_name(spec, smoke=True))
    reference_based = tracker.trials("dpo") + tracker.trials("ln_dpo")
    assert sorted(r.tags[TAG_REF_CACHE] for r in reference_based) == ["hit", "hit", "hit", "miss"]
    assert all(TAG_REF_CACHE not in r.tags for r in tracker.trials("simpo"))  # reference-free
    assert tracker.trials("epsilon_dpo")[0].tags[TAG_REF_CACHE].startswith("not used")


def test_chosen_scores_come_from_the_sft_trial(sweep):
    spec, uri, _ = sweep
    tracker = SweepTracker(uri, tracked_name(spec, smoke=True))
    sft = {s["prompt_id"]: s for s in tracker.load_samples(tracker.trials("sft")[0].run_id)}
    dpo = tracker.load_samples(tracker.trials("dpo")[0].run_id)
    assert all(s["chosen_score"] == sft[s["prompt_id"]]["chosen_score"] for s in dpo)
    assert all(s["sft_score"] == sft[s["prompt_id"]]["score"] for s in dpo)


def test_training_curves_and_samples_are_logged(sweep):
    spec, uri, _ = sweep
    client = mlflow.tracking.MlflowClient(uri)
    tracker = SweepTracker(uri, tracked_name(spec, smoke=True))
    dpo = tracker.trials("dpo")[0]
    curve = client.get_metric_history(dpo.run_id, "train/loss")
    assert len(curve) >= 2 and [m.step for m in curve] == sorted(m.step for m in curve)
    for name in ("train/reward_margin", "train/reward_accuracy"):
        assert client.get_metric_history(dpo.run_id, name)
    samples = tracker.load_samples(dpo.run_id)
    assert len(samples) == 16 and {"prompt_id", "generation", "score", "sft_score", "chosen_score", "kl",
                                   "length"} <= set(samples[0])
    assert all(isinstance(s["generation"], str) and s["length"] >= 0 for s in samples)


def test_rerun_skips_finished_trials(sweep):
    spec, uri, _ = sweep
    again = run_sweep(spec, uri, smoke=True, output=QUIET)
    assert again.ran == 0 and again.skipped == 8
    keys = [r.trial_key for r in SweepTracker(uri, tracked_name(spec, smoke=True)).trials() if r.status == "FINISHED"]
    assert len(keys) == len(set(keys)) == 8


def test_summary_has_baseline_sft_and_every_method(sweep):
    _, _, outcome = sweep
    summary = outcome.summary
    assert list(summary["stage"]) == ["base", "sft", "dpo", "simpo", "ln_dpo", "epsilon_dpo"]
    assert (summary["finished"] >= 1).all() and (summary["failed"] == 0).all()


def test_diverging_trial_fails_cleanly_and_sweep_goes_on(tmp_path, monkeypatch):
    """Bug guard: a NaN loss must mark the trial FAILED with its reason, not crash the sweep."""
    real_dpo = losses.dpo_loss

    def nan_loss(*args, **kwargs):
        losses_, c, r = real_dpo(*args, **kwargs)
        return losses_ * torch.tensor(float("nan")), c, r

    monkeypatch.setattr(losses, "dpo_loss", nan_loss)  # the method catalogue's loss for dpo
    spec = parse_spec(SPEC.format(workdir=tmp_path / "work"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, smoke=True, output=QUIET)
    assert outcome.failed == 2 and outcome.ran == 8
    records = SweepTracker(uri, tracked_name(spec, smoke=True)).trials()
    failed = [r for r in records if r.status == "FAILED"]
    assert {r.stage for r in failed} == {"dpo"}
    assert all("non-finite loss" in r.tags[TAG_FAILURE] and "step 1" in r.tags[TAG_FAILURE] for r in failed)
    assert all(r.status == "FINISHED" for r in records if r.stage != "dpo")
    summary = outcome.summary.set_index("stage")
    assert summary.loc["dpo", "failed"] == 2 and summary.loc["dpo", "finished"] == 0

    monkeypatch.setattr(losses, "dpo_loss", real_dpo)  # fixed: a rerun runs only what failed
    rerun = run_sweep(spec, uri, smoke=True, output=QUIET)
    assert rerun.ran == 2 and rerun.skipped == 6 and rerun.failed == 0


def test_stale_running_run_is_closed_as_killed(tmp_path):
    spec = parse_spec(SPEC.format(workdir=tmp_path / "work"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, tracked_name(spec, smoke=True))
    base_trial = plan_sweep(spec, smoke=True)[0].trials[0]
    stale = TrialLogger(uri, tracker.experiment_id, tracker.stage_run("base"))
    stale.start("left over", {"posweep.trial_key": base_trial.trial_key, "posweep.stage": "base"}, {})
    run_sweep(spec, uri, smoke=True, output=QUIET)
    statuses = sorted(r.status for r in tracker.trials("base"))
    assert statuses == ["FINISHED", "KILLED"]


def test_shared_work_changes_nothing_but_time(sweep, tmp_path):
    """With sharing off every preference trial recomputes its reference log-probs and SFT baseline; the
    results must be the same as with the shared ones."""
    spec, uri, _ = sweep
    alone = parse_spec(SPEC.format(workdir=tmp_path / "work"))
    alone_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_sweep(alone, alone_uri, smoke=True, output=QUIET, share_work=False)
    shared = {r.trial_key: r for r in SweepTracker(uri, tracked_name(spec, smoke=True)).trials()}
    for record in SweepTracker(alone_uri, tracked_name(spec, smoke=True)).trials():
        if record.stage in ("dpo", "ln_dpo", "simpo"):
            assert record.tags.get(TAG_REF_CACHE, "off") == "off"
            for metric in ("mean_score", "win_vs_chosen", "win_vs_sft", "kl", "length"):
                assert record.metrics[metric] == pytest.approx(shared[record.trial_key].metrics[metric], abs=1e-5)


def test_each_method_keeps_and_registers_only_its_best_model_and_it_loads(sweep, tmp_path, monkeypatch):
    """checkpoints.keep best_per_method (the default): the registry's `best` alias of SWEEP-METHOD is the method's
    best run by mean_score, its weights load with transformers, and no other preference weights are on disk."""
    from transformers import AutoModelForCausalLM

    spec, uri, outcome = sweep
    name = tracked_name(spec, smoke=True)
    tracker = SweepTracker(uri, name)
    client = mlflow.tracking.MlflowClient(uri)
    for method in ("dpo", "simpo", "ln_dpo", "epsilon_dpo"):
        runs = tracker.trials(method)
        best = max(runs, key=lambda r: (r.metrics["mean_score"], r.trial_key))
        version = client.get_model_version_by_alias(registered_model_name(name, method), "best")
        assert version.run_id == best.run_id and outcome.models[registered_model_name(name, method)] == str(version.version)
        assert len(client.search_model_versions(f"name = '{registered_model_name(name, method)}'")) == 1
        assert best.tags[TAG_WEIGHTS] == "logged"
        for other in runs:
            kept = [a.path for a in client.list_artifacts(other.run_id)]
            assert ("model" in kept) == (other.run_id == best.run_id), (method, other.run_name)
            if other.run_id != best.run_id:
                assert other.tags[TAG_WEIGHTS].startswith("deleted: run ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as docs/spec.md loads it (mlflow.set_tracking_uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{registered_model_name(name, 'dpo')}@best",
                                                 dst_path=str(tmp_path / "dpo"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 0
    workdir = Path(spec.workdir)
    assert not list(workdir.glob("trials/*/weights"))  # uploads leave no local copy
    checkpoints = {p.parent.name for p in workdir.glob("trials/*/checkpoint")}
    sft_key = tracker.trials("sft")[0].trial_key[:16]
    assert checkpoints == {sft_key}  # the SFT checkpoint the preference stages started from, as before


def test_every_trial_run_carries_system_metrics(sweep):
    spec, uri, _ = sweep
    for r in SweepTracker(uri, tracked_name(spec, smoke=True)).trials():
        assert 0 <= r.metrics["system/cpu_utilization_percentage"] <= 100, r.run_name
        assert r.metrics["system/system_memory_usage_megabytes"] > 0


def test_a_smoke_run_is_tracked_apart_from_the_full_sweep(sweep):
    spec, uri, _ = sweep
    client = mlflow.tracking.MlflowClient(uri)
    assert client.get_experiment_by_name(spec.name) is None
    experiment = client.get_experiment_by_name(f"{spec.name}-smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_early_stopping_sweep_skips_its_stopped_trials_until_early_stopping_is_turned_off(tmp_path):
    """Probe trials report probe_score at their rung; in the shuffled start order some are below the cutoff and
    stop. A rerun runs nothing; the same grid without early stopping runs exactly the stopped ones, to the end."""
    import functools

    from cluster.probe import probe_trial
    from trainers.probe import noop_sweep_yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = functools.partial(noop_sweep_yaml, "asha-rerun", tmp_path / "work", n_beta=4, n_lr=3)
    trial_fn = functools.partial(probe_trial, steps=4, prompts=16)
    asha = parse_spec(sweep(early_stopping=True))
    first = run_sweep(asha, uri, output=QUIET, trial_fn=trial_fn)
    records = SweepTracker(uri, "asha-rerun").trials()
    stopped = {r.trial_key for r in records if r.status == "STOPPED"}
    assert first.stopped == len(stopped) > 0 and first.failed == 0
    assert {r.stage for r in records if r.status == "STOPPED"} <= {"dpo", "simpo", "ln_dpo"}  # never SFT
    assert first.summary["stopped"].sum() == len(stopped)

    again = run_sweep(asha, uri, output=QUIET, trial_fn=trial_fn)
    assert (again.ran, again.skipped) == (0, first.ran)

    plain = run_sweep(parse_spec(sweep()), uri, output=QUIET, trial_fn=trial_fn)
    assert plain.ran == len(stopped) and plain.stopped == 0
    records = SweepTracker(uri, "asha-rerun").trials()
    assert {r.trial_key for r in records if r.status == "FINISHED"} >= stopped
