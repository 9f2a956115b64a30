"""Ray Tune executor: the pending trials of a batch become one Tune run (a grid over task indices).

Tune schedules trials on a local Ray or an existing cluster with the resources the spec asks for (fractional
GPUs let small trials share a card), caps concurrency, and retries a trial whose worker process or node died
(`max_failures`). A trial's own failures (a diverged loss, a bad file) are not retried: the trial function
records them FAILED and returns, as on every executor. Resume is ours (trial keys in MLflow, checkpoints in the
trial folder), not Tune's experiment restore: Tune's files under WORKDIR/ray_results are only its logs.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

from cluster.base import Progress, TrialFn
from orchestrator.core.runs import RunStatus
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.runtime.lifecycle import record_lost_trial
from orchestrator.runtime.server import credential_env

# Tune's per-trial CSV/JSON/TensorBoard loggers duplicate what MLflow holds and cost time per trial.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


# A Tune trial whose ranks run as a Ray Train run only drives them (MLflow run, lock, the Train controller).
TRAIN_DRIVER_RESOURCES = {"cpu": 0.1}


def _ray_train_worker(config: dict) -> None:
    """One Ray Train worker = one rank; Ray Train formed the process group and set the env:// variables."""
    import ray.train

    from trainers.distributed import train_as_rank

    train_as_rank(config["task"], ray.train.get_context().get_world_rank(), config["out"])


def run_ray_train_ranks(task: TrialTask, out: Path) -> None:
    """A multi-process trial's ranks as a Ray Train run inside its Tune trial: task.runtime.processes workers,
    each with task.runtime.rank_resources, placed wherever the cluster has them (several nodes for a trial
    larger than one); gloo on CPU, NCCL on GPUs. Worker 0 leaves its log and outcome in `out`, in the trial
    folder, which every node must see (the sweep's workdir is shared)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.distributed import RankFailed, last_line

    resources = dict(task.runtime.rank_resources)
    trainer = TorchTrainer(
        _ray_train_worker, train_loop_config={"task": task.model_dump_json(), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=task.runtime.processes, use_gpu=resources.get("GPU", 0) > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{task.trial.trial_key[:16]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=str(Path(task.runtime.workdir) / "ray_results")))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train wraps the worker's error; keep its last line
        raise RankFailed(f"the trial's Ray Train run failed: {type(exc).__name__}: {last_line(str(exc))}") from None


def _tune_trial(config: dict, tasks: list[str], trial_fn: TrialFn, credential: dict[str, str]) -> dict:
    """Runs in a Ray worker: one task by its index in the batch. `credential`: the tracking server's login, which a
    worker on another node does not inherit (handed over in Ray's object store, never in a job's runtime_env, which
    Ray records)."""
    os.environ.update(credential)
    task = TrialTask.model_validate_json(tasks[config["index"]])
    return {"result": trial_fn(task).model_dump_json()}


def _lost_reason(error: BaseException, retries: int) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"the Ray worker running this trial died {retries + 1} time(s) (max_failures={retries}): "
            f"{type(error).__name__}: {first}")[:2000]


class _ProgressCallback:
    """Forwards Tune's trial events to the driver's progress bar."""

    def __new__(cls, tasks: list[TrialTask], progress: Optional[Progress]):
        from ray.tune import Callback

        class ProgressCallback(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                if progress:
                    progress.trial_started(tasks[trial.config["index"]])

            def on_trial_complete(self, iteration, trials, trial, **info):
                if progress and trial.last_result.get("result"):
                    progress.trial_done(TrialResult.model_validate_json(trial.last_result["result"]))

            def on_trial_error(self, iteration, trials, trial, **info):
                if progress:
                    task = tasks[trial.config["index"]]
                    progress.trial_done(TrialResult(trial_key=task.trial.trial_key, run_id=None,
                                                    status=RunStatus.FAILED, error="worker died (retries exhausted)",
                                                    lost=True))

        return ProgressCallback()


class RayExecutor:
    parallel = True

    def __init__(self, spec):
        self.spec = spec
        self._owns_ray = False

    def start(self) -> None:
        """Connect to (or start) Ray now; the pipeline does it while the tracking server comes up."""
        self._connect()

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        if self.spec.address:
            ray.init(address=self.spec.address, **options)
        else:
            ray.init(num_cpus=self.spec.num_cpus, **options)
        self._owns_ray = True

    @property
    def trains_with_ray_train(self) -> bool:
        return self.spec.rank_launch()[0] == "ray_train"

    @property
    def resources(self) -> dict[str, float]:
        """What each Tune trial reserves: the whole trial, or only the driver of its Ray Train run (whose
        workers reserve the trial's resources themselves)."""
        if self.trains_with_ray_train:
            return TRAIN_DRIVER_RESOURCES
        r = self.spec.resources_per_trial
        return {"cpu": r.cpu, "gpu": r.gpu}

    @property
    def slots(self) -> int:
        """Trials that run at once: max_concurrent_trials, else what the cluster's CPUs/GPUs fit."""
        if self.spec.max_concurrent_trials:
            return self.spec.max_concurrent_trials
        import ray

        self._connect()
        total = ray.cluster_resources()
        fits = [math.floor(total.get("CPU", 1) / self.spec.resources_per_trial.cpu)]
        if self.spec.resources_per_trial.gpu:
            fits.append(math.floor(total.get("GPU", 0) / self.spec.resources_per_trial.gpu))
        return max(1, min(fits))

    def run(self, tasks: list[TrialTask], trial_fn: TrialFn, progress: Optional[Progress] = None
            ) -> list[TrialResult]:
        from ray import tune

        if not tasks:
            return []
        self._connect()
        trainable = tune.with_resources(
            tune.with_parameters(_tune_trial, tasks=[t.model_dump_json() for t in tasks], trial_fn=trial_fn,
                                 credential=credential_env()),
            self.resources)
        storage = Path(tasks[0].runtime.workdir) / "ray_results"
        tuner = tune.Tuner(
            trainable, param_space={"index": tune.grid_search(list(range(len(tasks))))},
            # Ray Train runs wait for all their workers at once: cap the drivers at what the cluster fits, so
            # no driver holds a slot while its workers cannot be placed
            tune_config=tune.TuneConfig(max_concurrent_trials=self.slots if self.trains_with_ray_train
                                        else self.spec.max_concurrent_trials, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{tasks[0].runtime.sweep}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                storage_path=str(storage), verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.spec.max_failures),
                callbacks=[_ProgressCallback(tasks, progress)]))
        results: list[Optional[TrialResult]] = [None] * len(tasks)
        for outcome in tuner.fit():
            index = outcome.config["index"]
            if outcome.error is None and (outcome.metrics or {}).get("result"):
                results[index] = TrialResult.model_validate_json(outcome.metrics["result"])
            else:
                error = outcome.error or RuntimeError("no result reported")
                results[index] = record_lost_trial(tasks[index], _lost_reason(error, self.spec.max_failures))
        return [r if r is not None else record_lost_trial(tasks[i], "Ray Tune returned no outcome for the trial")
                for i, r in enumerate(results)]

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
