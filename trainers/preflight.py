"""Inputs checked before a sweep starts anything (`sweep run` and `sweep plan`): every check of the machine's
files, which the spec's schema never reads — that the paths exist, the rows of a local dataset, the tokenizer
and config of a local model folder, a local reward model.
A problem raises InputError naming the spec field; the CLI prints it as one line and exits 2, before any
MLflow run, server, Ray or Slurm job exists. Hub ids are not fetched here (that needs the network); their
problems surface in the first trial.

Returns what was checked, with every path resolved, for the driver to report."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from orchestrator.core.registry import Registry
from orchestrator.core.rungs import rungs_of
from orchestrator.core.spec import range_bounds
from orchestrator.infra.errors import first_line
from trainers.sources import DataError, load_splits
from trainers.synthetic import generate_split


class InputError(ValueError):
    """An input the spec points at is unusable. `field` is the spec's field path (e.g. data.path)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class Preflight:
    inputs: list[str] = field(default_factory=list)    # "model: /abs/folder (tokenizer with chat template)"
    warnings: list[str] = field(default_factory=list)  # accepted, but the user should know
    tokenizer: object = None                           # the local model's tokenizer, when one was read
    train_pairs: Optional[list] = None                 # the local training pairs, when they were read
    eval_pairs: Optional[list] = None


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _existing(where: str, value: str, folder: bool) -> Path:
    """A path the spec names, resolved; it must exist (the schema itself reads no file)."""
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise InputError(where, f"no such {'folder' if folder else 'file'}: {value} (resolved to {path.resolve()})")
    return path.resolve()


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
    folder = _existing("model.path", model_spec.path, folder=True)
    if model_spec.gguf_file and not (folder / model_spec.gguf_file).is_file():
        raise InputError("model.gguf_file", f"no GGUF file {model_spec.gguf_file!r} in {model_spec.path}")
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
    report.tokenizer = tokenizer
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
        for name, source in sources.items():  # named, not read: the hub is fetched by the first trial
            where = f"hub {source.hub_id} (split {source.split})" if source.path is None else _resolved(source.path)
            report.inputs.append(f"{name}: {where}, {source.kind} rows (read by the first trial)")
        return
    for name, source in sources.items():
        _existing(f"{name}.path", source.path, folder=False)
        _check_columns(name, source)
    try:
        train, evaluation = load_splits(data_spec)
    except (DataError, OSError, ValueError) as exc:  # ValueError: undecodable text
        culprit = next((name for name, source in reversed(sources.items()) if str(exc).startswith(source.path)),
                       "data")
        message = str(exc) if str(exc).startswith(sources[culprit].path) else f"{sources[culprit].path}: {exc}"
        raise InputError(f"{culprit}.path", message) from None
    skipped = train.skipped + evaluation.skipped
    report.train_pairs, report.eval_pairs = train.pairs, evaluation.pairs
    for name, source in sources.items():
        report.inputs.append(f"{name}: {_resolved(source.path)}")
    report.inputs[-1] += (f" ({len(train.pairs)} train pairs, {len(evaluation.pairs)} eval pairs"
                          f"{f'; {skipped} malformed rows skipped' if skipped else ''})")


def _check_columns(where: str, source) -> None:
    """A generic source's mapped columns are in its first row (a .jsonl file; other formats fail on reading)."""
    first = _first_jsonl_row(Path(source.path).expanduser()) if source.kind == "generic" else None
    if not isinstance(first, dict):
        return
    c = source.columns
    missing = [name for name in (c.prompt, c.chosen, c.rejected) if name not in first]
    if missing:
        raise InputError(where, f"columns {', '.join(map(repr, missing))} not in {source.path} (its columns: "
                                f"{', '.join(map(str, first))}); map them with {where}.columns")


def _first_jsonl_row(path: Path):
    """The first row of a local .jsonl(.gz) file, or None (another format, an empty or undecodable file)."""
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


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
    folder = _existing("reward.path", reward_spec.path, folder=True)
    _check_hf_folder("reward.path", folder)
    report.inputs.append(f"reward: {folder}")


def workdir_problem(workdir: Path) -> Optional[str]:
    """Why `workdir` cannot be used (created, or written), or None; creates nothing. Permissions are asked of the
    OS (os.access), so a read-only mount is seen even by root."""
    if workdir.exists():
        if not workdir.is_dir():
            return f"{workdir} is a file; workdir is the folder that holds checkpoints, samples and caches"
        return None if os.access(workdir, os.W_OK | os.X_OK) else f"{workdir} is not writable by this user"
    above = next(parent for parent in workdir.parents if parent.exists())
    if not above.is_dir():
        return f"{workdir} cannot be created: {above} is a file"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{workdir} cannot be created: {above} is not writable by this user (or a read-only file system)"
    return None


def check_workdir(spec, report: Preflight) -> None:
    workdir = _resolved(spec.workdir)
    problem = workdir_problem(workdir)
    if problem:
        raise InputError("workdir", problem)
    report.inputs.append(f"workdir: {workdir}")


def check_model_reads_the_data(spec, report: Preflight) -> None:
    """The built-in tiny model's tokenizer knows only the synthetic task's words: real text would be all <unk>
    (every reward margin 0, trials that finish and learn nothing)."""
    if spec.model.kind == "tiny" and spec.data.kind != "synthetic":
        raise InputError("model", f"the built-in tiny model reads only the synthetic task's vocabulary; {spec.data.kind} "
                                  "text would be unknown tokens. Give a real model (model: {kind: hf, path: ...})")


def check_eval_size(spec, report: Preflight) -> None:
    if report.eval_pairs is not None and len(report.eval_pairs) < spec.evaluation.num_prompts:
        where = "data.eval.path" if spec.data.eval is not None else "data.n_eval"
        raise InputError(where, f"{len(report.eval_pairs)} usable evaluation pairs, fewer than "
                                f"evaluation.num_prompts ({spec.evaluation.num_prompts}); every trial would "
                                "evaluate fewer prompts than the spec says")


TRUNCATION_SAMPLE = 2000    # pairs tokenized to see what max_length leaves of their responses
TRUNCATION_REFUSED = 0.5    # share of pairs with a response cut to a single token that is refused


def check_truncation(spec, report: Preflight) -> None:
    """Pairs whose prompt fills max_length keep one token of each response (the EOS at best): they carry no
    preference. A share of them is warned about with the count; most of them is refused."""
    pairs = report.train_pairs
    if pairs is None and spec.data.kind == "synthetic":  # its first pairs, generated as a trial generates them
        data = spec.data
        pairs = generate_split("train", min(data.n_train, TRUNCATION_SAMPLE), data.seed, data.label_noise)
    if pairs is None:
        return
    tokenizer = report.tokenizer
    if tokenizer is None and spec.model.kind == "tiny":
        from trainers.models import build_task_tokenizer  # torch is imported only once a check needs it

        tokenizer = build_task_tokenizer()
    if tokenizer is None:  # a hub or GGUF model: its tokenizer is read by the first trial
        return
    from trainers.data import encode_pairs

    encoded = encode_pairs(tokenizer, pairs[:TRUNCATION_SAMPLE], spec.training.max_length)
    cut = sum(min(len(p.chosen.ids) - p.chosen.prompt_len, len(p.rejected.ids) - p.rejected.prompt_len) <= 1
              for p in encoded)
    if not cut:
        return
    message = (f"{cut} of {len(encoded)} training pairs keep at most one token of a response at max_length "
               f"{spec.training.max_length} (their prompts fill it): those pairs carry no preference")
    if cut > TRUNCATION_REFUSED * len(encoded):
        raise InputError("training.max_length", message + "; raise max_length")
    report.warnings.append(message)


def _epoch_values(grid) -> list[int]:
    """The epochs a stage's trials train for (its grid, zip or space; 1 when it sets none)."""
    values = list(grid.grid.get("epochs", [])) + list(grid.zip.get("epochs", []))
    space = grid.space.get("epochs")
    if space is not None:
        values += list(getattr(space, "choices", None) or range_bounds(space))
    return [int(v) for v in values] or [1]


def check_rungs_act(spec, report: Preflight) -> None:
    """Rung settings that can never act: no preference trial's steps reach a rung (rung_steps past every trial's
    last step) or, under early stopping, the min_rung (rung_every placing fewer rungs). Refused under early stopping
    (it would stop nothing, silently); a warning for rungs without it (the rung/* curves stay empty)."""
    e = spec.evaluation
    pairs = len(report.train_pairs) if report.train_pairs is not None else getattr(spec.data, "n_train", None)
    if not e.has_rungs or pairs is None:
        return
    per_epoch = math.ceil(pairs / spec.training.batch_size)
    totals = {min(per_epoch * epochs, spec.training.max_steps or per_epoch * epochs)
              for grid in spec.stages.methods.values() for epochs in _epoch_values(grid)}
    reached = max((max(rungs_of(e, total).values(), default=0) for total in totals), default=0)
    stopping = spec.search.early_stopping
    where = "evaluation.rung_steps" if e.rung_steps else "evaluation.rung_every" if e.rung_every else "evaluation.rungs"
    steps = f"{min(totals)}" if len(totals) == 1 else f"{min(totals)} to {max(totals)}"
    if stopping is not None and reached < stopping.min_rung:
        raise InputError("search.early_stopping.min_rung" if reached else where,
                         f"early stopping can never stop a trial: the preference trials train {steps} steps, which "
                         f"reach {reached} rung(s) of {where}, below min_rung {stopping.min_rung}")
    if reached == 0:
        report.warnings.append(f"no preference trial reaches a rung of {where}: the trials train {steps} steps "
                               "(a rung on the last step is the final evaluation itself)")


# Each section's own check (what it points at), then the checks across sections.
SECTION_CHECKS: Registry[Callable] = Registry("spec section check", {
    "model": check_model, "data": check_data, "reward": check_reward})
SPEC_CHECKS: list[Callable] = [check_workdir, check_model_reads_the_data, check_eval_size, check_truncation,
                               check_rungs_act]


def preflight(spec) -> Preflight:
    """Check every input of `spec`; raises InputError on the first unusable one."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    report = Preflight()
    for section, check in SECTION_CHECKS.items():
        check(getattr(spec, section), report)
    for check in SPEC_CHECKS:
        check(spec, report)
    return report
