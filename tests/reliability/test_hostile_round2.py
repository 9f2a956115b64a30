"""Hostile inputs, round 2 (issue 27): the newest features (kept models, early stopping, the Optuna journal, the Python
API) never lie, trace back or hang. One test per class of the adversarial pass; each failed on the code before its
fix. Probe trials (cluster.probe) stand in for training wherever the case is not about weights."""

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.probe import probe_trial
from orchestrator import api, cli
from orchestrator.core.runs import RunStatus, TrialRecord
from orchestrator.core.spec_file import SpecError, parse_spec
from orchestrator.core.tags import TAG_RUNG_SIGNATURE, TAG_STOPPED_UNDER, TAG_STOP_REASON, TAG_WEIGHTS
from orchestrator.grid import plan_sweep
from orchestrator.pipeline import run_sweep, select_init
from orchestrator.progress import QUIET, Output
from orchestrator.runtime.kept_models import decide
from orchestrator.runtime.store import StoreUnavailable
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.status import status_table
from trainers.probe import noop_sweep_yaml

SWEEP = [sys.executable, "-m", "orchestrator.cli"]
PROBE = functools.partial(probe_trial, steps=12, prompts=8)


def uri_of(tmp_path: Path, name: str = "mlflow.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def listen() -> tuple[list[str], Output]:
    lines: list[str] = []
    return lines, Output(lines.append, bar=False)


def cli_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, expected: int = 2) -> str:
    assert code == expected, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


TINY = """\
name: {name}
workdir: {workdir}
model: {{kind: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}}
data: {{kind: synthetic, n_train: 64, n_eval: 8}}
training: {{batch_size: 16, max_length: 48, max_steps: 2}}
evaluation: {{num_prompts: 8, max_new_tokens: 8}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.3], learning_rate: [1.0e-4]}}}}
"""


# ---- one experiment per sweep ----------------------------------------------------------------------------
def test_a_sweep_cannot_be_named_as_another_sweeps_smoke_run(tmp_path, capsys):
    with pytest.raises(SpecError, match="cannot end in '-smoke'"):
        parse_spec(TINY.format(name="col-smoke", workdir=tmp_path / "w"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.format(name="col-smoke", workdir=tmp_path / "w"))
    line = one_error_line(*cli_main(["plan", str(spec)], capsys)[::2])
    assert "name" in line and "--smoke" in line
    with pytest.raises(SpecError, match="at most 100 characters"):
        parse_spec(TINY.format(name="n" * 101, workdir=tmp_path / "w"))


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    """A finished no-op sweep `probes` (base, SFT, 3 methods x 2 preference trials) in its own store."""
    root = tmp_path_factory.mktemp("probes")
    spec = parse_spec(noop_sweep_yaml("probes", root / "work", n_beta=2, n_lr=1))
    uri = uri_of(root)
    run_sweep(spec, uri, output=QUIET, trial_fn=functools.partial(probe_trial, prompts=8))
    return spec, uri, root


def test_report_of_a_sweep_name_with_smoke_reads_the_smoke_sweep_and_formats_are_checked(probe_store, tmp_path):
    spec, uri, _ = probe_store
    assert len(api.trials("probes", tracking_uri=uri)) == 6
    with pytest.raises(StoreUnavailable, match="probes-smoke"):  # before: probes' own trials
        api.trials("probes", tracking_uri=uri, smoke=True)
    with pytest.raises(SpecError, match="unknown report format 'pdf'"):
        api.report(spec, tracking_uri=uri, out=str(tmp_path / "r.pdf"), fmt="pdf")
    assert not (tmp_path / "r.pdf").exists()


# ---- the Python API ---------------------------------------------------------------------------------------
def test_the_api_refuses_a_dict_where_a_spec_is_needed_and_takes_numpy_and_paths(tmp_path):
    raw = {"name": "np", "workdir": tmp_path / "w",
           "training": {"batch_size": np.int64(16), "max_length": np.int32(48)},
           "stages": {"sft": {"grid": {"learning_rate": np.array([1e-3])}},
                      "methods": {"dpo": {"grid": {"beta": (np.float32(0.5), np.float64(0.25)),
                                                   "learning_rate": [np.float64(1e-4)]}}}}}
    for call in (api.run, api.plan, api.check):
        with pytest.raises(SpecError, match=r"api\.load"):
            call(raw)
    spec = api.load(raw)
    assert spec.workdir == str(tmp_path / "w") and spec.training.batch_size == 16
    assert spec.stages.methods["dpo"].grid["beta"] == [0.5, 0.25]
    with pytest.raises(SpecError, match=r"stages\.sft\.grid\.learning_rate\[0\]: object is not a spec value"):
        api.load({**raw, "stages": {**raw["stages"], "sft": {"grid": {"learning_rate": [object()]}}}})
    with pytest.raises(SpecError, match="a spec is a YAML path"):
        api.load(42)


# ---- values the schema used to accept but no code can use ----------------------------------------------
@pytest.mark.parametrize("section,value,says", [
    ("model: {kind: tiny, seed: 1180591620717411303424}", "model.seed", "less than 9223372036854775808"),
    ("training: {seed: -1}", "training.seed", "greater than or equal to 0"),
    ("evaluation: {seed: 1180591620717411303424}", "evaluation.seed", "less than"),
    ("evaluation: {temperature: 1.0e-300}", "evaluation.temperature", "greater than or equal to 0.01"),
    ("evaluation: {max_new_tokens: 1000000000}", "evaluation.max_new_tokens", "less than or equal to 32768"),
    ("tracking: {system_metrics_interval: 1.0e+12}", "tracking.system_metrics_interval", "less than or equal to 3600"),
])
def test_values_no_code_can_use_are_refused_when_the_spec_loads(tmp_path, section, value, says):
    text = ("name: bounds\nstages:\n  sft: {grid: {learning_rate: [1.0e-3]}}\n  methods:\n"
            "    dpo: {grid: {beta: [0.1], learning_rate: [1.0e-4]}}\n" + section + "\n")
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.yaml")
    assert value in str(info.value) and says in str(info.value), str(info.value)


# ---- tracking stores that are not stores, workdirs that cannot be -----------------------------------------
def _bad_uris(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "not-a-db.db").write_text("hello, I am not SQLite\n")
    (tmp_path / "a-file").write_text("x")
    return {"./mlruns": "file store", f"file://{tmp_path}/mlruns": "file store", "foo://bar": "unknown tracking URI",
            f"sqlite:///{tmp_path / 'a-folder'}": "names a folder",
            f"sqlite:///{tmp_path / 'not-a-db.db'}": "is not a SQLite database",
            f"sqlite:///{tmp_path / 'a-file' / 'below' / 'mlflow.db'}": "is a file"}


@pytest.mark.parametrize("command", ["run", "plan", "status", "report", "ui"])
def test_a_tracking_uri_that_names_no_store_is_one_line_and_exit_2_on_every_command(tmp_path, capsys, command,
                                                                                    monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.format(name="uris", workdir=tmp_path / "w"))
    monkeypatch.chdir(tmp_path)
    for uri, says in _bad_uris(tmp_path).items():
        before = tree(tmp_path)
        argv = [command] + ([] if command == "ui" else [str(spec)]) + ["--tracking-uri", uri]
        code, _, err = cli_main(argv, capsys)
        line = one_error_line(code, err)
        assert says in line, (uri, line)
        assert tree(tmp_path) == before, uri  # nothing created: no store, no workdir, no lock


def test_bad_uris_and_missing_stores_through_the_real_cli_never_print_a_traceback(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.format(name="uris", workdir=tmp_path / "w"))
    for argv, code in ((["run", str(spec), "--tracking-uri", "./mlruns"], 2),
                       (["status", str(spec), "--tracking-uri", f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"], 1),
                       (["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"], 1)):
        done = subprocess.run(SWEEP + argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "nope").exists() and not (tmp_path / "nope.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_workdir_that_cannot_be_created_is_refused_before_anything_exists(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.format(name="wd", workdir=tmp_path / "a-file" / "work"))
    for command in ("plan", "run"):
        line = one_error_line(*cli_main([command, str(spec), "--tracking-uri", uri_of(tmp_path)], capsys)[::2])
        assert "workdir" in line and "is a file" in line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a ro mount")
def test_a_workdir_on_a_read_only_file_system_is_refused_before_any_run_exists(tmp_path):
    """As root, permissions never refuse; a read-only mount does. The sweep runs in a private mount namespace
    with a read-only tmpfs over the workdir's parent."""
    ro = tmp_path / "ro"
    ro.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.format(name="wd", workdir=ro / "work"))
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && {sys.executable} -m orchestrator.cli run {spec} "
              f"--tracking-uri {uri_of(tmp_path)}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    if "mount" in done.stderr and done.returncode != 2:
        pytest.skip(f"no read-only mount here: {done.stderr.strip()[:200]}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "read-only file system" in done.stderr and not (tmp_path / "mlflow.db").exists()


# ---- early-stopping state carries its settings -------------------------------------------------------------
def _asha(tmp_path: Path, rungs: str, eta: float = 3.0, search: str = "grid", extra: str = "") -> str:
    text = noop_sweep_yaml("es", tmp_path / "work", n_beta=4, n_lr=2)
    return (text.replace("evaluation: {num_prompts: 16}", f"evaluation: {{num_prompts: 16, {rungs}}}")
            + f"search: {{kind: {search}, early_stopping: {{kind: asha, reduction_factor: {eta}}}{extra}}}\n")


def test_a_rerun_with_other_rungs_never_compares_values_taken_at_other_steps(tmp_path):
    uri = uri_of(tmp_path)
    first = run_sweep(parse_spec(_asha(tmp_path, "rung_steps: [2]")), uri, output=QUIET, trial_fn=PROBE)
    assert first.stopped > 0
    lines, output = listen()
    second = run_sweep(parse_spec(_asha(tmp_path, "rung_steps: [10]")), uri, output=output, trial_fn=PROBE)
    assert any("stopped under other early-stopping settings" in line and "run again" in line for line in lines)
    assert second.ran == first.stopped  # the stale stops run again; finished trials stand
    runs = SweepTracker(uri, "es").trials()
    signatures = {r.tags.get(TAG_RUNG_SIGNATURE) for r in runs if r.stage != "base"}
    assert len(signatures - {None}) == 2
    newest = {r.trial_key: r for r in runs[::-1]}  # the latest run of each key
    for record in newest.values():
        if record.status == RunStatus.STOPPED:  # decided among the runs that took their rung at step 10 only
            same = sum(r.tags.get(TAG_RUNG_SIGNATURE) == record.tags[TAG_RUNG_SIGNATURE] and r.stage == record.stage
                       and r.trial_key != record.trial_key for r in newest.values())
            compared = int(re.search(r" of the (\d+) other trials? at this rung", record.tags[TAG_STOP_REASON])[1])
            assert compared <= same and record.tags[TAG_STOPPED_UNDER]


def test_status_plan_and_run_agree_on_pending_with_and_without_early_stopping(tmp_path):
    uri = uri_of(tmp_path)
    asha = parse_spec(_asha(tmp_path, "rungs: [0.5]"))
    run_sweep(asha, uri, output=QUIET, trial_fn=PROBE)
    for spec in (asha, parse_spec(noop_sweep_yaml("es", tmp_path / "work", n_beta=4, n_lr=2))):  # then without
        stages = plan_sweep(spec)
        pending = status_table(stages, SweepTracker(uri, "es").trials(), spec)["pending"].sum()
        outcome = run_sweep(spec, uri, output=QUIET, trial_fn=PROBE)
        assert outcome.ran == pending, spec.search
    assert status_table(stages, SweepTracker(uri, "es").trials(), spec)["pending"].sum() == 0


OPTUNA_SPACE = """\
      grid: {{learning_rate: [1.0e-4]}}
      space: {{beta: {{choices: [{choices}]}}}}
"""


def _searched(tmp_path: Path, n_trials: int, choices: str = "0.1, 0.3", extra: str = "", seconds: float = 0.0,
              name: str = "opt") -> str:
    return f"""\
name: {name}
workdir: {tmp_path / 'work'}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
evaluation: {{num_prompts: 16{', rungs: [0.5]' if extra else ''}}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo:
{OPTUNA_SPACE.format(choices=choices)}search: {{kind: optuna, n_trials: {n_trials}, seed: 0{extra}}}
"""


def test_an_optuna_rerun_with_another_eta_continues_the_same_search(tmp_path):
    uri = uri_of(tmp_path)
    asha = ", early_stopping: {{kind: asha, reduction_factor: {}}}"
    run_sweep(parse_spec(_searched(tmp_path, 4, "0.1, 0.3, 0.5, 0.7", asha.format(3))), uri, output=QUIET,
              trial_fn=PROBE)
    spec = parse_spec(_searched(tmp_path, 4, "0.1, 0.3, 0.5, 0.7", asha.format(2)))
    started = time.monotonic()
    again = run_sweep(spec, uri, output=QUIET, trial_fn=PROBE)
    assert again.ran == 0  # before: "4 trials run, 2 stopped early" in 3 s, and status 4 pending forever
    assert status_table(plan_sweep(spec), SweepTracker(uri, "opt").trials(), spec)["pending"].sum() == 0
    assert (api.trials(spec, tracking_uri=uri)["status"] == RunStatus.FINISHED).any()
    assert time.monotonic() - started < 60


def test_an_optuna_budget_larger_than_its_space_runs_each_point_once(tmp_path):
    import optuna

    uri = uri_of(tmp_path)
    spec = parse_spec(_searched(tmp_path, 4))
    assert plan_sweep(spec)[-1].size == 2
    lines, output = listen()
    outcome = run_sweep(spec, uri, output=output, trial_fn=PROBE)
    assert any("holds 2 distinct points, fewer than search.n_trials 4" in line for line in lines)
    dpo = SweepTracker(uri, "opt").trials("dpo")
    assert outcome.ran == 4 and len(dpo) == len({r.trial_key for r in dpo}) == 2
    assert status_table(plan_sweep(spec), SweepTracker(uri, "opt").trials(), spec)["pending"].sum() == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "work" / "optuna" / "studies.log")))
    (study,) = [optuna.load_study(study_name=s.study_name, storage=storage)
                for s in optuna.get_all_study_summaries(storage)]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and len({t.user_attrs["mlflow_run_id"] for t in complete}) == 2


@pytest.mark.parametrize("damage", ["cut", "folder"])
def test_a_damaged_optuna_journal_is_set_aside_and_rebuilt_from_mlflow(tmp_path, damage):
    uri = uri_of(tmp_path)
    run_sweep(parse_spec(_searched(tmp_path, 2, "0.1, 0.3, 0.5")), uri, output=QUIET, trial_fn=PROBE)
    journal = tmp_path / "work" / "optuna" / "studies.log"
    if damage == "cut":  # a kill or a full disk in the middle of a line
        journal.write_bytes(journal.read_bytes()[:-7])
    else:
        journal.unlink()
        journal.mkdir()
    lines, output = listen()
    outcome = run_sweep(parse_spec(_searched(tmp_path, 3, "0.1, 0.3, 0.5")), uri, output=output, trial_fn=PROBE)
    assert outcome.ran == 1 and outcome.failed == 0
    assert sum("could not be read" in line and "set aside" in line for line in lines) == 1
    assert journal.is_file() and list(journal.parent.glob("studies.log.damaged-*"))


def test_two_drivers_of_one_search_both_finish_and_run_each_point_once(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(_searched(tmp_path, 3, "0.1, 0.3, 0.5, 0.7"))
    script = ("import functools, sys; from orchestrator.core.spec_file import load_spec; "
              "from orchestrator.pipeline import run_sweep; from orchestrator.progress import QUIET; "
              "from cluster.probe import probe_trial; "
              f"o = run_sweep(load_spec(sys.argv[1]), {uri_of(tmp_path)!r}, output=QUIET, "
              "trial_fn=functools.partial(probe_trial, steps=4, seconds=1.0, prompts=8)); print(o.ran, o.failed)")
    drivers = [subprocess.Popen([sys.executable, "-c", script, str(spec_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [d.communicate(timeout=600) for d in drivers]
    for driver, (out, err) in zip(drivers, results):
        assert driver.returncode == 0 and "Traceback" not in err, err
    dpo = [r for r in SweepTracker(uri_of(tmp_path), "opt").trials("dpo") if r.status == RunStatus.FINISHED]
    assert len(dpo) == len({r.trial_key for r in dpo}) == 3


# ---- one "best" everywhere, and a registry that serves only what is there ----------------------------------
def _record(key: str, score: float, stage: str = "dpo") -> TrialRecord:
    return TrialRecord(run_id=f"run-{key}", run_name=f"{stage} {key}", trial_key=key, stage=stage, method=stage,
                       status="FINISHED", params={}, metrics={"mean_score": score},
                       tags={TAG_WEIGHTS: "logged", "posweep.checkpoint": "/nowhere"})


def test_one_tie_break_for_best_in_the_summary_the_registry_the_sft_pick_and_the_report():
    from analysis.frames import sweep_frame
    from analysis.robustness import table1
    from analysis.summary import best_of_stage

    records = [_record("bbb", 1.0), _record("aaa", 1.0), _record("ccc", 0.5)]
    assert decide(records, "best_per_method").best.trial_key == "aaa"
    frame = sweep_frame([r.model_dump() for r in records], [])
    assert best_of_stage(frame, "dpo")["trial_key"] == "aaa"
    assert table1(frame, ["dpo"]).set_index("method").loc["dpo", "run_name"] == "dpo aaa"
    with pytest.raises(Exception, match="aaa"):  # the SFT pick: the same run (its checkpoint is not on disk here)
        select_init([_record(k, s, "sft") for k, s in (("bbb", 1.0), ("aaa", 1.0))],
                    type("Stage", (), {"stage": "sft", "search": None,
                                       "trials": [type("T", (), {"trial_key": k})() for k in ("aaa", "bbb")]})())


KEPT = TINY.replace("training: {{batch_size: 16, max_length: 48, max_steps: 2}}",
                    "training: {{batch_size: 16, max_length: 48, max_steps: 2}}\ncheckpoints: {{keep: best_per_method}}")


@pytest.mark.parametrize("damage", ["deleted", "altered"])
def test_kept_weights_that_are_gone_or_altered_are_never_served(tmp_path, damage):
    """The registry's @best must point at the weights its trial wrote. Deleted or altered ones: the run is marked
    FAILED with why, its trial runs again, and @best downloads whole, verified weights."""
    import mlflow

    uri = uri_of(tmp_path)
    spec = parse_spec(KEPT.format(name="kp", workdir=tmp_path / "w"))
    first = run_sweep(spec, uri, output=QUIET)
    assert first.failed == 0 and first.models
    best = next(r for r in SweepTracker(uri, "kp").trials("dpo") if r.tags.get(TAG_WEIGHTS) == "logged")
    folder = Path(mlflow.MlflowClient(uri).get_run(best.run_id).info.artifact_uri.removeprefix("file://")) / "model"
    if damage == "deleted":
        shutil.rmtree(folder)
    else:
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    lines, output = listen()
    again = run_sweep(spec, uri, output=output)
    assert any(best.run_id in line and "runs again" in line for line in lines), lines
    assert again.ran == 1 and again.failed == 0
    assert [r.status for r in SweepTracker(uri, "kp").trials() if r.run_id == best.run_id] == [RunStatus.FAILED]
    version = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("kp-dpo", "best")
    assert version.run_id != best.run_id
    served = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl"),
                                                      tracking_uri=uri))
    from orchestrator.infra.files import folder_problem
    assert folder_problem(served) is None
