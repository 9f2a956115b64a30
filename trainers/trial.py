"""The one function an executor calls: run_trial(task) -> TrialResult.

load -> train -> evaluate -> log. Any exception inside a trial (a diverged loss, an evaluation error)
marks that trial FAILED in MLflow with its reason and returns; it never stops the sweep.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers.utils import logging as hf_logging

from orchestrator import tracking
from orchestrator.errors import first_line
from orchestrator.spec import TrainHParams
from orchestrator.task import TrialResult, TrialTask
from trainers.adapters import AdapterDisabled, apply_lora, is_lora, merged
from trainers.cache import (cached_reference_logps, exclusive_lock, reference_cache_key, shared_encoded_pairs,
                            write_file_atomically)
from trainers.data import encode_pairs
from trainers.evaluate import EvalSettings, SftBaseline, evaluate
from trainers.logprobs import choose_layout, describe_head
from trainers.methods import METHODS, Method
from trainers.models import ensure_base_model, load_causal_lm, load_tokenizer, save_model
from trainers.reward import load_reward_model
from trainers.sources import load_split, load_splits
from trainers.train import (TOKEN_LOGIT_OBJECTIVES, CheckpointWriteError, Checkpointing, LoopSettings, NonFiniteLoss,
                            full_state_dict, is_sharded, make_accelerator, preference_objective, reference_logps,
                            sft_objective, train)

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
                        log_every=t.log_every, precision=t.precision, micro_batch_size=t.micro_batch_size,
                        sharding=task.runtime.sharding, padding_free=t.padding_free)


def _method_hparams(task: TrialTask) -> dict[str, float]:
    return {k: v for k, v in task.trial.hparams.items() if k not in TrainHParams.model_fields}


def _reference_model(task: TrialTask, init: Path, device, policy) -> torch.nn.Module:
    """The starting checkpoint as a frozen reference: a LoRA policy with its adapters off (no second copy in
    memory), else the checkpoint loaded again."""
    return AdapterDisabled(policy) if is_lora(policy) else _load_starting_checkpoint(task, init, device)


def _reference(task: TrialTask, raw_pairs, pairs, tokenizer, init: Path, device, logger, policy) -> tuple:
    """Reference log-probs of the training pairs under the starting checkpoint: read from the sweep's cache,
    or computed (the reference model is loaded only then, and freed before training starts)."""
    def compute():
        ref_model = _reference_model(task, init, device, policy)
        t = task.trial.training  # forward passes of at most the micro-batch: training fits, so this fits
        return reference_logps(ref_model, pairs, tokenizer.pad_token_id, t.micro_batch_size or t.batch_size, device,
                               t.padding_free)

    if not task.runtime.share_work:
        logger.set_tags({tracking.TAG_REF_CACHE: "off"})
        return compute()
    key = reference_cache_key(init, raw_pairs, task.trial.training.max_length)
    reference, hit = cached_reference_logps(Path(task.runtime.workdir) / "cache", key, len(pairs), compute)
    logger.set_tags({tracking.TAG_REF_CACHE: "hit" if hit else "miss"})
    return reference


def _build_objective(task: TrialTask, method: Method, raw_pairs, pairs, tokenizer, init: Path, device, logger,
                     policy):
    """(objective, the frozen reference model if training keeps one in memory, else None)."""
    if method.kind == "sft":
        return sft_objective, None
    if method.needs_reference_logits:  # explicit: this method cannot use the reference-log-prob cache
        logger.set_tags({tracking.TAG_REF_CACHE: "not used: the method needs the reference's token logits"})
        ref_model = _reference_model(task, init, device, policy)
        return TOKEN_LOGIT_OBJECTIVES[method.name](_method_hparams(task), ref_model), ref_model
    reference = (_reference(task, raw_pairs, pairs, tokenizer, init, device, logger, policy)
                 if method.needs_reference else None)
    return preference_objective(method.name, _method_hparams(task), reference), None


def _sft_baseline(task: TrialTask, method: Method, init: Path, device, tokenizer, eval_pairs, reward,
                  settings: EvalSettings, policy, sft_model=None) -> Optional[SftBaseline]:
    """The SFT model (for KL; reused when training already holds it, the policy with adapters off under LoRA)
    and its scores: read from the selected SFT trial's samples, or, with shared work off, generated and
    scored again by this trial."""
    if method.kind != "preference":
        return None
    if sft_model is None:
        sft_model = _reference_model(task, init, device, policy)
    if task.runtime.share_work:
        if not task.runtime.sft_samples:
            raise ValueError("a preference trial needs the selected SFT trial's samples (runtime.sft_samples)")
        samples = json.loads(Path(task.runtime.sft_samples).read_text())
    else:
        _, samples = evaluate(sft_model, tokenizer, eval_pairs, reward, settings, device)
    return SftBaseline(sft_model, scores={s["prompt_id"]: s["score"] for s in samples},
                       chosen_scores={s["prompt_id"]: s["chosen_score"] for s in samples})


def _checkpointing(task: TrialTask) -> Optional[Checkpointing]:
    every = task.runtime.checkpoint_every
    return Checkpointing(task.trial_dir / "resume", every) if every else None


def _trainable_model(model, training, method: Method) -> torch.nn.Module:
    """The loaded checkpoint set up for training: activation checkpointing, LoRA adapters (spec: training)."""
    if not method.trains:
        return model
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, training.lora) if training.lora else model


def _gathered_model(sharded, init: Path, device, remote: bool, accelerator) -> Optional[torch.nn.Module]:
    """The trained weights as one plain model on the main process (None elsewhere), for the checkpoint and
    evaluation, which rank 0 runs alone: the shards are gathered (every process takes part) and loaded into
    the starting checkpoint's architecture."""
    weights = full_state_dict(sharded)
    if not accelerator.is_main_process:
        return None
    model = load_causal_lm(init, device, remote)
    model.load_state_dict(weights)
    return model.eval()


def device_usage(accelerator, processes: int = 1) -> tuple[str, int]:
    """(device description, device count) of this trial, for cost accounting: its processes (one device
    each), or what the accelerator spans."""
    device = accelerator.device
    count = max(processes, accelerator.num_processes)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}", count
    return device.type, count


def cost_metrics(device: str, count: int, wall_seconds: float) -> dict[str, float]:
    """GPU-hours are wall time x GPUs held; a CPU trial holds none (its device-hours still say what it cost)."""
    gpus = count if device.startswith("cuda") else 0
    return {"wall_seconds": wall_seconds, "device_count": float(count),
            "device_hours": wall_seconds * count / 3600, "gpu_hours": wall_seconds * gpus / 3600}


def record_samples(task: TrialTask, logger: tracking.TrialLogger, samples: list[dict]) -> Path:
    """A trial's per-sample records where later stages and the report read them: WORKDIR/trials/<key>/
    samples.json (atomically; the next stage's SFT baseline) and the run's samples table, tagged with the path."""
    path = task.trial_dir / "samples.json"
    write_file_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(samples)))
    logger.log_samples(samples)
    logger.set_tags({tracking.TAG_SAMPLES: str(path)})
    return path


class TrialPhaseError(RuntimeError):
    """A trial's failure, saying in which phase (and after which training step) it happened."""


@contextlib.contextmanager
def failing_phase(name: str):
    """Re-raise an error of the block as TrialPhaseError("NAME failed: Type: message"), so the FAILED run's
    posweep.failure tag says where the trial broke; errors that already say it, and a lost store, pass as is."""
    try:
        yield
    except (TrialPhaseError, NonFiniteLoss, CheckpointWriteError):
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with its phase
        if tracking.is_unreachable(exc):
            raise
        raise TrialPhaseError(f"{name} failed: {type(exc).__name__}: {exc}") from exc


def failure_reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, TrialPhaseError) else f"{type(exc).__name__}: {exc}"


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


def execute(task: TrialTask, method: Method, logger: tracking.TrialLogger, report: Optional[Report],
            accelerator) -> dict[str, float]:
    """Load, train, evaluate and log one trial in this process (one rank of it, in a multi-process trial:
    only the main process saves the checkpoint and evaluates)."""
    trial, workdir = task.trial, Path(task.runtime.workdir)
    torch.manual_seed(trial.training.seed)
    device = accelerator.device
    shared = task.runtime.share_work
    timings: dict[str, float] = {}
    with failing_phase("loading the model and data"), timed(timings, "load"):
        # the main process builds a missing base folder (in a multi-process trial transformers writes
        # model files from the main process only); the others then find it ready
        with accelerator.main_process_first():
            base = ensure_base_model(trial.model, workdir / "models")
        init = Path(task.runtime.init_checkpoint) if task.runtime.init_checkpoint else base
        remote = _trusts_remote_code(task)
        tokenizer = load_tokenizer(init, remote)
        model = _trainable_model(load_causal_lm(init, device, remote), trial.training, method)
        if method.trains:
            train_data, eval_data = load_splits(trial.data, shared)
        else:
            train_data, eval_data = None, load_split(trial.data, "eval", shared)
    steps, skipped, frozen_reference = 0, eval_data.skipped, None
    if train_data is not None:
        raw_pairs, skipped = train_data.pairs, skipped + train_data.skipped
        encode = lambda: encode_pairs(tokenizer, raw_pairs, trial.training.max_length)  # noqa: E731
        with failing_phase("preparing the objective (tokenized pairs, reference log-probs and their cache)"), \
                timed(timings, "reference"):
            logger.set_tags({tracking.TAG_LAYOUT: layout_tag(model, trial.training)})
            pairs = shared_encoded_pairs(init, raw_pairs, trial.training.max_length, encode) if shared else encode()
            objective, frozen_reference = _build_objective(task, method, raw_pairs, pairs, tokenizer, init, device,
                                                           logger, model)

        def on_log(step: int, total: int, stats: dict[str, float]) -> None:
            logger.log_metrics({f"train/{k}": v for k, v in stats.items()}, step)
            if report:
                report(step, total)

        with failing_phase("training"), timed(timings, "train"):
            history = train(model, pairs, objective, _loop_settings(task), tokenizer.pad_token_id, accelerator,
                            on_log, _checkpointing(task))
        steps = int(history[-1]["step"]) if history else 0
        model = accelerator.unwrap_model(model)
        if is_sharded(model):
            with failing_phase(f"gathering the sharded model (after training step {steps})"), timed(timings, "train"):
                model = _gathered_model(model, init, device, remote, accelerator)
    if not accelerator.is_main_process:
        return {}
    if method.kind in CHECKPOINTED_KINDS:
        with failing_phase(f"saving the checkpoint (after training step {steps})"), timed(timings, "checkpoint"):
            model = merged(model)  # LoRA: adapters folded in, so the next stage loads a plain model
            checkpoint = save_model(model, tokenizer, task.trial_dir / "checkpoint")
        logger.set_tags({tracking.TAG_CHECKPOINT: str(checkpoint)})
    e = trial.evaluation
    settings = EvalSettings(e.temperature, e.top_p, e.max_new_tokens, e.num_prompts, e.seed, e.batch_size,
                            trial.training.padding_free)
    with failing_phase(f"evaluation (after training step {steps})"), timed(timings, "eval"):
        reward = load_reward_model(trial.reward)
        sft = _sft_baseline(task, method, init, device, tokenizer, eval_data.pairs, reward, settings, model,
                            frozen_reference)
        metrics, samples = evaluate(model, tokenizer, eval_data.pairs, reward, settings, device, sft)
    with failing_phase("writing samples.json"):
        record_samples(task, logger, samples)
    return {**metrics, "train_steps": float(steps), "data_skipped_rows": float(skipped), **timings}


@contextlib.contextmanager
def trial_lock(folder: Path):
    """Hold an exclusive lock on the trial's folder for the whole attempt. Two attempts of one key (a retry
    racing an orphan of a killed driver, a requeued job) never run at once; the second one waits, then finds
    the first one's FINISHED run and returns it. The lock dies with its process (flock), so nothing goes stale."""
    with exclusive_lock(folder / ".lock"):
        yield


def _trial_tags(task: TrialTask) -> dict[str, str]:
    trial, runtime = task.trial, task.runtime
    tags = {tracking.TAG_SWEEP: runtime.sweep, tracking.TAG_STAGE: trial.stage, tracking.TAG_METHOD: trial.method,
            tracking.TAG_KEY: trial.trial_key, tracking.TAG_STAGE_KEY: runtime.stage_key}
    if runtime.init_trial_key:
        tags[tracking.TAG_INIT_KEY] = runtime.init_trial_key
    return tags


def _open_run(task: TrialTask, logger: tracking.TrialLogger, earlier: list[tracking.TrialRecord]) -> str:
    """Continue the run of the attempt whose checkpoint this one resumes, or start a new run. Other RUNNING
    runs of this key belong to dead attempts (this process holds the trial's lock): they are closed KILLED."""
    checkpointing = _checkpointing(task)
    run_id_file = task.trial_dir / "resume" / "run_id"
    resumable = checkpointing is not None and checkpointing.saved_step > 0 and run_id_file.is_file()
    resume_id = run_id_file.read_text().strip() if resumable else None
    for record in earlier:
        if record.status == "RUNNING" and record.run_id != resume_id:
            logger.close(record.run_id, "KILLED")
    if resume_id and any(r.run_id == resume_id for r in earlier):
        logger.reopen(resume_id)
        logger.set_tags({tracking.TAG_RESUMED: str(checkpointing.saved_step)})
        return resume_id
    if checkpointing is not None:  # a fresh start: an old checkpoint without its run is not resumed
        shutil.rmtree(checkpointing.folder, ignore_errors=True)
    run_id = logger.start(task.trial.run_name, _trial_tags(task), trial_params(task))
    if checkpointing is not None:
        write_file_atomically(run_id_file, lambda tmp: Path(tmp).write_text(run_id))
    return run_id


def _finished_result(runs: list[tracking.TrialRecord]) -> Optional[TrialResult]:
    """The result of the key's FINISHED run among `runs`, if it has one."""
    finished = next((r for r in runs if r.status == "FINISHED"), None)
    if finished is None:
        return None
    return TrialResult(trial_key=finished.trial_key, run_id=finished.run_id, status="FINISHED",
                       metrics=finished.metrics, wall_seconds=finished.metrics.get("wall_seconds", 0.0))


# body(task, logger, report, accelerator) -> metrics: what a trial does between opening and closing its run.
TrialBody = Callable[[TrialTask, tracking.TrialLogger, Optional[Report], object], dict[str, float]]


def _train_and_evaluate(task: TrialTask, logger: tracking.TrialLogger, report: Optional[Report],
                        accelerator) -> dict[str, float]:
    if task.runtime.processes > 1:  # rank 0 logs into this run; the others log nothing
        from trainers.distributed import launch_ranks, launched, train_with_launched_ranks

        if launched():  # the cluster started the other ranks (SLURM tasks)
            return train_with_launched_ranks(task, logger, report)
        return launch_ranks(task, logger.run_id)  # spawned here, or a Ray Train run
    return execute(task, METHODS[task.trial.method], logger, report, accelerator)


def run_trial(task: TrialTask, report: Optional[Report] = None,
              body: TrialBody = _train_and_evaluate) -> TrialResult:
    """Run one trial exactly once per key: under the trial's lock, a key that already has a FINISHED run
    returns it instead of training again. `body` is the real training and evaluation except in probes
    (trainers.probe) that measure an executor's dispatch."""
    with trial_lock(task.trial_dir):
        try:
            return _run_locked(task, report, body)
        except Exception as exc:  # noqa: BLE001 - only an unreachable store is turned into a result
            if not tracking.is_unreachable(exc):
                raise
            return _unrecorded_result(task, exc)


def _unrecorded_result(task: TrialTask, exc: BaseException) -> TrialResult:
    """The store did not answer even after MLflow's retries: the trial's run cannot be marked, so the driver
    is told (it stops the sweep; the run left RUNNING is closed KILLED by the rerun, which runs the trial)."""
    return TrialResult(trial_key=task.trial.trial_key, run_id=None, status="FAILED", unrecorded=True,
                       error=f"tracking store {task.runtime.tracking_uri} unreachable: {first_line(exc)}")


def _run_locked(task: TrialTask, report: Optional[Report], body: TrialBody) -> TrialResult:
    trial, runtime = task.trial, task.runtime
    logger = tracking.TrialLogger(runtime.tracking_uri, runtime.experiment_id, runtime.parent_run_id)
    earlier = logger.runs_of(trial.trial_key)
    done = _finished_result(earlier)
    if done is not None:
        return done
    run_id = _open_run(task, logger, earlier)
    started = time.monotonic()
    accelerator = make_accelerator()
    device, count = device_usage(accelerator, task.runtime.processes)
    logger.set_tags({tracking.TAG_DEVICE: device})
    try:
        metrics = body(task, logger, report, accelerator)
    except KeyboardInterrupt:
        logger.finish("KILLED")
        raise
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash of the sweep
        if tracking.is_unreachable(exc):
            raise
        reason = failure_reason(exc)
        cost = cost_metrics(device, count, time.monotonic() - started)
        logger.log_metrics(cost)
        logger.set_tags({tracking.TAG_FAILURE: reason[:5000]})
        with contextlib.suppress(OSError):  # the traceback file is extra; a full disk must not hide the FAILED
            logger.log_text(traceback.format_exc(), "failure.txt")
        logger.finish("FAILED")
        return TrialResult(trial_key=trial.trial_key, run_id=run_id, status="FAILED", error=reason,
                           metrics=cost, wall_seconds=cost["wall_seconds"])
    metrics.update(cost_metrics(device, count, time.monotonic() - started))
    logger.log_metrics(metrics)
    logger.finish("FINISHED")
    checkpointing = _checkpointing(task)
    if checkpointing is not None:  # the result is logged; the training state is only disk now
        shutil.rmtree(checkpointing.folder, ignore_errors=True)
    return TrialResult(trial_key=trial.trial_key, run_id=run_id, status="FINISHED", metrics=metrics,
                       wall_seconds=metrics["wall_seconds"])


def record_lost_trial(task: TrialTask, reason: str) -> TrialResult:
    """An executor got no result for `task` (its worker or job died beyond its retries): mark the attempt's
    RUNNING run FAILED with the reason, or create a FAILED run if it died before starting one."""
    logger = tracking.TrialLogger(task.runtime.tracking_uri, task.runtime.experiment_id, task.runtime.parent_run_id)
    earlier = logger.runs_of(task.trial.trial_key)
    done = _finished_result(earlier)
    if done is not None:  # it did finish; only the report back was lost
        return done
    running = next((r for r in earlier if r.status == "RUNNING"), None)
    if running is not None:
        logger.reopen(running.run_id)
    else:
        logger.start(task.trial.run_name, _trial_tags(task), trial_params(task))
    logger.set_tags({tracking.TAG_FAILURE: reason[:5000]})
    logger.finish("FAILED")
    return TrialResult(trial_key=task.trial.trial_key, run_id=logger.run_id, status="FAILED", error=reason,
                       lost=True)
