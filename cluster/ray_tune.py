"""Ray executor: every trial is a Ray task, submitted the moment a slot frees and awaited with ray.wait.

Ray places each task on a local Ray or an existing cluster with the resources the spec asks for (fractional GPUs
let small trials share a card) and retries a task whose worker process or node died (`max_failures`, Ray's
max_retries), or whose trial function raised (a tracking request broken by a server restart); the driver keeps at
most `slots` in flight. A trial's own failures (a diverged loss, a bad file) are not retried: the trial function
records them FAILED and returns, as on every executor. Resume is ours
(trial keys in MLflow, checkpoints in the trial folder). Only a ranks: ray_train trial writes under
WORKDIR/ray_results (its Ray Train run's logs). (The module keeps its name from when trials were Ray Tune trials.)
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

from cluster.base import BlockingRun, Progress, Submitted, TrialFn
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.runtime.lifecycle import record_lost_trial
from orchestrator.runtime.server import credential_env

# Ray Train (ranks: ray_train) may run on Tune: its per-trial CSV/JSON/TensorBoard loggers duplicate MLflow.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


# A trial whose ranks run as a Ray Train run only drives them (MLflow run, lock, the Train controller).
TRAIN_DRIVER_RESOURCES = {"cpu": 0.1}


def _ray_train_worker(config: dict) -> None:
    """One Ray Train worker = one rank; Ray Train formed the process group and set the env:// variables."""
    import ray.train

    from trainers.distributed import train_as_rank

    train_as_rank(config["task"], ray.train.get_context().get_world_rank(), config["out"])


def run_ray_train_ranks(task: TrialTask, out: Path) -> None:
    """A multi-process trial's ranks as a Ray Train run inside its Ray task: task.runtime.processes workers,
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


def _ray_trial(task_json: str, trial_fn: TrialFn, credential: dict[str, str]) -> str:
    """Runs in a Ray worker: one task. `credential`: the tracking server's login, which a worker on another node
    does not inherit (handed over in Ray's object store, never in a job's runtime_env, which Ray records)."""
    os.environ.update(credential)
    return trial_fn(TrialTask.model_validate_json(task_json)).model_dump_json()


def _lost_reason(error: BaseException, retries: int) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"the Ray worker running this trial died {retries + 1} time(s) (max_failures={retries}): "
            f"{type(error).__name__}: {first}")[:2000]


class RayExecutor(BlockingRun):
    parallel = True

    def __init__(self, spec):
        self.spec = spec
        self._owns_ray = False
        self._shared = None  # (trial_fn, remote function, its object ref, the login's object ref)

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
            ray.init(num_cpus=self.spec.num_cpus, _system_config=self._local_worker_config(), **options)
        self._owns_ray = True

    def _local_worker_config(self) -> dict:
        """Ray keeps at most num_cpus idle worker processes and kills the others after 1 s idle: with fractional-CPU
        trials (32 at once on 2 CPUs) a trial's worker often died between two trials and the next one paid a new
        Python and its imports (350 worker processes for 974 trials, measured). Keep one per slot."""
        cpus = self.spec.num_cpus or os.cpu_count() or 1
        slots = self.spec.max_concurrent_trials or math.floor(cpus / self.resources["cpu"])
        return {"num_workers_soft_limit": slots} if slots > cpus else {}

    @property
    def trains_with_ray_train(self) -> bool:
        return self.spec.rank_launch()[0] == "ray_train"

    @property
    def resources(self) -> dict[str, float]:
        """What each trial's Ray task reserves: the whole trial, or only the driver of its Ray Train run (whose
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

    def _remote(self, trial_fn: TrialFn):
        """The remote function and its shared arguments (the trial function and the login, put in the object store
        once per trial function)."""
        import ray

        if self._shared is None or self._shared[0] is not trial_fn:
            r = self.resources
            # retry_exceptions: an exception that escapes the trial function is not the trial's own failure (those are
            # recorded and returned) but its process's: a tracking request broken mid-response by a server restart
            # (IncompleteRead) failed a trial until it was retried, as Ray Tune retried it before issue 25
            options = dict(num_cpus=r["cpu"], max_retries=self.spec.max_failures, retry_exceptions=True)
            if r.get("gpu"):
                options["num_gpus"] = r["gpu"]
            self._shared = (trial_fn, ray.remote(_ray_trial).options(**options), ray.put(trial_fn),
                            ray.put(credential_env()))
        return self._shared[1:]

    def submit(self, task: TrialTask, trial_fn: TrialFn, progress: Optional[Progress] = None) -> Submitted:
        """A Ray task for the trial, retried by Ray (max_failures) when its worker process or node dies; Ray
        places it where its resources are free (drive keeps at most `slots` in flight)."""
        self._connect()
        remote, fn_ref, credential_ref = self._remote(trial_fn)
        ref = remote.remote(task.model_dump_json(), fn_ref, credential_ref)
        if progress:
            progress.trial_started(task)
        return Submitted(task, ref)

    def wait_any(self, pending: list[Submitted], progress: Optional[Progress] = None
                 ) -> list[tuple[Submitted, TrialResult]]:
        import ray

        by_ref = {h.ref: h for h in pending}
        ready, rest = ray.wait(list(by_ref), num_returns=1)  # blocks for the first; then whatever else is done
        more = ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
        return [(by_ref[ref], self._result(by_ref[ref])) for ref in [*ready, *more]]

    def _result(self, handle: Submitted) -> TrialResult:
        import ray

        try:
            return TrialResult.model_validate_json(ray.get(handle.ref))
        except ray.exceptions.RayTaskError as exc:  # raised outside the trial's own error handling, every retry
            return record_lost_trial(handle.task, f"the trial raised outside its own error handling "
                                                  f"{self.spec.max_failures + 1} time(s): "
                                                  f"{type(exc.cause).__name__}: {str(exc.cause)[:500]}")
        except ray.exceptions.RayError as exc:  # its worker process or node died beyond the retries
            return record_lost_trial(handle.task, _lost_reason(exc, self.spec.max_failures))

    def cancel(self, pending: list[Submitted]) -> None:
        import ray

        for handle in pending:
            ray.cancel(handle.ref, force=True)

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
