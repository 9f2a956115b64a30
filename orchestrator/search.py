"""Optuna over a stage's declared space (search.kind optuna), on any executor.

The stage asks Optuna for a batch of points as wide as the executor runs at once, runs the batch as ordinary
trials (each keyed by its resolved config, like a grid trial), and tells Optuna their scores. Resume is ours
as for grids: the stage's earlier FINISHED/FAILED runs are replayed into a fresh study, and only the rest of
the budget runs. Optuna keeps no state of its own.
"""

from __future__ import annotations

from typing import Callable, Optional

import optuna

from orchestrator.grid import StageSearch
from orchestrator.spec import Choice, FloatRange, IntRange, SearchRange, coerce_hparam
from orchestrator.task import TrialResult
from orchestrator.tracking import TrialRecord
from trainers.methods import METHODS

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    # constant_liar: points asked in one batch, before any is told, are kept apart instead of piling up
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}

RunBatch = Callable[[list], list[TrialResult]]  # [TrialSpec] -> one TrialResult each, in order


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
    return result_metrics.get(metric) if status == "FINISHED" else None


def new_study(search: StageSearch, n_replayed: int = 0) -> optuna.Study:
    """A study whose sampler seed moves on with the number of replayed trials: a resumed search with the
    spec's own seed would draw its random (startup) points again, and propose trials it has already run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = search.settings.seed + n_replayed
    return optuna.create_study(direction="maximize", sampler=SAMPLERS[search.settings.sampler](seed))


def replay(study: optuna.Study, search: StageSearch, records: list[TrialRecord]) -> None:
    """Add the stage's completed runs to the study, so the sampler continues from them."""
    dists = {k: distribution(v) for k, v in search.space.items()}
    for record in records:
        params = {k: _logged_value(search, k, record.params[k]) for k in dists}
        value = _told_value(record.metrics, record.status, search.settings.metric)
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, state=state))


def run_search(search: StageSearch, previous: list[TrialRecord], run_batch: RunBatch,
               batch_size: int) -> list[TrialResult]:
    """Run the rest of the stage's budget (n_trials minus its completed runs) in batches of `batch_size`."""
    study = new_study(search, len(previous))
    replay(study, search, previous)
    dists = {k: distribution(v) for k, v in search.space.items()}
    results: list[TrialResult] = []
    remaining = search.n_trials - len(previous)
    while remaining > 0:
        asked = [study.ask(dists) for _ in range(min(batch_size, remaining))]
        batch = run_batch([search.trial(t.params) for t in asked])
        for trial, result in zip(asked, batch):
            value = _told_value(result.metrics, result.status, search.settings.metric)
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, value)
        results += batch
        remaining -= len(asked)
    return results
