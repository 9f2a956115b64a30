"""The one function an executor calls: run_trial(task) -> TrialResult.

load -> train -> evaluate -> log. Any exception inside a trial (a diverged loss, an evaluation error)
marks that trial FAILED in MLflow with its reason and returns; it never stops the sweep.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers.utils import logging as hf_logging

from orchestrator import tracking
from orchestrator.spec import TrainHParams
from orchestrator.task import TrialResult, TrialTask
from trainers.cache import (cached_reference_logps, reference_cache_key, shared_encoded_pairs,
                            write_file_atomically)
from trainers.data import encode_pairs
from trainers.evaluate import EvalSettings, SftBaseline, evaluate
from trainers.methods import METHODS, Method
from trainers.models import ensure_base_model, load_causal_lm, load_tokenizer, save_model
from trainers.reward import load_reward_model
from trainers.sources import load_split
from trainers.train import (TOKEN_LOGIT_OBJECTIVES, LoopSettings, make_accelerator, preference_objective,
                            reference_logps, sft_objective, train)

Report = Callable[[int, int], None]  # (step, total_steps)

# Only SFT checkpoints are read by a later stage; preference-trial weights would cost disk per trial.
CHECKPOINTED_KINDS = {"sft"}

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def trial_params(task: TrialTask) -> dict[str, object]:
    """Hyperparameters under their own names (compare / parallel-coordinates views) plus the config."""
    trial = task.trial
    params: dict[str, object] = {**trial.hparams, "method": trial.method, "stage": trial.stage}
    for section in ("model", "data", "reward", "training", "evaluation"):
        for key, value in getattr(trial, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    if task.runtime.init_trial_key:
        params["init_trial_key"] = task.runtime.init_trial_key
    return params


def _trusts_remote_code(task: TrialTask) -> bool:
    """Only a model spec that says so runs a model repository's own code (the tiny model has no such field)."""
    return getattr(task.trial.model, "trust_remote_code", False)


def _load_starting_checkpoint(task: TrialTask, init: Path, device) -> torch.nn.Module:
    """A frozen copy of the checkpoint the trial starts from: the reference, and the SFT model for KL."""
    return load_causal_lm(init, device, _trusts_remote_code(task)).eval()


def _loop_settings(task: TrialTask) -> LoopSettings:
    t = task.trial.training
    return LoopSettings(learning_rate=float(task.trial.hparams["learning_rate"]),
                        epochs=int(task.trial.hparams["epochs"]), batch_size=t.batch_size,
                        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay,
                        max_grad_norm=t.max_grad_norm, max_steps=t.max_steps, seed=t.seed,
                        log_every=t.log_every)


def _method_hparams(task: TrialTask) -> dict[str, float]:
    return {k: v for k, v in task.trial.hparams.items() if k not in TrainHParams.model_fields}


def _reference(task: TrialTask, raw_pairs, pairs, tokenizer, init: Path, device, logger) -> tuple:
    """Reference log-probs of the training pairs under the starting checkpoint: read from the sweep's cache,
    or computed (the reference model is loaded only then, and freed before training starts)."""
    def compute():
        ref_model = _load_starting_checkpoint(task, init, device)
        return reference_logps(ref_model, pairs, tokenizer.pad_token_id, task.trial.training.batch_size, device)

    if not task.runtime.share_work:
        logger.set_tags({tracking.TAG_REF_CACHE: "off"})
        return compute()
    key = reference_cache_key(init, raw_pairs, task.trial.training.max_length)
    reference, hit = cached_reference_logps(Path(task.runtime.workdir) / "cache", key, len(pairs), compute)
    logger.set_tags({tracking.TAG_REF_CACHE: "hit" if hit else "miss"})
    return reference


def _build_objective(task: TrialTask, method: Method, raw_pairs, pairs, tokenizer, init: Path, device, logger):
    """(objective, the frozen reference model if training keeps one in memory, else None)."""
    if method.kind == "sft":
        return sft_objective, None
    if method.needs_reference_logits:  # explicit: this method cannot use the reference-log-prob cache
        logger.set_tags({tracking.TAG_REF_CACHE: "not used: the method needs the reference's token logits"})
        ref_model = _load_starting_checkpoint(task, init, device)
        return TOKEN_LOGIT_OBJECTIVES[method.name](_method_hparams(task), ref_model), ref_model
    reference = _reference(task, raw_pairs, pairs, tokenizer, init, device, logger) if method.needs_reference else None
    return preference_objective(method.name, _method_hparams(task), reference), None


def _sft_baseline(task: TrialTask, method: Method, init: Path, device, tokenizer, eval_pairs, reward,
                  settings: EvalSettings, sft_model=None) -> Optional[SftBaseline]:
    """The SFT model (for KL; reused when training already holds it) and its scores: read from the selected
    SFT trial's samples, or, with shared work off, generated and scored again by this trial."""
    if method.kind != "preference":
        return None
    if sft_model is None:
        sft_model = _load_starting_checkpoint(task, init, device)
    if task.runtime.share_work:
        if not task.runtime.sft_samples:
            raise ValueError("a preference trial needs the selected SFT trial's samples (runtime.sft_samples)")
        samples = json.loads(Path(task.runtime.sft_samples).read_text())
    else:
        _, samples = evaluate(sft_model, tokenizer, eval_pairs, reward, settings, device)
    return SftBaseline(sft_model, scores={s["prompt_id"]: s["score"] for s in samples},
                       chosen_scores={s["prompt_id"]: s["chosen_score"] for s in samples})


def _execute(task: TrialTask, method: Method, logger: tracking.TrialLogger,
             report: Optional[Report]) -> dict[str, float]:
    trial, workdir = task.trial, Path(task.runtime.workdir)
    torch.manual_seed(trial.training.seed)
    accelerator = make_accelerator()
    device = accelerator.device
    base = ensure_base_model(trial.model, workdir / "models")
    init = Path(task.runtime.init_checkpoint) if task.runtime.init_checkpoint else base
    remote = _trusts_remote_code(task)
    tokenizer = load_tokenizer(init, remote)
    model = load_causal_lm(init, device, remote)
    shared = task.runtime.share_work
    eval_data = load_split(trial.data, "eval", shared)
    steps, skipped, frozen_reference = 0, eval_data.skipped, None
    if method.kind != "untrained":
        train_data = load_split(trial.data, "train", shared)
        raw_pairs, skipped = train_data.pairs, skipped + train_data.skipped
        encode = lambda: encode_pairs(tokenizer, raw_pairs, trial.training.max_length)  # noqa: E731
        pairs = shared_encoded_pairs(init, raw_pairs, trial.training.max_length, encode) if shared else encode()
        objective, frozen_reference = _build_objective(task, method, raw_pairs, pairs, tokenizer, init, device,
                                                       logger)

        def on_log(step: int, total: int, stats: dict[str, float]) -> None:
            logger.log_metrics({f"train/{k}": v for k, v in stats.items()}, step)
            if report:
                report(step, total)

        history = train(model, pairs, objective, _loop_settings(task), tokenizer.pad_token_id, accelerator,
                        on_log)
        steps = int(history[-1]["step"]) if history else 0
        model = accelerator.unwrap_model(model)
    if method.kind in CHECKPOINTED_KINDS:
        checkpoint = save_model(model, tokenizer, task.trial_dir / "checkpoint")
        logger.set_tags({tracking.TAG_CHECKPOINT: str(checkpoint)})
    e = trial.evaluation
    settings = EvalSettings(e.temperature, e.top_p, e.max_new_tokens, e.num_prompts, e.seed, e.batch_size)
    reward = load_reward_model(trial.reward)
    sft = _sft_baseline(task, method, init, device, tokenizer, eval_data.pairs, reward, settings, frozen_reference)
    metrics, samples = evaluate(model, tokenizer, eval_data.pairs, reward, settings, device, sft)
    samples_path = task.trial_dir / "samples.json"
    write_file_atomically(samples_path, lambda tmp: Path(tmp).write_text(json.dumps(samples)))
    logger.log_samples(samples)
    logger.set_tags({tracking.TAG_SAMPLES: str(samples_path)})
    return {**metrics, "train_steps": float(steps), "data_skipped_rows": float(skipped)}


def run_trial(task: TrialTask, report: Optional[Report] = None) -> TrialResult:
    trial, runtime = task.trial, task.runtime
    method = METHODS[trial.method]
    logger = tracking.TrialLogger(runtime.tracking_uri, runtime.experiment_id, runtime.parent_run_id)
    tags = {tracking.TAG_SWEEP: runtime.sweep, tracking.TAG_STAGE: trial.stage, tracking.TAG_METHOD: trial.method,
            tracking.TAG_KEY: trial.trial_key}
    if runtime.init_trial_key:
        tags[tracking.TAG_INIT_KEY] = runtime.init_trial_key
    run_id = logger.start(trial.run_name, tags, trial_params(task))
    started = time.monotonic()
    try:
        metrics = _execute(task, method, logger, report)
    except KeyboardInterrupt:
        logger.finish("KILLED")
        raise
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash of the sweep
        reason = f"{type(exc).__name__}: {exc}"
        logger.set_tags({tracking.TAG_FAILURE: reason[:5000]})
        logger.log_text(traceback.format_exc(), "failure.txt")
        logger.finish("FAILED")
        return TrialResult(trial_key=trial.trial_key, run_id=run_id, status="FAILED", error=reason,
                           wall_seconds=time.monotonic() - started)
    metrics["wall_seconds"] = time.monotonic() - started
    logger.log_metrics(metrics)
    logger.finish("FINISHED")
    return TrialResult(trial_key=trial.trial_key, run_id=run_id, status="FINISHED", metrics=metrics,
                       wall_seconds=metrics["wall_seconds"])
