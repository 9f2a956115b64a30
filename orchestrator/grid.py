"""Grid expansion and trial identity: SweepSpec -> stages of TrialSpecs, each with a trial_key.

trial_key = sha256 of the trial's canonical resolved config (JSON, sorted keys). It leaves out what
does not change the result (sweep name, executor, tracking), so rerunning a spec finds its finished
trials and any change to a trial's config makes a new key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Optional

from orchestrator.spec import (DataSpec, EvaluationSpec, GridSpec, ModelSpec, OptunaSearchSpec, RewardSpec, Scalar,
                               SearchRange, Strict, SweepSpec, TrainHParams, TrainingSpec, coerce_hparam)
from trainers.methods import METHODS

KEY_VERSION = "posweep-trial-v1"  # bump when the meaning of a config field changes
SELECT_SFT_BY = "mean_score"
SMOKE_MAX_STEPS = 30
SMOKE_NUM_PROMPTS = 16


# Settings that cannot change a trial's result beyond float summation order (memory only): never part of its
# key, so a rerun that changes them to fit memory skips the trials already done.
KEY_NEUTRAL = {"model": {"require_chat_template"},
               "training": {"gradient_checkpointing", "micro_batch_size", "padding_free"}}
# Settings added after KEY_VERSION v1: at their default they are left out, so trials run before they existed
# keep their keys; set to anything else, they make a new key.
KEY_ADDED_DEFAULTS = {"training": {"precision": "fp32", "lora": None}}


def key_config(config: dict) -> dict:
    """The part of a trial's resolved config (model_dump, JSON mode) that its key hashes."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for section, names in KEY_NEUTRAL.items():
        for name in names:
            config.get(section, {}).pop(name, None)
    for section, defaults in KEY_ADDED_DEFAULTS.items():
        for name, default in defaults.items():
            if config.get(section, {}).get(name, default) == default:
                config.get(section, {}).pop(name, None)
    return config


class InitFromStage(Strict):
    """A trial that starts from the best trial of an earlier stage (picked when that stage is done)."""
    from_stage: str
    stage_key: str      # sha256 over the stage's trial keys: a different SFT grid is a different start
    select_by: str


class TrialSpec(Strict):
    stage: str                       # "base", "sft", or a preference method's name
    method: str                      # a trainers.methods name
    hparams: dict[str, Scalar]
    model: ModelSpec
    data: DataSpec
    reward: RewardSpec
    training: TrainingSpec
    evaluation: EvaluationSpec
    init: Optional[InitFromStage] = None

    def canonical_json(self) -> str:
        return json.dumps({"v": KEY_VERSION, **key_config(self.model_dump(mode="json"))}, sort_keys=True,
                          separators=(",", ":"))

    @property
    def trial_key(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def run_name(self) -> str:
        """'simpo b=2 g=1.2 lr=0.0003 e=1': method and hyperparameters, readable in the MLflow UI."""
        short = {"learning_rate": "lr", "epochs": "e", "beta": "b", "gamma": "g"}
        method_keys = [k for k in self.hparams if k not in TrainHParams.model_fields]
        ordered = method_keys + [k for k in ("learning_rate", "epochs") if k in self.hparams]
        return " ".join([self.method] + [f"{short.get(k, k)}={self.hparams[k]:g}" if isinstance(
            self.hparams[k], float) else f"{short.get(k, k)}={self.hparams[k]}" for k in ordered])


@dataclass(frozen=True)
class StageSearch:
    """A stage whose trials are proposed while it runs (search.kind optuna) instead of listed up front."""
    template: TrialSpec                 # the stage's trial with only the fixed hyperparameters set
    fixed: dict[str, Scalar]            # one-value grid keys
    space: dict[str, SearchRange]
    settings: OptunaSearchSpec
    n_trials: int

    def trial(self, point: dict[str, Scalar]) -> TrialSpec:
        hparams = resolve_hparams(self.template.method, {**self.fixed, **point})
        return self.template.model_copy(update={"hparams": hparams})

    def identity(self) -> str:
        space = {k: v.model_dump(mode="json") for k, v in self.space.items()}
        # not n_trials: raising the budget continues the same search (its finished trials are replayed)
        settings = self.settings.model_dump(mode="json", exclude={"n_trials"})
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

    @property
    def size(self) -> int:
        """Trials the stage will run in all (planned, or the search budget)."""
        return self.search.n_trials if self.search else len(self.trials)


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


def smoke_spec(spec: SweepSpec) -> SweepSpec:
    """Few steps and few prompts, for CI and first tries (grids are thinned in plan_sweep)."""
    steps = min(spec.training.max_steps or SMOKE_MAX_STEPS, SMOKE_MAX_STEPS)
    prompts = min(spec.evaluation.num_prompts, SMOKE_NUM_PROMPTS)
    return spec.model_copy(update={
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


def _stage(spec: SweepSpec, stage: str, method: str, grid: GridSpec, smoke: bool, init=None) -> StagePlan:
    if not grid.space:
        return StagePlan(stage, [_trial(spec, stage, method, p, init) for p in _thin(expand_grid(grid), smoke)])
    assert isinstance(spec.search, OptunaSearchSpec)  # the spec validator guarantees it
    template = TrialSpec(stage=stage, method=method, hparams={}, model=spec.model, data=spec.data,
                         reward=spec.reward, training=spec.training, evaluation=spec.evaluation, init=init)
    fixed = {k: v[0] for k, v in grid.grid.items()}
    n_trials = min(spec.search.n_trials, 2) if smoke else spec.search.n_trials
    return StagePlan(stage, [], StageSearch(template, fixed, dict(grid.space), spec.search, n_trials))


def plan_sweep(spec: SweepSpec, smoke: bool = False) -> list[StagePlan]:
    """Stages in run order: base (the untrained model), sft, then one stage per preference method."""
    if smoke:
        spec = smoke_spec(spec)
    base = StagePlan("base", [_trial(spec, "base", "untrained", {})])
    sft = _stage(spec, "sft", "sft", spec.stages.sft, smoke)
    init = InitFromStage(from_stage="sft", stage_key=sft.stage_key, select_by=SELECT_SFT_BY)
    methods = [_stage(spec, name, name, grid, smoke, init) for name, grid in spec.stages.methods.items()]
    return [base, sft, *methods]
