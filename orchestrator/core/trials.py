"""One trial's resolved configuration (TrialSpec) and its identity.

trial_key = sha256 of the trial's canonical resolved config (JSON, sorted keys). It leaves out what does not
change the result (sweep name, executor, tracking), so rerunning a spec finds its finished trials and any
change to a trial's config makes a new key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from orchestrator.core.spec import (DataSpec, EvaluationSpec, ModelSpec, RewardSpec, Scalar, Strict, TrainHParams,
                                    TrainingSpec)

KEY_VERSION = "posweep-trial-v1"  # bump when the meaning of a config field changes


# Settings that cannot change a trial's result beyond float summation order (memory only): never part of its
# key, so a rerun that changes them to fit memory skips the trials already done. Rung evaluations run outside
# the training's random stream and leave the final result as it is (tests/trainers/test_rungs.py), so a
# trial that ran to the end under early stopping is the grid's trial of the same key. Each prompt samples from
# its own random stream, so evaluation batches are free too (tests/trainers/test_generation.py).
KEY_NEUTRAL = {"model": {"require_chat_template"},
               "training": {"gradient_checkpointing", "micro_batch_size", "padding_free"},
               "evaluation": {"rungs", "rung_every", "rung_steps", "rung_prompts", "batch_size", "batch_tokens"}}
# Settings added after KEY_VERSION v1, by path: at their default they are left out, so trials run before they
# existed keep their keys; set to anything else, they make a new key.
KEY_ADDED_DEFAULTS = {("training", "precision"): "fp32", ("training", "lora"): None,
                      ("data", "max_row_chars"): 200_000, ("data", "eval", "max_row_chars"): 200_000}


def _pop_default(config: dict, path: tuple, default) -> None:
    *parents, name = path
    for part in parents:
        config = config.get(part)
        if not isinstance(config, dict):
            return
    if name in config and config[name] == default:
        del config[name]


def key_config(config: dict) -> dict:
    """The part of a trial's resolved config (model_dump, JSON mode) that its key hashes."""
    config = json.loads(json.dumps(config))  # a deep copy: sections are popped from
    for section, names in KEY_NEUTRAL.items():
        for name in names:
            config.get(section, {}).pop(name, None)
    for path, default in KEY_ADDED_DEFAULTS.items():
        _pop_default(config, path, default)
    return config


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


SHARED_SECTIONS = ("model", "data", "reward", "training", "evaluation", "init")
_MEMBER = {name: json.dumps(name) + ":" for name in ("v", "stage", "method", "hparams", *SHARED_SECTIONS)}
_MEMBER_ORDER = sorted(_MEMBER)
_VERSION_JSON = json.dumps(KEY_VERSION)
_json_text = json.encoder.encode_basestring_ascii  # json.dumps of a str, without the encoder's set-up
_SECTION_TEXT: dict[int, tuple[object, str]] = {}  # id(section) -> (the section, kept alive so its id stays its own; text)


def _section_json(name: str, section) -> str:
    """The canonical JSON of one section of a trial's config (key-neutral and default-valued added settings
    left out), cached per section object."""
    cached = _SECTION_TEXT.get(id(section))
    if cached is not None and cached[0] is section:
        return cached[1]
    dumped = section.model_dump(mode="json") if section is not None else None
    text = _canonical(key_config({name: dumped})[name])
    if len(_SECTION_TEXT) >= 256:  # a plan holds a few sections; a long-lived process many plans
        _SECTION_TEXT.clear()
    _SECTION_TEXT[id(section)] = (section, text)
    return text


class InitFromStage(Strict):
    """A trial that starts from the best trial of an earlier stage (picked when that stage is done)."""
    from_stage: str
    stage_key: str      # sha256 over the stage's trial keys: a different SFT grid is a different start
    select_by: str


class TrialSpec(Strict):
    stage: str                       # BASE_STAGE, SFT_STAGE (core.methods), or a preference method's name
    method: str                      # a method of orchestrator.core.methods
    hparams: dict[str, Scalar]
    model: ModelSpec
    data: DataSpec
    reward: RewardSpec
    training: TrainingSpec
    evaluation: EvaluationSpec
    init: Optional[InitFromStage] = None

    def canonical_json(self) -> str:
        """json.dumps({"v": KEY_VERSION, **key_config(self.model_dump(mode="json"))}, sort_keys=True, compact),
        built per top-level key: a sorted-keys object is its sorted members joined, and the config sections are
        objects every trial of a stage shares, so each is serialised once per plan, not once per trial (a plan
        of 100,000 trials hashes them all)."""
        parts = {"v": _VERSION_JSON, "stage": _json_text(self.stage), "method": _json_text(self.method),
                 "hparams": _canonical(self.hparams),
                 **{name: _section_json(name, getattr(self, name)) for name in SHARED_SECTIONS}}
        return "{" + ",".join([_MEMBER[name] + parts[name] for name in _MEMBER_ORDER]) + "}"

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
