"""SLURM executor through submitit: one job per trial, submitted when a slot frees (array_parallelism in flight).

Every job runs the trial function in a fresh Python on a compute node and is a submitit
Checkpointable: when Slurm preempts it or its time runs out, submitit requeues it, and the trial resumes
from the training state it saves every `checkpoint_every` steps (trainers.train.Checkpointing); a job
requeued by hand (`scontrol requeue`) resumes the same way. A trial of processes_per_trial N > 1 is one job
of N tasks (srun, on nodes_per_trial nodes) whose tasks are its ranks (trainers.distributed.run_launched).

Job states without accounting. submitit reads job states through `sacct`, which needs slurmdbd; on a
cluster without it, a cancelled job would never be reported done and a driver waiting on `result()` would
wait forever. So this executor does not ask sacct: a job is finished when its result file exists, alive
while `squeue` lists it (pending, running, requeued), and lost when it has left the queue without a result,
which is recorded FAILED with the reason instead of waited on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

import submitit

from cluster.base import BlockingRun, Progress, Submitted, TrialFn
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.runtime.lifecycle import record_lost_trial

# A job that left squeue gets this long for its result file to appear (it is written just before the exit).
RESULT_GRACE_SECONDS = 10.0


class SlurmTrial(submitit.helpers.Checkpointable):
    """The callable a job runs (pickled by submitit). Checkpointable: on preemption or time-out submitit
    requeues the same task, and the trial resumes from its own checkpoint on disk."""

    def __init__(self, trial_fn: TrialFn):
        self.trial_fn = trial_fn

    def __call__(self, task_json: str) -> str:
        task = TrialTask.model_validate_json(task_json)
        job = submitit.JobEnvironment()
        if job.num_tasks == 1:
            return self.trial_fn(task).model_dump_json()
        # a multi-process trial: srun started this job's tasks; each is one rank (trainers.distributed)
        from trainers.distributed import RankEnvironment, run_launched

        env = submitit.helpers.TorchDistributedEnvironment()
        rank = RankEnvironment(env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr,
                            env.master_port)
        result = run_launched(self.trial_fn, task, rank)
        return result.model_dump_json() if result is not None else ""  # the driver reads task 0's result


# Pending reasons that no waiting fixes by itself: no node of the partition can take the job (drained, down,
# too small) or the partition is down. Such a job is cancelled after `unschedulable_timeout_min`.
UNSCHEDULABLE_REASONS = ("ReqNodeNotAvail", "NodeDown", "Nodes required for job are DOWN", "PartitionDown",
                         "PartitionInactive", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints")


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id (array tasks as MASTER_INDEX) -> (Slurm state, reason), for the jobs squeue still lists."""
    masters = sorted({j.split("_")[0] for j in job_ids})
    if not masters:
        return {}
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(masters)], capture_output=True,
                          text=True)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise RuntimeError(f"squeue failed: {proc.stderr.strip()}")
    rows = (line.split("|", 2) for line in proc.stdout.splitlines() if line.count("|") == 2)
    return {job: (state, reason) for job, state, reason in rows}


def unschedulable(state: str, reason: str) -> bool:
    return state == "PENDING" and reason.startswith(UNSCHEDULABLE_REASONS)


class SlurmExecutor(BlockingRun):
    parallel = True

    def __init__(self, spec):
        self.spec = spec
        self._seen: dict[str, dict[str, float]] = {}  # job id -> when it was first seen started/stuck/gone
        self._submitter = None  # ((folder, job name), the submitit executor)

    @property
    def slots(self) -> int:
        return self.spec.array_parallelism

    def _executor(self, folder: Path, name: str):
        s = self.spec
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                         slurm_max_num_timeout=s.max_requeues)
        params = dict(name=name, timeout_min=s.timeout_min, cpus_per_task=s.cpus_per_task,
                      slurm_array_parallelism=s.array_parallelism)
        if s.processes_per_trial > 1:  # one task per rank, launched by srun; GPUs per node shared by its tasks
            params.update(nodes=s.nodes_per_trial, tasks_per_node=s.processes_per_trial // s.nodes_per_trial)
        if s.gpus_per_node:
            params["gpus_per_node"] = s.gpus_per_node
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.sbatch_options:
            params["slurm_additional_parameters"] = dict(s.sbatch_options)
        executor.update_parameters(**params)
        return executor

    def submit(self, task: TrialTask, trial_fn: TrialFn, progress: Optional[Progress] = None) -> Submitted:
        """One job for the trial (sbatch through submitit); Slurm queues it, drive keeps at most
        array_parallelism submitted."""
        folder = Path(self.spec.folder or Path(task.runtime.workdir) / "slurm")
        name = f"posweep-{task.runtime.sweep}"
        if self._submitter is None or self._submitter[0] != (folder, name):
            self._submitter = ((folder, name), self._executor(folder, name))
        executor = self._submitter[1]
        return Submitted(task, executor.submit(SlurmTrial(trial_fn), task.model_dump_json()))

    def wait_any(self, pending: list[Submitted], progress: Optional[Progress] = None
                 ) -> list[tuple[Submitted, TrialResult]]:
        """Poll squeue every poll_seconds until a job has a result or has left the queue without one (or could not
        be scheduled for unschedulable_timeout_min)."""
        while True:
            states = queue_states([h.ref.job_id for h in pending])
            done = [(h, r) for h in pending
                    for r in [self._poll(h, states.get(h.ref.job_id, (None, "")), progress)] if r is not None]
            for handle, _ in done:
                self._seen.pop(handle.ref.job_id, None)
            if done:
                return done
            time.sleep(self.spec.poll_seconds)

    def _poll(self, handle: Submitted, queue_state: tuple[Optional[str], str], progress: Optional[Progress]
              ) -> Optional[TrialResult]:
        """The job's result if it ended (lost ones recorded FAILED with the reason), else None."""
        job, task, (state, reason) = handle.ref, handle.task, queue_state
        now, seen = time.monotonic(), self._seen.setdefault(job.job_id, {})
        if state is not None and unschedulable(state, reason):
            if now - seen.setdefault("stuck", now) > self.spec.unschedulable_timeout_min * 60:
                subprocess.run(["scancel", job.job_id], capture_output=True)
                return record_lost_trial(task, f"slurm job {job.job_id} could not be scheduled for "
                                               f"{self.spec.unschedulable_timeout_min:g} min ({reason}); cancelled")
        else:
            seen.pop("stuck", None)
        if state == "RUNNING" and "started" not in seen:
            seen["started"] = now
            if progress:
                progress.trial_started(task)
        result = self._result(job, task)
        if result is None and state is None:
            if now - seen.setdefault("gone", now) > RESULT_GRACE_SECONDS:
                return record_lost_trial(task, f"slurm job {job.job_id} left the queue without a result (cancelled, "
                                               "node failure, or out of time and requeues)")
        elif state is not None:
            seen.pop("gone", None)
        return result

    def cancel(self, pending: list[Submitted]) -> None:
        if pending:
            subprocess.run(["scancel", *[h.ref.job_id for h in pending]], capture_output=True)

    @staticmethod
    def _result(job, task: TrialTask) -> Optional[TrialResult]:
        """The job's TrialResult once its result file exists (an exception in the job is a lost trial too)."""
        if job.num_tasks > 1:  # a multi-process trial: task 0 ran the trial and returns its result
            job = job.task(0)
        if not job.paths.result_pickle.exists():
            return None
        try:
            return TrialResult.model_validate_json(job.result())
        except Exception as exc:  # noqa: BLE001 - the job raised outside the trial's own error handling
            # job.result() re-raises the job's exception; that task is lost, not the batch
            return record_lost_trial(task, f"slurm job {job.job_id} raised: {type(exc).__name__}: {str(exc)[:500]}")
