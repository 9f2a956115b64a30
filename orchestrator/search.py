"""Optuna over a stage's declared space (search.kind optuna), on any executor.

The stage keeps every slot of the executor busy: it asks Optuna for a point whenever a slot frees, runs it as an
ordinary trial (keyed by its resolved config, like a grid trial), and tells Optuna its score the moment it ends
(no batch waits for its slowest trial). Resume is ours
as for grids: MLflow is the source of truth. Each run of the sweep rebuilds the stage's study from the stage's
ended runs (replayed), runs again first the points whose trials a killed driver left running, then asks and tells
the rest of the budget.

The study is kept in an Optuna journal file in the sweep's workdir (WORKDIR/optuna/studies.log, one study per
searched stage, named SWEEP/STAGE/STAGE_KEY), so `optuna-dashboard WORKDIR/optuna/studies.log` and
`optuna.load_study` show the search while it runs and after. The two stay consistent because the journal is
never read back to decide anything: a rerun deletes the stage's study and replays it from MLflow, so trials a
killed driver left RUNNING in the journal, or runs deleted from MLflow, disappear from it too.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Callable, Optional

import optuna

from orchestrator.core.methods import METHODS
from orchestrator.core.registry import Registry
from orchestrator.core.rungs import logged_rung_values
from orchestrator.core.runs import RunStatus, TrialRecord, ended, running_per_key
from orchestrator.core.spec import Choice, FloatRange, IntRange, SearchRange, coerce_hparam
from orchestrator.core.task import TrialResult
from orchestrator.core.trials import TrialSpec
from orchestrator.grid import StageSearch
from orchestrator.infra.errors import first_line

SAMPLERS: Registry[Callable[[int], optuna.samplers.BaseSampler]] = Registry("search sampler", {
    # constant_liar: points asked in one batch, before any is told, are kept apart instead of piling up
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
})

# drive(next_trial, on_result): runs trials from next_trial (a TrialSpec, or None: no more) as slots free, and
# hands each result to on_result as its trial ends (the pipeline's, over the executor: cluster.base.drive)
Drive = Callable[[Callable[[], Optional[TrialSpec]], Callable[[TrialResult], None]], None]


def distribution(search_range: SearchRange) -> optuna.distributions.BaseDistribution:
    if isinstance(search_range, FloatRange):
        return optuna.distributions.FloatDistribution(search_range.low, search_range.high, log=search_range.log)
    if isinstance(search_range, IntRange):
        return optuna.distributions.IntDistribution(search_range.int_low, search_range.int_high)
    assert isinstance(search_range, Choice)
    return optuna.distributions.CategoricalDistribution(search_range.choices)


def _logged_value(search: StageSearch, key: str, logged: str):
    """The Optuna value behind a param MLflow holds as text (the resolved hyperparameter, str()-ed)."""
    search_range = search.space[key]
    if isinstance(search_range, FloatRange):
        return float(logged)
    if isinstance(search_range, IntRange):
        return int(logged)
    method = METHODS[search.template.method]
    for choice in search_range.choices:
        if str(coerce_hparam(method, key, choice)) == logged:
            return choice
    raise ValueError(f"{key}={logged} is not among the choices {search_range.choices}")


def _told_value(result_metrics: dict[str, float], status: str, metric: str) -> Optional[float]:
    return result_metrics.get(metric) if status == RunStatus.FINISHED else None


def _told_state(metrics: dict[str, float], status: str, metric: str) -> tuple[optuna.trial.TrialState,
                                                                            Optional[float]]:
    """How Optuna hears of a trial: COMPLETE with its value, PRUNED (stopped early at a rung: its intermediate
    values say how far it got and how well it did; TPE reads them), or FAIL."""
    value = _told_value(metrics, status, metric)
    if value is not None:
        return optuna.trial.TrialState.COMPLETE, value
    if status == RunStatus.STOPPED:
        return optuna.trial.TrialState.PRUNED, None
    return optuna.trial.TrialState.FAIL, None


Notice = Callable[[str], None]  # one line to the sweep's output


def journal_path(workdir: Path) -> Path:
    return Path(workdir) / "optuna" / "studies.log"


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def study_storage(workdir: Path, notice: Notice = lambda line: None) -> optuna.storages.JournalStorage:
    """The sweep's Optuna journal (WORKDIR/optuna/studies.log): what optuna-dashboard and load_study open. A journal
    that cannot be read (its last line cut by a kill or a full disk, a folder in its place) is set aside, renamed
    studies.log.damaged-TIME, and a new one started: MLflow is the source of truth, and each searched stage's study
    is rebuilt from it (replay) anyway."""
    path = journal_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.is_file() and path.stat().st_size and _last_byte(path) != b"\n":
            # Optuna skips a cut last line when reading, then appends after it: the next read fails for good
            raise ValueError("its last line is cut")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        optuna.get_all_study_summaries(storage)  # reads the whole journal now, not halfway through a search
        return storage
    except Exception as exc:  # noqa: BLE001 - whatever the damage, the journal is rebuilt from MLflow
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        notice(f"the Optuna journal {path} could not be read ({type(exc).__name__}: {first_line(exc)}); set aside "
               f"as {aside.name}, the studies are rebuilt from MLflow")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def study_name(sweep: str, stage: str, stage_key: str) -> str:
    return f"{sweep}/{stage}/{stage_key[:12]}"


def new_study(search: StageSearch, n_replayed: int = 0, storage=None, name: Optional[str] = None) -> optuna.Study:
    """A study (in `storage` under `name`, replacing one of that name: MLflow's runs are replayed into it) whose
    sampler seed moves on with the number of replayed trials: a resumed search with the spec's own seed would
    draw its random (startup) points again, and propose trials it has already run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is not None and name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=name, storage=storage)
    seed = search.settings.seed + n_replayed
    return optuna.create_study(direction="maximize", sampler=SAMPLERS[search.settings.sampler](seed),
                               storage=storage, study_name=name)


def replay(study: optuna.Study, search: StageSearch, records: list[TrialRecord]) -> None:
    """Add the stage's completed runs to the study, so the sampler continues from them."""
    dists = {k: distribution(v) for k, v in search.space.items()}
    for record in records:
        params = {k: _logged_value(search, k, record.params[k]) for k in dists}
        state, value = _told_state(record.metrics, record.status, search.settings.metric)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state,
                                                  intermediate_values=logged_rung_values(record.metrics),
                                                  user_attrs=_links(record.trial_key, record.run_id)))


def _links(trial_key: str, run_id: Optional[str]) -> dict[str, str]:
    """What an Optuna trial records of its posweep trial: the key, and the MLflow run that holds its results."""
    return {"posweep_trial_key": trial_key, "mlflow_run_id": run_id or ""}


def _unexplored(search: StageSearch, seen: set[str]) -> Optional[dict]:
    """The first point of a finite space (in the order of its choices and ranges) whose trial has not run, or None
    (also for a space with a float range)."""
    if search.points is None:
        return None
    axes = [[(k, v) for v in (r.choices if isinstance(r, Choice) else range(r.int_low, r.int_high + 1))]
            for k, r in search.space.items()]
    return next((dict(c) for c in itertools.product(*axes) if search.trial(dict(c)).trial_key not in seen), None)


# Proposals in a row that repeat a trial already run, after which a search of a continuous space gives up
MAX_REPEATS = 20


def _ask_new(study: optuna.Study, search: StageSearch, dists: dict, seen: set[str]) -> Optional[optuna.Trial]:
    """An asked trial whose point has not run in this stage, or None when no such point is left (or a continuous
    space's sampler keeps proposing run ones). A proposal that repeats a run point is told FAIL (user attribute
    posweep_repeat_of: its key), and in a finite space an unexplored point is enqueued for the next ask."""
    for _ in range(MAX_REPEATS):
        trial = study.ask(dists)
        key = search.trial(trial.params).trial_key
        if key not in seen:
            seen.add(key)
            return trial
        trial.set_user_attr("posweep_repeat_of", key)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if search.points is not None:
            point = _unexplored(search, seen)
            if point is None:
                return None
            study.enqueue_trial(point)
    return None


def _tell(study: optuna.Study, trial: optuna.Trial, result: TrialResult, metric: str) -> None:
    """Tell Optuna how an asked trial ended: its links, its rung values (Optuna step = rung number), its state."""
    for attr, value in _links(result.trial_key, result.run_id).items():
        trial.set_user_attr(attr, value)
    state, value = _told_state(result.metrics, result.status, metric)
    for rung, rung_value in logged_rung_values(result.metrics).items():
        trial.report(rung_value, rung)
    if state == optuna.trial.TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)


def interrupted_points(search: StageSearch, records: list[TrialRecord]) -> list[dict]:
    """The points of the stage's runs left RUNNING by a driver that is gone (the caller holds the stage's search
    lock and has closed those runs KILLED), one per key, without the keys that ended since: asked and started,
    never told. A rerun runs them again first, within the budget (`sweep status` already counts them in it); if
    the old attempt is still alive (a SLURM job outlives its driver), the new one waits on the trial's lock and
    takes its result. A run killed before its params were logged names no point: it is left out."""
    return [{k: _logged_value(search, k, r.params[k]) for k in search.space} for r in running_per_key(records)
            if all(k in r.params for k in search.space)]


def run_search(search: StageSearch, previous: list[TrialRecord], drive: Drive, storage=None,
               name: Optional[str] = None, notice: Notice = lambda line: None) -> list[TrialResult]:
    """Run the rest of the stage's budget (n_trials minus its ended runs; the plan caps it at a finite space's
    distinct points), each point once, asynchronously: `drive` asks for a point whenever a slot is free and hands
    back each result as its trial ends, which is told at once, so the next point asked already knows it (points
    asked while others run are kept apart by the constant-liar sampler). `previous`: the stage's runs; the ended
    ones are replayed, the interrupted ones (interrupted_points) are asked first. The study lives in `storage`
    under `name` when given (study_storage, study_name), else in memory."""
    interrupted = interrupted_points(search, previous)
    previous = ended(previous)
    study = new_study(search, len(previous), storage, name)
    replay(study, search, previous)
    for point in interrupted:
        study.enqueue_trial(point)
    if interrupted:
        notice(f"stage {search.template.stage}: {len(interrupted)} point(s) whose trials were running when the last "
               "driver stopped run again first")
    dists = {k: distribution(v) for k, v in search.space.items()}
    seen = {r.trial_key for r in previous}
    asked: dict[str, optuna.Trial] = {}  # trial key -> its asked trial, until told
    results: list[TrialResult] = []
    budget = search.n_trials - len(previous)

    def next_trial() -> Optional[TrialSpec]:
        if len(results) + len(asked) >= budget:
            return None
        trial = _ask_new(study, search, dists, seen)
        if trial is None:
            notice(f"stage {search.template.stage}: the search stops after {len(seen)} trials, under its budget of "
                   f"{search.n_trials}: the sampler proposed only points that have run, {MAX_REPEATS} times in a "
                   "row")
            return None
        spec = search.trial(trial.params)
        asked[spec.trial_key] = trial
        return spec

    def on_result(result: TrialResult) -> None:
        _tell(study, asked.pop(result.trial_key), result, search.settings.metric)
        results.append(result)

    drive(next_trial, on_result)
    return results
