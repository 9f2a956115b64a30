"""The trial body in one process: load -> train -> evaluate, returning the trial's outcome (execute).

The runtime runs it (trainers.entry is where it enters): it hands the body a TrialLog for the training curves and
tags, the RungJudge for early stopping and where to checkpoint, and records the outcome returned here: metrics,
samples, the SFT checkpoint, the weights to keep, or the rung the trial was stopped at (orchestrator.core.outcome).
Any exception names the phase it broke in (TrialPhaseError), which becomes the FAILED run's reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers.utils import logging as hf_logging

from orchestrator.core.errors import failing_phase as any_failing_phase
from orchestrator.core.methods import Method, StageKind
from orchestrator.core.outcome import Checkpointing, Report, RungJudge, SharedFiles, TrialLog, TrialOutcome
from orchestrator.core.rungs import TrialStopped, rungs_of
from orchestrator.core.spec import TrainHParams
from orchestrator.core.tags import TAG_EVAL_CUTS, TAG_LAYOUT, TAG_REF_CACHE, TAG_REF_CACHE_SHA
from orchestrator.core.task import TrialTask
from orchestrator.infra.files import folder_problem, sidecar, verified_mismatch
from trainers.adapters import AdapterDisabled, apply_lora, is_lora, merged
from trainers.cache import (cached_reference_logps, reference_cache_key, reference_cache_name, reference_cache_path,
                            shared_encoded_pairs)
from trainers.data import encode_pairs
from trainers.evaluate import EvalSettings, SftBaseline, evaluate
from trainers.logprobs import choose_layout, describe_head
from trainers.models import ensure_base_model, load_causal_lm, load_tokenizer, save_model
from trainers.objectives import Objective, build_objective
from trainers.reward import load_reward_model
from trainers.rungs import RungEvaluator, rung_subset
from trainers.sources import LoadedPairs, load_split, load_splits
from trainers.train import (AfterStep, CheckpointWriteError, LoopHooks, LoopSettings, NonFiniteLoss, full_state_dict,
                            is_sharded, reference_logps, train)

# Only SFT checkpoints are read by a later stage; preference-trial weights would cost disk per trial.
CHECKPOINTED_KINDS = {StageKind.SFT}

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


@dataclass
class TrialContext:
    """What the phases of one trial share once its model and data are loaded."""
    task: TrialTask
    method: Method
    logger: TrialLog
    judge: RungJudge
    checkpointing: Optional[Checkpointing]
    accelerator: object
    init: Path              # the checkpoint it starts from (the base model, or the selected SFT trial's)
    tokenizer: object
    model: torch.nn.Module  # the policy (LoRA-wrapped when training.lora is set)
    shared_files: Optional[SharedFiles] = None  # cache entries between nodes that share no disk (BodyHooks.shared)
    _reward: Optional[object] = None
    _start: Optional[torch.nn.Module] = None  # the starting checkpoint, once loaded (start_model)
    _baseline: Optional[SftBaseline] = None   # what a preference trial compares against, once built

    def reward(self):
        """The gold reward model, loaded once (rung evaluations and the final one share it)."""
        if self._reward is None:
            self._reward = load_reward_model(self.task.trial.reward)
        return self._reward

    def sft_baseline(self, eval_pairs, held: Optional[torch.nn.Module] = None) -> Optional[SftBaseline]:
        """The SFT baseline over all the evaluation pairs (None for a trial that is not a preference trial), built
        once: the rung evaluations and the final one share it (the selected SFT trial's samples read and checked
        once; with shared work off, the SFT model's generations made once)."""
        if self._baseline is None:
            self._baseline = _sft_baseline(self, eval_pairs, self.reward(), eval_settings(self.task.trial), held)
        return self._baseline

    def start_model(self, held: Optional[torch.nn.Module] = None) -> torch.nn.Module:
        """The starting checkpoint, frozen (the SFT model of a preference trial): `held` when training already
        holds it, else loaded once (reference_model) and kept for the rest of the trial, so rung evaluations and
        the final one share one copy."""
        if held is not None:
            return held
        if self._start is None:
            self._start = self.reference_model()
        return self._start

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def remote(self) -> bool:
        """Only a model spec that says so runs a model repository's own code (the tiny model has no such field)."""
        return getattr(self.task.trial.model, "trust_remote_code", False)

    @property
    def shared(self) -> bool:
        return self.task.runtime.share_work

    def reference_model(self) -> torch.nn.Module:
        """The starting checkpoint as a frozen reference (and the SFT model for KL): a LoRA policy with its
        adapters off (no second copy in memory), else the checkpoint loaded again."""
        if is_lora(self.model):
            return AdapterDisabled(self.model)
        return load_causal_lm(self.init, self.device, self.remote).eval()


def _loop_settings(task: TrialTask, pad_id: int) -> LoopSettings:
    t = task.trial.training
    return LoopSettings(learning_rate=float(task.trial.hparams["learning_rate"]),
                        epochs=int(task.trial.hparams["epochs"]), batch_size=t.batch_size,
                        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay,
                        max_grad_norm=t.max_grad_norm, max_steps=t.max_steps, seed=t.seed,
                        log_every=t.log_every, precision=t.precision, micro_batch_size=t.micro_batch_size,
                        sharding=task.runtime.sharding, padding_free=t.padding_free, pad_id=pad_id)


def _method_hparams(task: TrialTask) -> dict[str, float]:
    return {k: v for k, v in task.trial.hparams.items() if k not in TrainHParams.model_fields}


def _reference(ctx: TrialContext, raw_pairs, pairs) -> tuple:
    """Reference log-probs of the training pairs under the starting checkpoint: read from the sweep's cache,
    or computed (the reference model is loaded only then, and freed before training starts)."""
    training = ctx.task.trial.training

    def compute():  # forward passes of at most the micro-batch: training fits, so this fits
        return reference_logps(ctx.reference_model(), pairs, ctx.tokenizer.pad_token_id,
                               training.micro_batch_size or training.batch_size, ctx.device, training.padding_free)

    if not ctx.shared:
        ctx.logger.set_tags({TAG_REF_CACHE: "off"})
        return compute()
    key = reference_cache_key(ctx.init, raw_pairs, training.max_length)
    cache_dir = Path(ctx.task.runtime.workdir) / "cache"
    path, name = reference_cache_path(cache_dir, key), reference_cache_name(key)
    # nodes without a shared disk: another node's entry from the store before computing one here
    fetched = (ctx.shared_files is not None and verified_mismatch(path) is not None
               and ctx.shared_files.fetch(name, path))
    reference, hit = cached_reference_logps(cache_dir, key, len(pairs), compute)
    if not hit and ctx.shared_files is not None:
        ctx.shared_files.publish(name, path)
    how = ("fetched from the store" if fetched else "hit") if hit else "miss"
    ctx.logger.set_tags({TAG_REF_CACHE: how, TAG_REF_CACHE_SHA: sidecar(path).read_text().strip()})
    return reference


def _objective(ctx: TrialContext, raw_pairs, pairs) -> tuple[Objective, Optional[torch.nn.Module]]:
    """(objective, the frozen reference model if training keeps one in memory, else None)."""
    method, hparams = ctx.method, _method_hparams(ctx.task)
    if method.needs_reference_logits:  # explicit: this method cannot use the reference-log-prob cache
        ctx.logger.set_tags({TAG_REF_CACHE: "not used: the method needs the reference's token logits"})
        ref_model = ctx.reference_model()
        return build_objective(method, hparams, ref_model=ref_model), ref_model
    reference = _reference(ctx, raw_pairs, pairs) if method.needs_reference else None
    return build_objective(method, hparams, reference), None


def _sft_baseline(ctx: TrialContext, eval_pairs, reward, settings: EvalSettings,
                  sft_model=None) -> Optional[SftBaseline]:
    """The SFT model (for KL; reused when training already holds it, the policy with adapters off under LoRA)
    and its scores: read from the selected SFT trial's samples, or, with shared work off, generated and
    scored again by this trial."""
    if ctx.method.kind is not StageKind.PREFERENCE:
        return None
    sft_model = ctx.start_model(sft_model)
    if ctx.shared:
        if not ctx.task.runtime.sft_samples:
            raise ValueError("a preference trial needs the selected SFT trial's samples (runtime.sft_samples)")
        problem = verified_mismatch(Path(ctx.task.runtime.sft_samples), unrecorded_ok=True)
        if problem:
            raise ValueError(f"the selected SFT trial's samples cannot be trusted: {problem}")
        samples = json.loads(Path(ctx.task.runtime.sft_samples).read_text())
    else:
        samples = evaluate(sft_model, ctx.tokenizer, eval_pairs, reward, settings, ctx.device).samples
    return SftBaseline(sft_model, scores={s["prompt_id"]: s["score"] for s in samples},
                       chosen_scores={s["prompt_id"]: s["chosen_score"] for s in samples})


def _trainable_model(model, training, method: Method) -> torch.nn.Module:
    """The loaded checkpoint set up for training: activation checkpointing, LoRA adapters (spec: training)."""
    if not method.trains:
        return model
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, training.lora) if training.lora else model


def _gathered_model(ctx: TrialContext, sharded) -> Optional[torch.nn.Module]:
    """The trained weights as one plain model on the main process (None elsewhere), for the checkpoint and
    evaluation, which rank 0 runs alone: the shards are gathered (every process takes part) and loaded into
    the starting checkpoint's architecture."""
    weights = full_state_dict(sharded)
    if not ctx.accelerator.is_main_process:
        return None
    model = load_causal_lm(ctx.init, ctx.device, ctx.remote)
    model.load_state_dict(weights)
    return model.eval()


def failing_phase(name: str):
    """core.errors.failing_phase for the phases of a trial: the loop's own errors say their step already, and an
    early stop is not a failure."""
    return any_failing_phase(name, (NonFiniteLoss, CheckpointWriteError, TrialStopped))


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    """Add the block's wall time to timings[f"time_{name}_s"]: where a trial's hours go (its metrics)."""
    started = time.monotonic()
    try:
        yield
    finally:
        key = f"time_{name}_s"
        timings[key] = timings.get(key, 0.0) + time.monotonic() - started


def layout_tag(model, training) -> str:
    """How this trial lays out its rows and computes log-probs (tag posweep.layout), e.g. 'packed rows, prompt
    shared by a pair's responses; chunked log-probs at the scored positions'."""
    return f"{choose_layout(model, training.padding_free, training.max_length).describe()}; {describe_head(model)}"


def _load(task: TrialTask, method: Method, hooks: "BodyHooks", accelerator) -> tuple[TrialContext, Optional[LoadedPairs],
                                                                          LoadedPairs]:
    """The model (set up for training), its tokenizer and the data splits the trial needs."""
    trial = task.trial
    # the main process builds a missing base folder (in a multi-process trial transformers writes model files
    # from the main process only); the others then find it ready
    with accelerator.main_process_first():
        base = ensure_base_model(trial.model, Path(task.runtime.workdir) / "models")
    init = Path(task.runtime.init_checkpoint) if task.runtime.init_checkpoint else base
    problem = folder_problem(init)
    if problem:  # never train from weights that are not the ones their trial wrote
        raise ValueError(f"the starting checkpoint cannot be trusted: {problem}")
    remote = getattr(trial.model, "trust_remote_code", False)
    model = _trainable_model(load_causal_lm(init, accelerator.device, remote), trial.training, method)
    ctx = TrialContext(task, method, hooks.log, hooks.judge, hooks.checkpointing, accelerator, init,
                       load_tokenizer(init, remote), model, hooks.shared)
    if method.trains:
        train_data, eval_data = load_splits(trial.data, ctx.shared)
        return ctx, train_data, eval_data
    return ctx, None, load_split(trial.data, "eval", ctx.shared)


def _train(ctx: TrialContext, train_data: LoadedPairs, eval_data: LoadedPairs, report: Optional[Report],
           timings: dict[str, float]) -> tuple[int, Optional[torch.nn.Module]]:
    """Tokenize, build the objective (reference log-probs) and train; (steps, the frozen reference model if
    training held one). ctx.model becomes the trained, unwrapped (and gathered, if sharded) model."""
    task, training = ctx.task, ctx.task.trial.training
    raw_pairs = train_data.pairs
    encode = lambda: encode_pairs(ctx.tokenizer, raw_pairs, training.max_length)  # noqa: E731
    with failing_phase("preparing the objective (tokenized pairs, reference log-probs and their cache)"), \
            timed(timings, "reference"):
        ctx.logger.set_tags({TAG_LAYOUT: layout_tag(ctx.model, training)})
        pairs = shared_encoded_pairs(ctx.init, raw_pairs, training.max_length, encode) if ctx.shared else encode()
        objective, frozen_reference = _objective(ctx, raw_pairs, pairs)

    def on_log(step: int, total: int, stats: dict[str, float]) -> None:
        ctx.logger.log_metrics({f"train/{k}": v for k, v in stats.items()}, step)
        if report:
            report(step, total)

    after_step = _rung_hook(ctx, eval_data, frozen_reference, timings)
    with failing_phase("training"), timed(timings, "train"):
        history = train(ctx.model, pairs, objective, _loop_settings(task, ctx.tokenizer.pad_token_id), ctx.accelerator,
                        LoopHooks(on_log, after_step), ctx.checkpointing)
    timings["time_train_s"] -= timings.get("time_rungs_s", 0.0)  # the rungs ran inside the loop: their own line
    steps = int(history[-1]["step"]) if history else 0
    ctx.model = ctx.accelerator.unwrap_model(ctx.model)
    if is_sharded(ctx.model):
        with failing_phase(f"gathering the sharded model (after training step {steps})"), timed(timings, "train"):
            ctx.model = _gathered_model(ctx, ctx.model)
    return steps, frozen_reference


def eval_settings(trial, num_prompts: Optional[int] = None) -> EvalSettings:
    """The trial's evaluation settings (spec: evaluation), over `num_prompts` prompts if given."""
    e = trial.evaluation
    return EvalSettings(e.temperature, e.top_p, e.max_new_tokens, num_prompts or e.num_prompts, e.seed,
                        e.batch_size, e.batch_tokens, e.max_prompt_length or trial.training.max_length,
                        e.precision, e.engine, trial.training.padding_free)


def _rung_hook(ctx: TrialContext, eval_data: LoadedPairs, frozen_reference,
               timings: dict[str, float]) -> Optional[AfterStep]:
    """What the loop calls after each step when the trial has evaluation.rungs: at a rung's step, evaluate on
    the rung subset (trainers.rungs) and let the judge log the metrics and decide (TrialStopped ends the trial)."""
    trial = ctx.task.trial
    e = trial.evaluation
    if not e.has_rungs:
        return None
    subset = rung_subset(eval_data.pairs, e.num_prompts, e.rung_prompts, e.seed)
    settings = eval_settings(trial, len(subset))
    evaluator = RungEvaluator(ctx.tokenizer, subset, ctx.reward(), settings, ctx.device, trial.training.max_length,
                              lambda: ctx.start_model(frozen_reference),
                              lambda: ctx.sft_baseline(eval_data.pairs, frozen_reference))
    placement = functools.cache(lambda total: rungs_of(e, total))  # {step: rung}; a trial's total never changes

    def after_step(step: int, total: int, model: torch.nn.Module) -> None:
        rung = placement(total).get(step)
        if rung is None:
            return
        with failing_phase(f"the evaluation at rung {rung} (training step {step})"), timed(timings, "rungs"):
            metrics = evaluator(model)
        ctx.judge(rung, step, metrics)

    return after_step


def _evaluate(ctx: TrialContext, eval_data: LoadedPairs, steps: int, frozen_reference,
              timings: dict[str, float]) -> TrialOutcome:
    """Save the checkpoint (SFT) and the weights to keep, evaluate on the held-out prompts; the outcome."""
    trial, outcome = ctx.task.trial, TrialOutcome()
    if ctx.method.kind in CHECKPOINTED_KINDS:
        with failing_phase(f"saving the checkpoint (after training step {steps})"), timed(timings, "checkpoint"):
            ctx.model = merged(ctx.model)  # LoRA: adapters folded in, so the next stage loads a plain model
            outcome.checkpoint = save_model(ctx.model, ctx.tokenizer, ctx.task.trial_dir / "checkpoint")
    settings = eval_settings(trial)
    with failing_phase(f"evaluation (after training step {steps})"), timed(timings, "eval"):
        sft = ctx.sft_baseline(eval_data.pairs, frozen_reference)
        evaluation = evaluate(ctx.model, ctx.tokenizer, eval_data.pairs, ctx.reward(), settings, ctx.device, sft)
    ctx.logger.set_tags({TAG_EVAL_CUTS: ", ".join(f"{k} {v}" for k, v in evaluation.usage.cuts().items())})
    outcome.samples = evaluation.samples
    if ctx.task.runtime.keep_models and ctx.method.kind is StageKind.PREFERENCE:
        # the trained model, as the run's model/ artifacts (checkpoints.keep: which of them stay is decided once the
        # run FINISHED, orchestrator.runtime.kept_models); this folder is only the upload's source
        with failing_phase("saving the trained weights to keep"), timed(timings, "checkpoint"):
            outcome.weights = save_model(merged(ctx.model), ctx.tokenizer, ctx.task.trial_dir / "weights")
    outcome.metrics = {**evaluation.metrics, **evaluation.usage.metrics()}
    return outcome


@dataclass(frozen=True)
class BodyHooks:
    """What the runtime hands a trial body besides its task (orchestrator.core.outcome.TrialBody's arguments)."""
    log: TrialLog
    judge: RungJudge
    checkpointing: Optional[Checkpointing] = None
    report: Optional[Report] = None
    shared: Optional[SharedFiles] = None  # cache entries between nodes that share no disk


def execute(task: TrialTask, method: Method, hooks: BodyHooks, accelerator) -> TrialOutcome:
    """Load, train and evaluate one trial in this process (one rank of it, in a multi-process trial: only the main
    process saves the checkpoint and evaluates; the others return an empty outcome). A trial early stopping ends
    returns as stopped. The outcome's usage is the caller's to set (trainers.entry)."""
    torch.manual_seed(task.trial.training.seed)
    timings: dict[str, float] = {}
    with failing_phase("loading the model and data"), timed(timings, "load"):
        ctx, train_data, eval_data = _load(task, method, hooks, accelerator)
    steps, skipped, frozen_reference = 0, eval_data.skipped, None
    if train_data is not None:
        skipped += train_data.skipped
        try:
            steps, frozen_reference = _train(ctx, train_data, eval_data, hooks.report, timings)
        except TrialStopped as stopped:
            return TrialOutcome(stopped=stopped)
    if not accelerator.is_main_process:
        return TrialOutcome()
    outcome = _evaluate(ctx, eval_data, steps, frozen_reference, timings)
    outcome.metrics.update({"train_steps": float(steps), "data_skipped_rows": float(skipped), **timings})
    return outcome
