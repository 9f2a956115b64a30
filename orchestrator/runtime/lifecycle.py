"""A trial's run from lock to close, the same on every executor and torch-free: run_trial(task) -> TrialResult.

Exactly once per key: under the trial's lock (an flock on its folder, held for the whole attempt), a key that
already has a FINISHED run returns it instead of training again; RUNNING runs of the key belong to dead
attempts and are closed KILLED (or continued, when this attempt resumes their checkpoint). Between opening and
closing the run, a trial *body* does the work (orchestrator.core.outcome): by default the trainers' training and
evaluation, loaded lazily inside the worker (TRIAL_BODIES), so executors and the driver never import torch. The
body returns its outcome and this module records it, every write of the run's result here: metrics and cost,
samples, the checkpoint tag, kept weights, a stop. A body's failure is recorded FAILED with its reason and cost;
it never stops the sweep. An executor that got no result for a task (its worker or job died beyond retries)
records it with record_lost_trial.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from orchestrator.core.errors import failing_phase, failure_reason
from orchestrator.core.methods import METHODS, StageKind
from orchestrator.core.outcome import BodyFailed, DeviceUsage, Report, TrialBody, TrialOutcome, checkpointing
from orchestrator.core.registry import Registry
from orchestrator.core.rungs import TrialStopped, rung_signature, rung_value_key, stop_signature
from orchestrator.core.runs import RunStatus, TrialRecord, resume_done
from orchestrator.core.tags import (TAG_CHECKPOINT, TAG_FAILURE, TAG_INIT_FROM, TAG_INIT_KEY, TAG_KEY, TAG_METHOD,
                                    TAG_NODE, TAG_RESUMED, TAG_RUNG_SIGNATURE, TAG_SAMPLES, TAG_SAMPLES_SHA, TAG_STAGE,
                                    TAG_STAGE_KEY, TAG_STOPPED_AT_RUNG, TAG_STOPPED_AT_STEP, TAG_STOPPED_UNDER,
                                    TAG_STOP_REASON, TAG_SWEEP)
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.infra.errors import first_line
from orchestrator.infra.files import exclusive_lock, write_file_atomically, write_verified
from orchestrator.runtime.judge import AshaJudge
from orchestrator.runtime.kept_models import keep_models
from orchestrator.runtime.node_files import fetch_inputs, node_name, on_this_node, publish_outputs, shared_files
from orchestrator.runtime.store import is_unreachable
from orchestrator.runtime.trial_log import SystemMetrics, TrialLogger

# The trial body of every real trial, named lazily: it is loaded inside the worker, so neither the driver nor an
# executor imports torch (orchestrator.core.outcome says what a body is handed and returns).
TRIAL_BODIES: Registry[TrialBody] = Registry("trial body", {"train": "trainers.entry:train_and_evaluate"})


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


def cost_metrics(device: str, count: int, wall_seconds: float) -> dict[str, float]:
    """GPU-hours are wall time x GPUs held; a CPU trial holds none (its device-hours still say what it cost)."""
    gpus = count if device.startswith("cuda") else 0
    return {"wall_seconds": wall_seconds, "device_count": float(count),
            "device_hours": wall_seconds * count / 3600, "gpu_hours": wall_seconds * gpus / 3600}


def record_samples(task: TrialTask, logger: TrialLogger, samples: list[dict]) -> Path:
    """A trial's per-sample records where later stages and the report read them: WORKDIR/trials/<key>/
    samples.json (atomically, its sha256 beside it: the next stage's SFT baseline, checked where it is read) and
    the run's samples table, tagged with the path and the hash."""
    path = task.trial_dir / "samples.json"
    digest = write_verified(path, lambda tmp: Path(tmp).write_text(json.dumps(samples)))
    logger.log_samples(samples)
    logger.set_tags({TAG_SAMPLES: str(path), TAG_SAMPLES_SHA: digest})
    return path


def record_outcome(task: TrialTask, logger: TrialLogger, outcome: TrialOutcome) -> None:
    """What a finished body leaves besides its metrics: its samples, the checkpoint later stages start from (in
    the store too, without a shared workdir), and the weights it keeps (the run's model/ artifacts; the folder they
    were written to goes after)."""
    samples = None
    if outcome.samples is not None:
        with failing_phase("writing samples.json"):
            samples = record_samples(task, logger, outcome.samples)
    if outcome.checkpoint is not None:
        logger.set_tags({TAG_CHECKPOINT: str(outcome.checkpoint)})
        with failing_phase("publishing the checkpoint and samples to the tracking store"):
            publish_outputs(task, logger, outcome.checkpoint, samples)
    if outcome.weights is not None:
        try:
            with failing_phase("keeping the trained weights (run artifacts model/)"):
                logger.log_weights(outcome.weights)
        finally:
            shutil.rmtree(outcome.weights, ignore_errors=True)


@contextlib.contextmanager
def trial_lock(folder: Path):
    """Hold an exclusive lock on the trial's folder for the whole attempt. Two attempts of one key (a retry
    racing an orphan of a killed driver, a requeued job) never run at once; the second one waits, then finds
    the first one's FINISHED run and returns it. The lock dies with its process (flock), so nothing goes stale."""
    with exclusive_lock(folder / ".lock"):
        yield


def trial_tags(task: TrialTask) -> dict[str, str]:
    trial, runtime = task.trial, task.runtime
    tags = {TAG_SWEEP: runtime.sweep, TAG_STAGE: trial.stage, TAG_METHOD: trial.method,
            TAG_KEY: trial.trial_key, TAG_STAGE_KEY: runtime.stage_key}
    if runtime.init_trial_key:
        tags[TAG_INIT_KEY] = runtime.init_trial_key
    if trial.evaluation.has_rungs:
        tags[TAG_RUNG_SIGNATURE] = rung_signature(trial.evaluation, runtime.early_stopping)
    return tags


def _logger(task: TrialTask) -> TrialLogger:
    runtime = task.runtime
    return TrialLogger(runtime.tracking_uri, runtime.experiment_id, runtime.parent_run_id, runtime.served_root)


def _open_run(task: TrialTask, logger: TrialLogger, earlier: list[TrialRecord]) -> str:
    """Continue the run of the attempt whose checkpoint this one resumes, or start a new run. Other RUNNING
    runs of this key belong to dead attempts (this process holds the trial's lock): they are closed KILLED."""
    saving = checkpointing(task)
    run_id_file = task.trial_dir / "resume" / "run_id"
    resumable = saving is not None and saving.saved_step > 0 and run_id_file.is_file()
    resume_id = run_id_file.read_text().strip() if resumable else None
    for record in earlier:
        if record.status == RunStatus.RUNNING and record.run_id != resume_id:
            logger.close(record.run_id, RunStatus.KILLED)
    if resume_id and any(r.run_id == resume_id for r in earlier):
        logger.reopen(resume_id)
        logger.set_tags({TAG_RESUMED: str(saving.saved_step)})
        return resume_id
    if saving is not None:  # a fresh start: an old checkpoint without its run is not resumed
        shutil.rmtree(saving.folder, ignore_errors=True)
    run_id = logger.start(task.trial.run_name, {**trial_tags(task), TAG_NODE: node_name()}, trial_params(task))
    if saving is not None:
        write_file_atomically(run_id_file, lambda tmp: Path(tmp).write_text(run_id))
    return run_id


def _finished_result(task: TrialTask, runs: list[TrialRecord]) -> Optional[TrialResult]:
    """The result of the key's done run among `runs` (FINISHED; or STOPPED under the sweep's early-stopping rule:
    runs.resume_done), if any."""
    stopping = stop_signature(task.trial.evaluation, task.runtime.early_stopping)
    done = [r for r in runs if resume_done(r, stopping)]
    finished = next((r for r in done if r.status == RunStatus.FINISHED), None) or next(iter(done), None)
    if finished is None:
        return None
    return TrialResult(trial_key=finished.trial_key, run_id=finished.run_id, status=finished.status,
                       metrics=finished.metrics, wall_seconds=finished.metrics.get("wall_seconds", 0.0))


def run_trial(task: TrialTask, report: Optional[Report] = None, body: Optional[TrialBody] = None) -> TrialResult:
    """Run one trial exactly once per key. `body` is the trainers' training and evaluation (TRIAL_BODIES["train"],
    loaded here, in the worker) unless a probe replaces it (cluster.probe: dispatch benchmarks, executor tests).
    Without a shared workdir the trial's files are on its node's disk (runtime.node_files)."""
    task = on_this_node(task)
    with trial_lock(task.trial_dir):
        try:
            return _run_locked(task, report, body or TRIAL_BODIES["train"])
        except Exception as exc:  # noqa: BLE001 - only an unreachable store is turned into a result
            if not is_unreachable(exc):
                raise
            return _unrecorded_result(task, exc)


def _unrecorded_result(task: TrialTask, exc: BaseException) -> TrialResult:
    """The store did not answer even after MLflow's retries: the trial's run cannot be marked, so the driver
    is told (it stops the sweep; the run left RUNNING is closed KILLED by the rerun, which runs the trial)."""
    return TrialResult(trial_key=task.trial.trial_key, run_id=None, status=RunStatus.FAILED, unrecorded=True,
                       error=f"tracking store {task.runtime.tracking_uri} unreachable: {first_line(exc)}")


def _record_failure(task: TrialTask, logger: TrialLogger, run_id: str, exc: BaseException,
                    cost: dict[str, float]) -> TrialResult:
    reason = failure_reason(exc)
    logger.log_metrics(cost)
    logger.set_tags({TAG_FAILURE: reason[:5000]})
    with contextlib.suppress(OSError):  # the traceback file is extra; a full disk must not hide the FAILED
        logger.log_text("".join(traceback.format_exception(exc)), "failure.txt")
    logger.finish(RunStatus.FAILED)
    return TrialResult(trial_key=task.trial.trial_key, run_id=run_id, status=RunStatus.FAILED, error=reason,
                       metrics=cost, wall_seconds=cost["wall_seconds"])


def _drop_training_state(task: TrialTask) -> None:
    """Delete the trial's saved training state once its run has ended (finished or stopped): its outcome is
    logged, and neither is ever resumed."""
    saving = checkpointing(task)
    if saving is not None:
        shutil.rmtree(saving.folder, ignore_errors=True)


def stopped_run_name(run_name: str, rung: int) -> str:
    """'dpo b=0.1 lr=0.0001 e=1 (stopped at rung 1)': how a stopped trial's run reads in the MLflow UI."""
    return f"{run_name} (stopped at rung {rung})"


def _record_stop(task: TrialTask, logger: TrialLogger, run_id: str, stopped: TrialStopped,
                 cost: dict[str, float]) -> TrialResult:
    """End a run early stopping stopped: its cost, where and why it stopped, MLflow status FINISHED (it ended as
    planned; run_status reads it back STOPPED)."""
    decision = stopped.decision
    # MLflow has no STOPPED status (the run ends FINISHED: it ended as planned): its name and the runs view's
    # `posweep.stopped_at_rung` column show the stop in the UI
    logger.rename(stopped_run_name(task.trial.run_name, decision.rung))
    logger.log_metrics(cost)
    logger.set_tags({TAG_STOPPED_AT_STEP: str(decision.step),
                     TAG_STOPPED_AT_RUNG: str(decision.rung), TAG_STOP_REASON: stopped.reason[:5000],
                     TAG_STOPPED_UNDER: stop_signature(task.trial.evaluation, task.runtime.early_stopping)})
    logger.finish(RunStatus.FINISHED)
    _drop_training_state(task)
    return TrialResult(trial_key=task.trial.trial_key, run_id=run_id, status=RunStatus.STOPPED,
                       error=stopped.reason, metrics={**cost, "stopped_at_step": float(decision.step),
                                                      **{rung_value_key(k): v for k, v in stopped.values.items()}},
                       wall_seconds=cost["wall_seconds"])


def _record_finish(task: TrialTask, logger: TrialLogger, run_id: str, outcome: TrialOutcome,
                   cost: dict[str, float]) -> TrialResult:
    metrics = {**outcome.metrics, **cost}
    logger.log_metrics(metrics)
    logger.finish(RunStatus.FINISHED)
    _drop_training_state(task)
    _keep_models(task)
    return TrialResult(trial_key=task.trial.trial_key, run_id=run_id, status=RunStatus.FINISHED, metrics=metrics,
                       wall_seconds=metrics["wall_seconds"])


def _run_locked(task: TrialTask, report: Optional[Report], body: TrialBody) -> TrialResult:
    logger = _logger(task)
    earlier = logger.runs_of(task.trial.trial_key)
    done = _finished_result(task, earlier)
    if done is not None:
        return done
    run_id = _open_run(task, logger, earlier)
    started = time.monotonic()
    cost = lambda usage: cost_metrics(usage.device, usage.count, time.monotonic() - started)  # noqa: E731
    try:
        with _system_metrics(task, logger):
            task = _with_inputs(task, logger)
            outcome = body(task, logger, AshaJudge.for_trial(logger, task), checkpointing(task), report,
                           shared_files(task, logger))
            record_outcome(task, logger, outcome)
    except KeyboardInterrupt:
        logger.finish(RunStatus.KILLED)
        raise
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash of the sweep
        if is_unreachable(exc):
            raise
        usage = exc.usage if isinstance(exc, BodyFailed) else DeviceUsage(count=task.runtime.processes)
        cause = exc.__cause__ if isinstance(exc, BodyFailed) and exc.__cause__ is not None else exc
        return _record_failure(task, logger, run_id, cause, cost(usage))
    if outcome.stopped is not None:
        return _record_stop(task, logger, run_id, outcome.stopped, cost(outcome.usage))
    return _record_finish(task, logger, run_id, outcome, cost(outcome.usage))


def _with_inputs(task: TrialTask, logger: TrialLogger) -> TrialTask:
    """The task with the files it starts from on this node (runtime.node_files.fetch_inputs), said in its run."""
    with failing_phase("fetching the selected SFT trial's checkpoint and samples"):
        task, came = fetch_inputs(task, logger)
    if came:
        logger.set_tags({TAG_INIT_FROM: came})
    return task


def _system_metrics(task: TrialTask, logger: TrialLogger):
    interval = task.runtime.system_metrics_interval
    return SystemMetrics(logger, interval) if interval else contextlib.nullcontext()


def _keep_models(task: TrialTask) -> None:
    """A finished preference trial that kept its weights: apply checkpoints.keep to its method now, so
    superseded weights go as the sweep goes. The trial's outcome stands whatever happens here: the driver applies
    the policy again when its run ends, and says so if it still cannot."""
    runtime, method = task.runtime, task.trial.method
    if not runtime.keep_models or METHODS[method].kind is not StageKind.PREFERENCE:
        return
    if not runtime.shared_workdir:  # the policy deletes artifacts under the driver's disk: the driver applies it
        return
    try:
        keep_models(runtime.tracking_uri, runtime.sweep, method, runtime.keep_models, runtime.register_models,
                    runtime.workdir)
    except Exception as exc:  # noqa: BLE001 - retried by the driver at the end of its run
        print(f"warning: keeping the best {method} model after trial {task.trial.run_name} failed "
              f"({type(exc).__name__}: {first_line(exc)}); the sweep's driver retries it", file=sys.stderr)


def record_lost_trial(task: TrialTask, reason: str) -> TrialResult:
    """An executor got no result for `task` (its worker or job died beyond its retries): mark the attempt's
    RUNNING run FAILED with the reason, or create a FAILED run if it died before starting one."""
    logger = _logger(task)
    earlier = logger.runs_of(task.trial.trial_key)
    done = _finished_result(task, earlier)
    if done is not None:  # it did finish (or stop); only the report back was lost
        return done
    running = next((r for r in earlier if r.status == RunStatus.RUNNING), None)
    if running is not None:
        logger.reopen(running.run_id)
    else:
        logger.start(task.trial.run_name, trial_tags(task), trial_params(task))
    logger.set_tags({TAG_FAILURE: reason[:5000]})
    logger.finish(RunStatus.FAILED)
    return TrialResult(trial_key=task.trial.trial_key, run_id=logger.run_id, status=RunStatus.FAILED, error=reason,
                       lost=True)
