"""Resume is ours, keyed by trial_key: SIGKILL the driver mid-sweep, rerun the same command, and only the
unfinished trials run; no key ends with two FINISHED runs; the dead attempt's RUNNING run is closed KILLED."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from local_postgres import tracking_store
from reliability_support import finished_trials

from orchestrator.core.spec_file import load_spec
from orchestrator.grid import plan_sweep
from orchestrator.runtime.kept_models import registered_model_name
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.search import study_name, study_storage

SPEC = """\
name: resume-{kind}
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 5}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.3, 0.5], learning_rate: [3.0e-4]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5, 1.0], learning_rate: [3.0e-4]}}}}
executor: {executor}
"""
EXECUTORS = {"local": "{kind: local}", "ray": "{kind: ray, num_cpus: 2, max_concurrent_trials: 2}"}
TOTAL = 7  # untrained + 1 SFT + 3 DPO + 2 SimPO


def kill_the_driver_after(tmp_path, spec_text: str, ended: int, uri: str = "", running: int = 0) -> list[str]:
    """Start `sweep run` on the spec in a subprocess (tracking `uri`, default TMP/mlflow.db), SIGKILL it once
    `ended` trial runs have ended (MLflow status FINISHED: finished or stopped early) and `running` are RUNNING,
    and return the command (to rerun it)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = uri if uri.startswith("postgresql://") else tmp_path / "mlflow.db"
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--no-progress", "--tracking-uri", uri]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while (finished_trials(store) < ended or finished_trials(store, "RUNNING") < running) \
            and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep ended before it could be killed:\n" + driver.stdout.read()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    return command


@pytest.mark.parametrize("kind,store", [("local", "sqlite"), ("ray", "sqlite"), ("ray", "postgresql")])
def test_sigkill_the_driver_then_rerun_finishes_only_the_rest(tmp_path, kind, store, request):
    """With a PostgreSQL store the sweep's server serves the database; the same guarantees hold."""
    uri = tracking_store(store, tmp_path, request)
    command = kill_the_driver_after(tmp_path, SPEC.format(kind=kind, workdir=tmp_path / "work",
                                                          executor=EXECUTORS[kind]), 3, uri)
    time.sleep(2)  # the dying driver's helpers (Ray, the MLflow server) go down with it
    done_before = finished_trials(uri if store == "postgresql" else tmp_path / "mlflow.db")
    assert 3 <= done_before < TOTAL

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: skipping {done_before} trials already done" in rerun.stdout
    assert f"{TOTAL - done_before} trials run, {done_before} skipped" in rerun.stdout

    records = SweepTracker(uri, f"resume-{kind}").trials()
    finished = [r.trial_key for r in records if r.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == TOTAL  # every key once, none twice
    assert not [r for r in records if r.status == "RUNNING"]
    assert {r.status for r in records} <= {"FINISHED", "KILLED"}
    assert_only_the_best_models_kept(uri, f"resume-{kind}", records, tmp_path / "work")


def assert_only_the_best_models_kept(uri, sweep, records, workdir):
    """After a kill anywhere (mid-upload, mid-registration) and a rerun: each method's best FINISHED run holds
    the only kept weights and the registry's `best` alias; no other run holds any, nor does the workdir."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    for method in ("dpo", "simpo"):
        runs = [r for r in records if r.stage == method]
        best = max((r for r in runs if r.status == "FINISHED"), key=lambda r: (r.metrics["mean_score"], r.trial_key))
        version = client.get_model_version_by_alias(registered_model_name(sweep, method), "best")
        assert version.run_id == best.run_id
        assert [str(v.version) for v in client.search_model_versions(f"name = '{registered_model_name(sweep, method)}'")] \
            == [str(version.version)]
        holding = [r.run_id for r in runs if any(a.path == "model" for a in client.list_artifacts(r.run_id))]
        assert holding == [best.run_id], method
    assert not list(workdir.glob("trials/*/weights"))


ASHA_SPEC = """\
name: resume-asha
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 5}}
evaluation: {{num_prompts: 16, max_new_tokens: 16, rungs: [0.5], rung_prompts: 8}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.01, 0.1, 0.3, 0.5], learning_rate: [3.0e-5, 3.0e-3]}}}}
search: {{kind: grid, early_stopping: {{kind: asha, min_peers: 1}}}}
"""


def test_sigkill_an_early_stopping_sweep_then_rerun_neither_duplicates_nor_resumes_a_stopped_trial(tmp_path):
    db = tmp_path / "mlflow.db"
    command = kill_the_driver_after(tmp_path, ASHA_SPEC.format(workdir=tmp_path / "work"), 6)
    before = {r.trial_key: r for r in SweepTracker(f"sqlite:///{db}", "resume-asha").trials()
              if r.status in ("FINISHED", "STOPPED")}
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: skipping {len(before)} trials already done" in rerun.stdout
    records = SweepTracker(f"sqlite:///{db}", "resume-asha").trials()
    done = [r.trial_key for r in records if r.status in ("FINISHED", "STOPPED")]
    assert len(done) == len(set(done)) == 10  # untrained + SFT + 8 DPO, each once
    stopped = [r for r in records if r.status == "STOPPED"]
    assert stopped, "no trial was stopped: the test sweep no longer exercises early stopping"
    assert not [r for r in records if r.status == "RUNNING"]
    for record in stopped:  # a trial stopped before the kill was neither run again nor resumed
        if record.trial_key in before:
            assert [r.run_id for r in records if r.trial_key == record.trial_key] == [record.run_id]
            assert record.end_time == before[record.trial_key].end_time


SEARCH_SPEC = """\
name: resume-search
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 5}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo:
      grid: {{epochs: [1]}}
      space: {{learning_rate: {{low: 1.0e-5, high: 1.0e-3, log: true}}, beta: {{low: 0.05, high: 0.5}}}}
search: {{kind: optuna, n_trials: 8, sampler: tpe, seed: 0}}
executor: {{kind: local, workers: 2}}
"""


def test_sigkill_the_driver_mid_asynchronous_search_then_rerun_runs_each_asked_point_once(tmp_path):
    """A searched stage on 2 local workers, the driver SIGKILLed once 5 trial runs ended (3 of the search's) and one
    is in flight: the rerun replays the ended ones into the study, runs the interrupted points again first (their
    dead runs closed KILLED) and asks only the rest of the budget; every point that ran ended once, the budget is met
    exactly, and the journal's study holds one COMPLETE trial per MLflow run of the stage."""
    db = tmp_path / "mlflow.db"
    command = kill_the_driver_after(tmp_path, SEARCH_SPEC.format(workdir=tmp_path / "work"), 5, running=1)
    time.sleep(2)
    at_kill = SweepTracker(f"sqlite:///{db}", "resume-search").trials("dpo")
    before = [r for r in at_kill if r.status == "FINISHED"]
    interrupted = {r.trial_key for r in at_kill if r.status == "RUNNING"}
    assert interrupted, "no trial was in flight at the kill: the test no longer exercises an interrupted point"
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"stage dpo: {len(interrupted)} point(s) whose trials were running when the last driver stopped run " \
           "again first" in rerun.stdout
    records = SweepTracker(f"sqlite:///{db}", "resume-search").trials("dpo")
    finished = [r.trial_key for r in records if r.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 8  # the budget, each point once
    assert {r.trial_key for r in before} | interrupted <= set(finished)  # an interrupted point ran again
    assert not [r for r in records if r.status == "RUNNING"]
    assert {r.status for r in records} <= {"FINISHED", "KILLED"}  # attempts in flight at the kill: closed KILLED

    stage = plan_sweep(load_spec(tmp_path / "spec.yaml"))[-1]
    study = optuna.load_study(study_name=study_name("resume-search", "dpo", stage.stage_key),
                              storage=study_storage(tmp_path / "work"))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["posweep_trial_key"] for t in complete) == sorted(finished)
