"""Local executor: trials one after another in the driver (the embedded default), or `workers` at once, each in a
worker process of its own on this machine (started once and reused, like Ray's workers).

A worker that dies mid-trial (killed, out of memory) is replaced; its trial is recorded FAILED with the exit code
(record_lost_trial), not retried: on one machine whatever killed it would most likely kill it again.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
from typing import Optional

from cluster.base import BlockingRun, Progress, Submitted, TrialFn
from orchestrator.core.task import TrialResult, TrialTask
from orchestrator.infra.process import die_with_parent
from orchestrator.runtime.lifecycle import record_lost_trial

# A cancelled trial gets this long to close its run KILLED before its worker is killed.
CANCEL_GRACE_SECONDS = 10.0


def _serve(conn, trial_fn: TrialFn) -> None:
    """A worker process: run each task it is sent (JSON), send back its result (JSON); None ends it. Killed with
    the driver: an orphan would hold its trial's lock while its store is gone (a rerun closes its run KILLED)."""
    die_with_parent(signal.SIGKILL)
    while True:
        task_json = conn.recv()
        if task_json is None:
            return
        task = TrialTask.model_validate_json(task_json)
        try:
            conn.send(trial_fn(task).model_dump_json())
        except Exception as exc:  # noqa: BLE001 - escaped the trial's own error handling: lost, not a dead pool
            conn.send(f"error: {type(exc).__name__}: {str(exc)[:500]}")


class _Worker:
    def __init__(self, trial_fn: TrialFn):
        # spawn: a fresh interpreter (forking a driver with an MLflow client's open connections is not safe)
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, trial_fn), name="posweep-trial-worker")
        self.process.start()
        child.close()
        self.trial_fn = trial_fn

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LocalExecutor(BlockingRun):
    def __init__(self, spec=None):
        """Built from its spec section (EXECUTORS): {kind: local} runs trials in the driver; workers: N > 1 runs
        N at once in worker processes."""
        self.slots = getattr(spec, "workers", 1)
        self.parallel = self.slots > 1  # worker processes write the tracking store too: it needs a server
        self._idle: list[_Worker] = []

    def submit(self, task: TrialTask, trial_fn: TrialFn, progress: Optional[Progress] = None) -> Submitted:
        if not self.parallel:  # runs in the driver when waited on; ref: the trial function
            return Submitted(task, trial_fn)
        worker = next((w for w in self._idle if w.trial_fn is trial_fn and w.process.is_alive()), None)
        if worker is None:
            worker = _Worker(trial_fn)
        else:
            self._idle.remove(worker)
        worker.conn.send(task.model_dump_json())
        if progress:
            progress.trial_started(task)
        return Submitted(task, worker)

    def wait_any(self, pending: list[Submitted], progress: Optional[Progress] = None
                 ) -> list[tuple[Submitted, TrialResult]]:
        if not self.parallel:
            first = pending[0]
            if progress:
                progress.trial_started(first.task)
            return [(first, first.ref(first.task, report=progress.trial_step if progress else None))]
        by_conn = {h.ref.conn: h for h in pending}
        by_sentinel = {h.ref.process.sentinel: h for h in pending}
        ready = multiprocessing.connection.wait([*by_conn, *by_sentinel])
        done: dict[int, tuple[Submitted, TrialResult]] = {}
        for item in ready:
            handle = by_conn.get(item) or by_sentinel[item]
            if id(handle) not in done:
                done[id(handle)] = (handle, self._collect(handle))
        return list(done.values())

    def _collect(self, handle: Submitted) -> TrialResult:
        """The result a worker sent back, or the trial recorded lost if the worker died (a new one takes its
        place on the next submit)."""
        worker: _Worker = handle.ref
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join()
            worker.stop()
            return record_lost_trial(handle.task, f"the local worker process running this trial died (exit code "
                                                  f"{worker.process.exitcode})")
        if worker.process.is_alive():
            self._idle.append(worker)
        else:  # it sent its result, then died: not given another trial
            worker.stop()
        if reply.startswith("error: "):
            return record_lost_trial(handle.task, f"the trial raised outside its own error handling: {reply[7:]}")
        return TrialResult.model_validate_json(reply)

    def cancel(self, pending: list[Submitted]) -> None:
        """Interrupt the workers' trials (SIGINT, as Ctrl-C: each closes its run KILLED), then stop them."""
        if not self.parallel:
            return
        for handle in pending:
            if handle.ref.process.is_alive():
                os.kill(handle.ref.process.pid, signal.SIGINT)
        for handle in pending:
            handle.ref.process.join(timeout=CANCEL_GRACE_SECONDS)
            handle.ref.stop()

    def close(self) -> None:
        for worker in self._idle:
            worker.stop()
        self._idle = []
