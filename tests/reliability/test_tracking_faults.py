"""The MLflow server killed mid-sweep. With restarts (the default) the sweep goes through: the server is started
again on the same port and MLflow's client retries each request with backoff, so no trial drops a result. With
`server_restarts: 0` the trials that cannot log fail with a clear reason, the sweep stops (it does not go on
running trials whose results cannot be kept), and a rerun completes the missing ones."""

import functools
import threading
import time

import pytest
from reliability_support import finished_trials, kill_server, server_pids

from cluster.probe import probe_trial
from orchestrator.core.spec_file import parse_spec
from orchestrator.pipeline import SweepError, run_sweep
from orchestrator.progress import QUIET, Output
from orchestrator.runtime.store import store_client
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml

RAY = "{kind: ray, num_cpus: 2, max_concurrent_trials: 2, resources_per_trial: {cpu: 1}}"
TOTAL = 2 + 3 * 2  # base, SFT, 3 methods x 2 betas
STEPS = 20


def _kill_after(db, finished: int, killed: list, deadline_s: float = 300) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if finished_trials(db) >= finished and server_pids(db):
                killed.append(kill_server(db))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _every_key_finished_once(sqlite: str, name: str) -> list:
    records = SweepTracker(sqlite, name).trials()
    finished = [r.trial_key for r in records if r.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == TOTAL, "a key is missing or has two FINISHED runs"
    assert not [r for r in records if r.status == "RUNNING"]
    return [r for r in records if r.status == "FINISHED"]


def test_a_killed_server_is_restarted_and_no_trial_loses_a_step(tmp_path, no_ray_left, capfd):
    db = tmp_path / "mlflow.db"
    sqlite = f"sqlite:///{db}"
    spec = parse_spec(noop_sweep_yaml("server-killed", tmp_path / "work", 2, 1, RAY))
    killed: list[int] = []
    watcher = _kill_after(db, 3, killed)
    trial = functools.partial(probe_trial, steps=STEPS, seconds=2.0, prompts=8)
    outcome = run_sweep(spec, sqlite, output=QUIET, trial_fn=trial)
    watcher.join(1)
    assert killed, "the server was not killed mid-sweep"
    assert outcome.failed == 0 and len(outcome.records) == TOTAL
    assert "restarted it (1 restart(s) so far)" in capfd.readouterr().err
    for record in _every_key_finished_once(sqlite, "server-killed"):
        history = store_client(sqlite).get_metric_history(record.run_id, "probe/step_value")
        assert sorted({m.step for m in history}) == list(range(1, STEPS + 1)), record.run_name


def test_without_restarts_the_sweep_stops_clearly_and_a_rerun_completes_it(tmp_path, no_ray_left, monkeypatch,
                                                                              capfd):
    db = tmp_path / "mlflow.db"
    sqlite = f"sqlite:///{db}"
    # MLflow's client retries each request with backoff (7 retries, ~4 min by default); shortened here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    spec = parse_spec(noop_sweep_yaml("server-gone", tmp_path / "work", 2, 1, RAY, restarts=0))
    killed: list[int] = []
    watcher = _kill_after(db, 3, killed)
    trial = functools.partial(probe_trial, steps=STEPS, seconds=2.0, prompts=8)
    with pytest.raises(SweepError, match="tracking store stopped answering") as info:
        run_sweep(spec, sqlite, output=QUIET, trial_fn=trial)
    watcher.join(1)
    assert killed
    assert "unreachable" in str(info.value) and "rerun the same command" in str(info.value)
    assert "is not restarted" in capfd.readouterr().err
    done_before = finished_trials(db)
    assert 3 <= done_before < TOTAL

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    messages: list[str] = []
    outcome = run_sweep(spec, sqlite, output=Output(messages.append, bar=False), trial_fn=trial)
    assert f"resuming: skipping {done_before} trials already done" in messages
    assert outcome.ran == TOTAL - done_before and outcome.failed == 0
    _every_key_finished_once(sqlite, "server-gone")


def test_a_store_lost_during_an_early_stopping_decision_stops_the_sweep_cleanly_and_the_rerun_decides(
        tmp_path, monkeypatch):
    """The decision reads the stage's rung values from the store; a store that does not answer then is the
    same as at any other moment: the sweep stops with nothing lost, the trial's run is left for the rerun."""
    import requests

    from orchestrator.runtime.trial_log import TrialLogger

    db = tmp_path / "mlflow.db"
    sqlite = f"sqlite:///{db}"
    spec = parse_spec(noop_sweep_yaml("decision-lost", tmp_path / "work", 2, 1, early_stopping=True))
    trial = functools.partial(probe_trial, steps=4, prompts=8)

    def unreachable(*args, **kwargs):
        raise RuntimeError("API request failed") from requests.exceptions.ConnectionError("refused")

    monkeypatch.setattr(TrialLogger, "rung_values", unreachable)
    with pytest.raises(SweepError, match="tracking store stopped answering"):
        run_sweep(spec, sqlite, output=QUIET, trial_fn=trial)
    before = SweepTracker(sqlite, "decision-lost").trials()
    assert sorted(r.stage for r in before if r.status == "FINISHED") == ["base", "sft"]  # nothing lost
    monkeypatch.undo()
    outcome = run_sweep(spec, sqlite, output=QUIET, trial_fn=trial)
    assert outcome.failed == 0 and outcome.ran == TOTAL - 2
    records = SweepTracker(sqlite, "decision-lost").trials()
    done = [r.trial_key for r in records if r.status in ("FINISHED", "STOPPED")]
    assert len(done) == len(set(done)) == TOTAL and not [r for r in records if r.status == "RUNNING"]
