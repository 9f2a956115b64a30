"""Grid expansion: SweepSpec -> stages of TrialSpecs (each with its key: orchestrator.core.trials), the
stages a search proposes while it runs, and the --smoke shrinking."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Optional

from orchestrator.core.methods import BASE_STAGE, METHODS, SFT_STAGE, StageKind
from orchestrator.core.rungs import stop_signature
from orchestrator.core.runs import SELECTION_METRIC
from orchestrator.core.spec import (SMOKE_SUFFIX, AshaSpec, EvaluationSpec, FloatRange, GridSpec, IntRange,
                                    OptunaSearchSpec, Scalar, SearchRange, SweepSpec, TrainHParams, coerce_hparam)
from orchestrator.core.trials import InitFromStage, TrialSpec

SMOKE_MAX_STEPS = 30
SMOKE_NUM_PROMPTS = 16


@dataclass(frozen=True)
class StageSearch:
    """A stage whose trials are proposed while it runs (search.kind optuna) instead of listed up front."""
    template: TrialSpec                 # the stage's trial with only the fixed hyperparameters set
    fixed: dict[str, Scalar]            # one-value grid keys
    space: dict[str, SearchRange]
    settings: OptunaSearchSpec
    n_trials: int                       # the budget: search.n_trials, or fewer when the space has fewer points
    points: Optional[int] = None        # distinct points of a finite space (choices, int ranges); None: infinite

    def trial(self, point: dict[str, Scalar]) -> TrialSpec:
        hparams = resolve_hparams(self.template.method, {**self.fixed, **point})
        return self.template.model_copy(update={"hparams": hparams})

    def capped(self) -> Optional[str]:
        """One line when the space has fewer distinct points than search.n_trials (the budget is capped to them)."""
        if self.points is None or self.points >= self.settings.n_trials:
            return None
        return (f"stage {self.template.stage}: its space holds {self.points} distinct points, fewer than "
                f"search.n_trials {self.settings.n_trials}; the search runs each once")

    def identity(self) -> str:
        space = {k: v.model_dump(mode="json") for k, v in self.space.items()}
        # not n_trials: raising the budget continues the same search (its finished trials are replayed); not early
        # stopping: it decides which trials stop, not which points are searched, so a rerun with another η or
        # without it continues the same study (a stop decided under other settings is part of its history)
        settings = self.settings.model_dump(mode="json", exclude={"n_trials", "early_stopping"})
        return json.dumps({"template": self.template.canonical_json(), "fixed": self.fixed, "space": space,
                           "search": settings}, sort_keys=True)


@dataclass(frozen=True)
class StagePlan:
    stage: str
    trials: list[TrialSpec]             # empty for a searched stage
    search: Optional[StageSearch] = None

    @property
    def stage_key(self) -> str:
        """A grid stage is its set of trial keys; a searched stage is its template, space and settings."""
        text = self.search.identity() if self.search else "".join(sorted(t.trial_key for t in self.trials))
        return hashlib.sha256(text.encode()).hexdigest()

    @functools.cached_property
    def kind(self) -> StageKind:
        """What the stage is (its method's kind): the untrained baseline, SFT, or a preference method."""
        return METHODS[(self.search.template if self.search else self.trials[0]).method].kind

    @property
    def size(self) -> int:
        """Trials the stage will run in all (planned, or the search budget)."""
        return self.search.n_trials if self.search else len(self.trials)

    @property
    def evaluation(self) -> EvaluationSpec:
        """How the stage's trials evaluate (one section, shared by all of them)."""
        return (self.search.template if self.search else self.trials[0]).evaluation

    def early_stopping(self, spec: SweepSpec) -> Optional[AshaSpec]:
        """The early stopping its trials run under: the spec's, in the preference stages only (the SFT stage picks
        the checkpoint every method starts from: its trials evaluate at rungs, for the curves, and are never
        stopped, which would change that pick)."""
        return spec.search.early_stopping if self.kind is StageKind.PREFERENCE else None

    def stop_signature(self, spec: SweepSpec) -> Optional[str]:
        """The early-stopping rule its trials are stopped under now (early_stopping.stop_signature)."""
        return stop_signature(self.evaluation, self.early_stopping(spec))


def expand_grid(grid: GridSpec) -> list[dict[str, Scalar]]:
    """Product of `grid` lists, crossed with the rows of `zip` (its lists taken together), in YAML order."""
    products = itertools.product(*grid.grid.values())
    zipped = list(zip(*grid.zip.values())) or [()]
    return [{**dict(zip(grid.grid, combo)), **dict(zip(grid.zip, row))}
            for combo in products for row in zipped]


def resolve_hparams(method_name: str, point: dict[str, Scalar]) -> dict[str, Scalar]:
    """Typed values (YAML's `1e-3` string becomes 0.001) with the defaults of unset keys filled in."""
    method = METHODS[method_name]
    typed = {k: coerce_hparam(method, k, v) for k, v in point.items()}
    train_keys = {k: v for k, v in typed.items() if k in TrainHParams.model_fields}
    method_keys = {k: v for k, v in typed.items() if k not in TrainHParams.model_fields}
    train = TrainHParams(**train_keys).model_dump() if method.trains else {}
    return {**method.params(**method_keys).model_dump(), **train}


def tracked_name(spec: SweepSpec, smoke: bool = False) -> str:
    """The experiment (and sweep name in every tag, study and registered model) a run of `spec` is tracked under:
    a --smoke run's numbers never mix with the full sweep's (status, report, resume)."""
    return f"{spec.name}{SMOKE_SUFFIX}" if smoke else spec.name


def smoke_spec(spec: SweepSpec) -> SweepSpec:
    """Few steps, few prompts and no more data than those steps read, for CI and first tries (grids are thinned
    in plan_sweep): a smoke run of a spec with millions of training pairs neither reads nor builds them."""
    steps = min(spec.training.max_steps or SMOKE_MAX_STEPS, SMOKE_MAX_STEPS)
    prompts = min(spec.evaluation.num_prompts, SMOKE_NUM_PROMPTS)
    pairs = steps * spec.training.batch_size
    data = spec.data.model_copy(update={"n_train": min(spec.data.n_train or pairs, pairs),
                                        "n_eval": min(spec.data.n_eval, max(prompts, SMOKE_NUM_PROMPTS))})
    return spec.model_copy(update={
        "data": data,
        "training": spec.training.model_copy(update={"max_steps": steps}),
        "evaluation": spec.evaluation.model_copy(update={"num_prompts": prompts}),
    })


def _thin(points: list[dict], smoke: bool) -> list[dict]:
    """At most two points per grid under --smoke: the first and the last, which span the grid."""
    return points[:1] + points[-1:] if smoke and len(points) > 2 else points


def _trial(spec: SweepSpec, stage: str, method: str, point: dict, init=None) -> TrialSpec:
    return TrialSpec(stage=stage, method=method, hparams=resolve_hparams(method, point), model=spec.model,
                     data=spec.data, reward=spec.reward, training=spec.training,
                     evaluation=spec.evaluation, init=init)


def _distinct(stage: str, trials: list[TrialSpec]) -> list[TrialSpec]:
    """A trial key appears once in a plan: two grid points that resolve to one config would be one trial run
    twice, counted twice and reported pending forever (the spec refuses such values; this is the last guard)."""
    seen: dict[str, TrialSpec] = {}
    for trial in trials:
        key = trial.trial_key
        if key in seen:
            raise PlanError(f"stage {stage}: {seen[key].run_name!r} and {trial.run_name!r} are one trial "
                            "(their hyperparameters resolve to the same values)")
        seen[key] = trial
    return trials


def _stage(spec: SweepSpec, stage: str, method: str, grid: GridSpec, smoke: bool, init=None) -> StagePlan:
    if not grid.space:
        trials = [_trial(spec, stage, method, p, init) for p in _thin(expand_grid(grid), smoke)]
        return StagePlan(stage, _distinct(stage, trials))
    assert isinstance(spec.search, OptunaSearchSpec)  # the spec validator guarantees it
    template = TrialSpec(stage=stage, method=method, hparams={}, model=spec.model, data=spec.data,
                         reward=spec.reward, training=spec.training, evaluation=spec.evaluation, init=init)
    fixed = {k: v[0] for k, v in grid.grid.items()}
    points = space_size(method, grid.space)
    n_trials = search_budget(spec, grid, smoke)
    return StagePlan(stage, [], StageSearch(template, fixed, dict(grid.space), spec.search, n_trials, points))


def space_size(method: str, space: dict[str, SearchRange]) -> Optional[int]:
    """Distinct points of a space of choices and integer ranges (choices that resolve to one value count once);
    None when a float range makes it infinite."""
    if any(isinstance(r, FloatRange) for r in space.values()):
        return None
    sizes = [r.int_high - r.int_low + 1 if isinstance(r, IntRange) else
             len({json.dumps(coerce_hparam(METHODS[method], k, c)) for c in r.choices}) for k, r in space.items()]
    return math.prod(sizes)


def search_budget(spec: SweepSpec, grid: GridSpec, smoke: bool) -> int:
    """Trials a searched stage runs: search.n_trials (2 under --smoke), at most the space's distinct points."""
    budget = min(spec.search.n_trials, 2) if smoke else spec.search.n_trials
    points = space_size(grid_method(spec, grid), grid.space)
    return budget if points is None else min(budget, points)


def grid_method(spec: SweepSpec, grid: GridSpec) -> str:
    """The method a stage's grid belongs to (sft, or a preference method's name)."""
    return SFT_STAGE if grid is spec.stages.sft else next(m for m, g in spec.stages.methods.items() if g is grid)


class PlanError(ValueError):
    """A spec whose grids cannot be planned as they are; the message is the one line a command prints."""


class PlanTooLarge(PlanError):
    """A spec that would plan more trials than its max_trials (a grid of a million points by mistake)."""


def grid_size(grid: GridSpec, spec: SweepSpec, smoke: bool) -> int:
    """Trials a stage plans, counted without expanding it."""
    if grid.space:
        return search_budget(spec, grid, smoke)
    size = math.prod(len(v) for v in grid.grid.values()) * max(1, len(next(iter(grid.zip.values()), [])))
    return min(size, 2) if smoke else size


def check_plan_size(spec: SweepSpec, smoke: bool = False) -> int:
    """The sweep's trial count; PlanTooLarge above spec.max_trials, before anything is expanded."""
    total = 1 + sum(grid_size(g, spec, smoke) for g in (spec.stages.sft, *spec.stages.methods.values()))
    if total > spec.max_trials:
        raise PlanTooLarge(f"the grids plan {total:,} trials, more than max_trials ({spec.max_trials:,}); "
                           "raise max_trials in the spec (or --max-trials) if that many is meant")
    return total


def preference_stages(stages: list[StagePlan]) -> list[StagePlan]:
    """The stages of preference methods (a preference stage is named after its method)."""
    return [s for s in stages if s.kind is StageKind.PREFERENCE]


def plan_sweep(spec: SweepSpec, smoke: bool = False) -> list[StagePlan]:
    """Stages in run order: base (the untrained model), sft, then one stage per preference method."""
    check_plan_size(spec, smoke)
    if smoke:
        spec = smoke_spec(spec)
    base = StagePlan(BASE_STAGE, [_trial(spec, BASE_STAGE, "untrained", {})])
    sft = _stage(spec, SFT_STAGE, "sft", spec.stages.sft, smoke)
    init = InitFromStage(from_stage=SFT_STAGE, stage_key=sft.stage_key, select_by=SELECTION_METRIC)
    methods = [_stage(spec, name, name, grid, smoke, init) for name, grid in spec.stages.methods.items()]
    return [base, sft, *methods]
