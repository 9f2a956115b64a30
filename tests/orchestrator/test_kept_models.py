"""The kept-models policy (orchestrator.runtime.kept_models): the pure decision on hand-built runs, then the
MLflow side (artifacts, registry, idempotence) on a local store without training anything."""

import mlflow
import pytest

from orchestrator.core.runs import TrialRecord
from orchestrator.core.tags import TAG_WEIGHTS
from orchestrator.runtime.kept_models import decide, keep_models, registered_model_name
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.runtime.trial_log import TrialLogger


def record(run_id, status, score, key=None, weights="logged"):
    return TrialRecord(run_id=run_id, run_name=run_id, trial_key=key or f"key-{run_id}", stage="dpo", method="dpo",
                       status=status, params={}, metrics={} if score is None else {"mean_score": score},
                       tags={TAG_WEIGHTS: weights})


def test_best_per_method_keeps_the_best_finished_run_only():
    runs = [record("a", "FINISHED", 0.5), record("b", "FINISHED", 0.9), record("c", "KILLED", 2.0),
            record("d", "RUNNING", 3.0), record("e", "FAILED", None)]
    decision = decide(runs, "best_per_method")
    assert decision.best.run_id == "b"  # KILLED and RUNNING runs never count, whatever their score
    assert sorted(r.run_id for r in decision.delete) == ["a", "c", "e"]  # never a RUNNING run's (still writing)


def test_weights_of_an_upload_that_died_are_deleted_and_never_registered():
    runs = [record("a", "FINISHED", 0.5), record("b", "KILLED", 9.0, weights="uploading"),
            record("c", "RUNNING", 9.0, weights="uploading")]
    for keep in ("best_per_method", "all"):
        decision = decide(runs, keep)
        assert decision.best.run_id == "a" and [r.run_id for r in decision.delete] == ["b"]


def test_all_keeps_every_finished_run_and_drops_those_that_did_not_finish():
    runs = [record("a", "FINISHED", 0.5), record("b", "FINISHED", 0.9), record("c", "KILLED", 2.0)]
    decision = decide(runs, "all")
    assert decision.best.run_id == "b" and [r.run_id for r in decision.delete] == ["c"]


def test_ties_and_missing_scores_give_the_same_pick_every_time():
    tied = [record("x", "FINISHED", 1.0, key="k2"), record("y", "FINISHED", 1.0, key="k1"),
            record("z", "FINISHED", float("nan"))]
    # one rule for every "best" (runs.best_first): equal scores, the smaller trial key
    assert decide(tied, "best_per_method").best.run_id == "y"
    assert decide(list(reversed(tied)), "best_per_method").best.run_id == "y"
    assert decide([], "best_per_method") == decide([], "all")
    with pytest.raises(ValueError, match="unknown checkpoints.keep 'best'"):
        decide(tied, "best")


def _finished_run_with_weights(tracker, parent, tmp_path, name, score):
    logger = TrialLogger(tracker.uri, tracker.experiment_id, parent)
    logger.start(name, {"posweep.trial_key": f"key-{name}", "posweep.stage": "dpo", "posweep.method": "dpo"}, {})
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    logger.log_weights(folder)
    logger.log_metrics({"mean_score": score})
    logger.finish("FINISHED")
    return logger.run_id


def test_a_better_run_takes_the_alias_and_the_old_weights_go_and_a_repeat_changes_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "kept")
    parent = tracker.stage_run("dpo")
    client = mlflow.tracking.MlflowClient(uri)
    name = registered_model_name("kept", "dpo")
    first = _finished_run_with_weights(tracker, parent, tmp_path, "first", 1.0)
    assert keep_models(uri, "kept", "dpo", "best_per_method", True, tmp_path / "work") == "1"
    second = _finished_run_with_weights(tracker, parent, tmp_path, "second", 2.0)
    assert keep_models(uri, "kept", "dpo", "best_per_method", True, tmp_path / "work") == "2"
    assert client.get_model_version_by_alias(name, "best").run_id == second
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    assert [a.path for a in client.list_artifacts(first)] == []
    assert client.get_run(first).data.tags[TAG_WEIGHTS].startswith(f"deleted: run {second}")
    assert [a.path for a in client.list_artifacts(second, "model")] == ["model/config.json"]
    # a second pass (the driver's, after the trials') finds nothing to do
    assert keep_models(uri, "kept", "dpo", "best_per_method", True, tmp_path / "work") == "2"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    # a worse run later: registered nothing new, its weights go at once
    third = _finished_run_with_weights(tracker, parent, tmp_path, "third", 0.5)
    assert keep_models(uri, "kept", "dpo", "best_per_method", True, tmp_path / "work") == "2"
    assert [a.path for a in client.list_artifacts(third)] == []


def test_without_registration_the_weights_are_still_pruned(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "unregistered")
    parent = tracker.stage_run("dpo")
    low = _finished_run_with_weights(tracker, parent, tmp_path, "low", 0.1)
    _finished_run_with_weights(tracker, parent, tmp_path, "high", 0.2)
    assert keep_models(uri, "unregistered", "dpo", "best_per_method", False, tmp_path / "work") is None
    client = mlflow.tracking.MlflowClient(uri)
    assert client.search_registered_models() == [] and client.list_artifacts(low) == []
