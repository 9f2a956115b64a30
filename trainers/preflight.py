"""Inputs checked before a sweep starts anything (`sweep run` and `sweep plan`): what the spec's schema cannot
see — the rows of a local dataset, the tokenizer and config of a local model folder, a local reward model.
A problem raises InputError naming the spec field; the CLI prints it as one line and exits 2, before any
MLflow run, server, Ray or Slurm job exists. Hub ids are not fetched here (that needs the network); their
problems surface in the first trial.

Returns what was checked, with every path resolved, for the driver to report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.errors import first_line
from trainers.sources import DataError, load_splits


class InputError(ValueError):
    """An input the spec points at is unusable. `field` is the spec's field path (e.g. data.path)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class Preflight:
    inputs: list[str] = field(default_factory=list)    # "model: /abs/folder (tokenizer with chat template)"
    warnings: list[str] = field(default_factory=list)  # accepted, but the user should know


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _check_hf_folder(where: str, folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise InputError(where, f"{folder} is not a Hugging Face model folder (no config.json); give the folder "
                                "that save_pretrained wrote")


def check_model(model_spec, report: Preflight) -> None:
    if model_spec.kind != "hf":
        report.inputs.append(f"model: built-in tiny Llama ({model_spec.num_layers} layers)")
        return
    if model_spec.trust_remote_code:
        report.warnings.append("model.trust_remote_code is true: the model repository's own Python code runs in "
                               "every trial; only use it for code you have read")
    if model_spec.path is None:
        report.inputs.append(f"model: hub {model_spec.hub_id} (revision {model_spec.revision or 'default'}; "
                             "fetched by the first trial)")
        return
    folder = _resolved(model_spec.path)
    if model_spec.gguf_file:  # the tokenizer lives inside the GGUF file; reading it means reading the weights
        report.inputs.append(f"model: {folder / model_spec.gguf_file} (GGUF, dequantized once into workdir)")
        return
    _check_hf_folder("model.path", folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=model_spec.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise InputError("model.path", f"cannot load a tokenizer from {folder}: {type(exc).__name__}: "
                                       f"{first_line(exc)}") from None
    if tokenizer.eos_token is None:
        raise InputError("model.path", f"the tokenizer in {folder} has no EOS token; every response must end with "
                                       "one (set eos_token in tokenizer_config.json)")
    if tokenizer.pad_token is None:
        report.warnings.append(f"the tokenizer in {folder} has no pad token; its EOS token "
                               f"{tokenizer.eos_token!r} pads batches (masked out of every loss)")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if model_spec.require_chat_template and not has_template:
        raise InputError("model.require_chat_template", f"the tokenizer in {folder} has no chat template; add one "
                                                       "(chat_template in tokenizer_config.json) or set "
                                                       "require_chat_template: false to use plain-text prompts")
    report.inputs.append(f"model: {folder} ({'chat template' if has_template else 'plain-text prompts'})")


def check_data(data_spec, report: Preflight) -> None:
    """Read both splits exactly as a trial will (missing columns, zero rows, malformed lines fail here)."""
    if data_spec.kind == "synthetic":
        report.inputs.append(f"data: built-in synthetic task ({data_spec.n_train} train, {data_spec.n_eval} eval)")
        return
    sources = {"data": data_spec, **({"data.eval": data_spec.eval} if data_spec.eval is not None else {})}
    if any(source.path is None for source in sources.values()):
        report.inputs.append("data: a hub dataset (read by the first trial)")
        return
    try:
        train, evaluation = load_splits(data_spec)
    except (DataError, OSError, ValueError) as exc:  # ValueError: undecodable text
        culprit = next((name for name, source in reversed(sources.items()) if str(exc).startswith(source.path)),
                       "data")
        message = str(exc) if str(exc).startswith(sources[culprit].path) else f"{sources[culprit].path}: {exc}"
        raise InputError(f"{culprit}.path", message) from None
    skipped = train.skipped + evaluation.skipped
    for name, source in sources.items():
        report.inputs.append(f"{name}: {_resolved(source.path)}")
    report.inputs[-1] += (f" ({len(train.pairs)} train pairs, {len(evaluation.pairs)} eval pairs"
                          f"{f'; {skipped} malformed rows skipped' if skipped else ''})")


def check_reward(reward_spec, report: Preflight) -> None:
    if reward_spec.kind != "hf":
        report.inputs.append("reward: built-in synthetic gold reward")
        return
    if reward_spec.trust_remote_code:
        report.warnings.append("reward.trust_remote_code is true: the reward model repository's own Python code "
                               "runs in every trial; only use it for code you have read")
    if reward_spec.path is None:
        report.inputs.append(f"reward: hub {reward_spec.hub_id} (fetched by the first trial)")
        return
    folder = _resolved(reward_spec.path)
    _check_hf_folder("reward.path", folder)
    report.inputs.append(f"reward: {folder}")


CHECKS: dict[str, Callable] = {"model": check_model, "data": check_data, "reward": check_reward}


def preflight(spec) -> Preflight:
    """Check every input of `spec`; raises InputError on the first unusable one."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    report = Preflight()
    for section, check in CHECKS.items():
        check(getattr(spec, section), report)
    report.inputs.append(f"workdir: {_resolved(spec.workdir)}")
    return report
