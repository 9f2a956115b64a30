"""Optuna search stages: spec validation, asynchronous asks as slots free, resume by replay, and a real sweep with
a searched stage."""

import math

import pytest

from orchestrator.core.runs import TrialRecord
from orchestrator.core.spec_file import SpecError, parse_spec
from orchestrator.core.task import TrialResult
from orchestrator.grid import plan_sweep
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.search import run_search
from trainers.probe import probe_score

SPEC = """\
name: searched
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo:
      grid: {{epochs: [1]}}
      space:
        learning_rate: {{low: 1.0e-5, high: 1.0e-3, log: true}}
        beta: {{low: 0.05, high: 0.5}}
search: {{kind: optuna, n_trials: {n}, sampler: {sampler}, seed: 0}}
"""


def spec_for(tmp_path, n=6, sampler="tpe"):
    return parse_spec(SPEC.format(workdir=tmp_path / "work", n=n, sampler=sampler))


def scored(trial, i):
    return TrialResult(trial_key=trial.trial_key, run_id=None, status="FINISHED",
                       metrics={"mean_score": probe_score(trial.hparams)})


def fake_drive(log, slots=1, result=scored, duration=lambda trial, i: 1.0):
    """An executor of `slots` on a simulated clock, training nothing: asks for a trial whenever a slot is free,
    ends the one due first (`duration(trial, i)` after its start) and hands back `result(trial, i)` (i: the order it
    was asked in). `log` gets ("ask", hparams) and ("end", hparams) in the order they happen."""
    def drive(next_trial, on_result):
        now, running, more, asked = 0.0, [], True, 0
        while True:
            while more and len(running) < slots:
                trial = next_trial()
                if trial is None:
                    more = False
                else:
                    log.append(("ask", trial.hparams))
                    running.append((now + duration(trial, asked), asked, trial))
                    asked += 1
            if not running:
                return
            running.sort(key=lambda r: (r[0], r[1]))
            now, i, trial = running.pop(0)
            log.append(("end", trial.hparams))
            on_result(result(trial, i))
    return drive


def asked(log):
    return [hparams for event, hparams in log if event == "ask"]


def test_plan_has_a_searched_stage_with_its_budget(tmp_path):
    dpo = plan_sweep(spec_for(tmp_path))[-1]
    assert dpo.search is not None and dpo.trials == [] and dpo.size == 6
    assert plan_sweep(spec_for(tmp_path), smoke=True)[-1].size == 2
    # the budget is not part of the stage's identity: raising it continues the same search
    assert plan_sweep(spec_for(tmp_path, n=6))[-1].stage_key == plan_sweep(spec_for(tmp_path, n=9))[-1].stage_key


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_points_stay_in_their_ranges_fill_the_slots_and_repeat_with_the_seed(tmp_path, sampler):
    search = plan_sweep(spec_for(tmp_path, n=5, sampler=sampler))[-1].search
    log, again = [], []
    run_search(search, [], fake_drive(log, slots=2))
    run_search(search, [], fake_drive(again, slots=2))
    assert [event for event, _ in log] == ["ask", "ask", "end", "ask", "end", "ask", "end", "ask", "end", "end"]
    points = asked(log)
    assert len(points) == 5 and len({tuple(sorted(p.items())) for p in points}) == 5
    assert all(1e-5 <= p["learning_rate"] <= 1e-3 and 0.05 <= p["beta"] <= 0.5 and p["epochs"] == 1 for p in points)
    assert log == again


def test_a_slot_that_frees_gets_the_next_point_at_once_while_a_long_trial_runs(tmp_path):
    """No batch barrier: with 2 slots, the first trial asked takes 10 time units and every other 1; the other slot
    runs trials 2, 3, 4, 5 one after another while the first still runs, each told before the next is asked."""
    search = plan_sweep(spec_for(tmp_path, n=5))[-1].search
    log = []
    run_search(search, [], fake_drive(log, slots=2, duration=lambda trial, i: 10.0 if i == 0 else 1.0))
    points = asked(log)
    ends = [hparams for event, hparams in log if event == "end"]
    assert ends[-1] == points[0]  # the long one ends last ...
    assert ends[:4] == points[1:]  # ... after the 4 short ones, each asked when the one before it ended
    assert [event for event, _ in log] == ["ask", "ask", "end", "ask", "end", "ask", "end", "ask", "end", "end"]


def test_a_resumed_search_replays_completed_trials_and_runs_only_the_rest(tmp_path):
    search = plan_sweep(spec_for(tmp_path, n=5))[-1].search
    first = []
    results = run_search(search, [], fake_drive(first))
    points = asked(first)
    previous = [TrialRecord(run_id=str(i), run_name="", trial_key=r.trial_key, stage="dpo", method="dpo",
                            status="FINISHED", params={k: str(v) for k, v in p.items()},
                            metrics=r.metrics, tags={}) for i, (p, r) in enumerate(zip(points[:3], results[:3]))]
    rest = []
    run_search(search, previous, fake_drive(rest))
    assert len(asked(rest)) == 2  # 5 - 3 replayed
    # a resumed study does not draw its seeded startup points again (that would rerun trials it has)
    replayed = {(p["learning_rate"], p["beta"]) for p in points[:3]}
    assert not {(p["learning_rate"], p["beta"]) for p in asked(rest)} & replayed


def test_points_a_killed_driver_left_running_run_again_first_within_the_budget(tmp_path):
    """The CI failure of stop 30: a run left RUNNING by a SIGKILLed driver stayed RUNNING for ever, its point never
    asked again (the rerun drew the whole rest of the budget anew). Now its point is the first asked, and counts in
    the budget; a key that ended since (a run of it FINISHED) is not run again; a run killed before its params were
    logged names no point and is left out."""
    search = plan_sweep(spec_for(tmp_path, n=5))[-1].search
    first = []
    results = run_search(search, [], fake_drive(first))
    points = asked(first)

    def record(i, status):
        return TrialRecord(run_id=f"{i}-{status}", run_name="", trial_key=results[i].trial_key, stage="dpo",
                           method="dpo", status=status, params={k: str(v) for k, v in points[i].items()},
                           metrics=results[i].metrics if status == "FINISHED" else {}, tags={})

    killed_before_its_params = TrialRecord(run_id="x", run_name="", trial_key="x", stage="dpo", method="dpo",
                                           status="RUNNING", params={}, metrics={}, tags={})
    previous = [record(0, "FINISHED"), record(1, "FINISHED"), record(1, "RUNNING"), record(2, "RUNNING"),
                killed_before_its_params]
    rest, notices = [], []
    again = run_search(search, previous, fake_drive(rest), notice=notices.append)
    assert asked(rest)[0] == points[2]  # the interrupted point, asked first
    assert len(asked(rest)) == 3 and points[1] not in asked(rest)  # 5 - 2 ended; the ended key is not rerun
    assert again[0].trial_key == results[2].trial_key
    assert notices == ["stage dpo: 1 point(s) whose trials were running when the last driver stopped run again first"]


def test_space_errors_are_one_line_with_the_field(tmp_path):
    bad = {
        "learning_rate: {low: 0.0, high: 1.0e-3, log: true}": "log range needs low > 0",
        "learning_rate: {low: 1.0e-3, high: 1.0e-5}": "must be below high",
        "gamma: {low: 0.1, high: 1.0}": "unknown hyperparameter for dpo 'gamma'",
    }
    for line, message in bad.items():
        text = SPEC.format(workdir=tmp_path, n=3, sampler="tpe").replace(
            "learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}", line)
        with pytest.raises(SpecError) as info:
            parse_spec(text, "s.yaml")
        assert message in str(info.value) and "stages.methods.dpo.space" in str(info.value), str(info.value)
    no_space = SPEC.format(workdir=tmp_path, n=3, sampler="tpe").replace("      space:\n", "      zzz:\n")
    with pytest.raises(SpecError):
        parse_spec(no_space, "s.yaml")
    grid_kind = SPEC.format(workdir=tmp_path, n=3, sampler="tpe").replace(
        "search: {kind: optuna, n_trials: 3, sampler: tpe, seed: 0}", "")
    with pytest.raises(SpecError, match="search.kind is grid"):
        parse_spec(grid_kind, "s.yaml")


def test_a_real_sweep_searches_a_stage_and_a_rerun_with_a_bigger_budget_continues_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_sweep(spec_for(tmp_path, n=2), uri, output=QUIET)
    assert first.ran == 4 and first.failed == 0  # base, sft, 2 searched dpo trials
    more = run_sweep(spec_for(tmp_path, n=3), uri, output=QUIET)
    assert more.skipped == 4 and more.ran == 1
    dpo = [r for r in SweepTracker(uri, "searched").trials("dpo") if r.status == "FINISHED"]
    assert len(dpo) == 3 and len({r.trial_key for r in dpo}) == 3
    for r in dpo:
        assert 1e-5 <= float(r.params["learning_rate"]) <= 1e-3 and math.isfinite(r.metrics["mean_score"])


def test_the_study_persists_in_the_workdir_and_a_rerun_rebuilds_it_from_mlflow(tmp_path):
    """optuna.load_study opens what optuna-dashboard shows: one trial per MLflow run of the stage, each linked
    to its run; a rerun with a bigger budget replays MLflow into the study instead of trusting the journal."""
    import optuna

    from orchestrator.search import study_name, study_storage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = spec_for(tmp_path, n=2)
    run_sweep(spec, uri, output=QUIET)
    stage = plan_sweep(spec)[-1]
    journal = tmp_path / "work" / "optuna" / "studies.log"
    assert journal.is_file()
    name = study_name("searched", "dpo", stage.stage_key)
    study = optuna.load_study(study_name=name, storage=study_storage(tmp_path / "work"))
    runs = {r.run_id: r for r in SweepTracker(uri, "searched").trials("dpo")}
    assert len(study.trials) == 2 and {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(runs)
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert trial.value == pytest.approx(run.metrics["mean_score"])
        assert trial.params["learning_rate"] == pytest.approx(float(run.params["learning_rate"]))
    run_sweep(spec_for(tmp_path, n=3), uri, output=QUIET)
    study = optuna.load_study(study_name=name, storage=study_storage(tmp_path / "work"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # two replayed, one new; none twice


def test_a_stopped_trial_is_told_to_optuna_as_pruned_with_its_rung_values_live_and_on_replay(tmp_path):
    """Early stopping in a searched stage: a STOPPED result reaches the study as PRUNED, its rung values as
    intermediate values (step = rung); a rerun replays it the same way from the MLflow record."""
    import optuna

    search = plan_sweep(spec_for(tmp_path, n=3))[-1].search
    storage = optuna.storages.InMemoryStorage()

    def result(t, i):
        return (TrialResult(trial_key=t.trial_key, run_id=None, status="STOPPED", error="rung 2 ...",
                            metrics={"asha/rung_1": 0.5, "asha/rung_2": 0.25, "stopped_at_step": 8.0})
                if i == 1 else TrialResult(trial_key=t.trial_key, run_id=None, status="FINISHED",
                                           metrics={"mean_score": 1.0, "asha/rung_1": 0.75}))

    run_search(search, [], fake_drive([], slots=3, result=result), storage=storage, name="live")
    trials = optuna.load_study(study_name="live", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert trials[1].intermediate_values == {1: 0.5, 2: 0.25} and trials[0].value == 1.0
    record = TrialRecord(run_id="r", run_name="", trial_key="k", stage="dpo", method="dpo", status="STOPPED",
                         params={k: str(v) for k, v in trials[1].params.items()},
                         metrics={"asha/rung_1": 0.5, "asha/rung_2": 0.25}, tags={})
    run_search(search, [record], fake_drive([], slots=2), storage=storage, name="replayed")
    replayed = optuna.load_study(study_name="replayed", storage=storage).trials
    assert replayed[0].state.name == "PRUNED" and replayed[0].intermediate_values == {1: 0.5, 2: 0.25}
    assert len(replayed) == 3  # the stopped trial counts in the budget, as a pruned trial does
