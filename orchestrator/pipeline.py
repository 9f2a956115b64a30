"""The stages pipeline: base -> SFT grid -> pick the best SFT checkpoint -> preference grids -> summary.

Resume is ours: every planned trial whose key already has a FINISHED run in the sweep's experiment is
skipped; RUNNING leftovers of a dead driver are closed as KILLED and their trials run again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from analysis.summary import best_per_stage, trials_frame
from cluster import drive, make_executor
from orchestrator.core.methods import StageKind
from orchestrator.core.runs import (OUTCOMES, SELECTION_METRIC, RunStatus, TrialRecord, best_first, ended,
                                    latest_per_key, resume_done, running_per_key)
from orchestrator.core.spec import SweepSpec
from orchestrator.core.tags import (TAG_CHECKPOINT, TAG_CHECKPOINT_ARTIFACT, TAG_SAMPLES, TAG_SAMPLES_SHA,
                                    TAG_STAGE_KEY, TAG_WEIGHTS)
from orchestrator.core.task import TrialResult, TrialRuntime, TrialTask
from orchestrator.core.trials import TrialSpec
from orchestrator.grid import StagePlan, plan_sweep, preference_stages, tracked_name
from orchestrator.infra.files import exclusive_lock, folder_problem, verified_mismatch
from orchestrator.progress import Output, TrialProgress
from orchestrator.runtime.kept_models import keep_models, registered_model_name, verify_kept_best
from orchestrator.runtime.lifecycle import run_trial
from orchestrator.runtime.server import store_for_workers
from orchestrator.runtime.store import local_artifact_root, prepare_store, redacted, unreachable_artifacts
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.search import run_search, study_name, study_storage


class SweepError(RuntimeError):
    """The sweep cannot go on (not a single trial's failure, which is recorded and passed over)."""


@dataclass
class SweepOutcome:
    stages: list[StagePlan]
    records: list[TrialRecord]   # the latest run of every planned trial key
    skipped: int
    ran: int
    failed: int
    wall_seconds: float
    stopped: int = 0             # trials of this run early stopping ended at a rung
    models: dict[str, str] = field(default_factory=dict)  # registered model -> version of its alias `best`

    @property
    def summary(self) -> pd.DataFrame:
        frame = trials_frame(r.model_dump() for r in self.records)
        return best_per_stage(frame, [s.stage for s in self.stages], SELECTION_METRIC)


def _stage_description(stage: StagePlan, sweep: str) -> str:
    what = (f"an Optuna search ({stage.search.settings.sampler}) of {stage.size} trials" if stage.search
            else f"{stage.size} trials")
    return (f"Sweep **{sweep}**, stage **{stage.stage}**: {what} (child runs). "
            "Compare them on mean_score, win_vs_chosen, win_vs_sft, kl and length.")


def stage_records(records: list[TrialRecord], stage: StagePlan) -> list[TrialRecord]:
    """The runs that belong to a stage: a grid stage's planned keys, a searched stage's stage_key tag."""
    if stage.search:
        return [r for r in records if r.stage == stage.stage and r.tags.get(TAG_STAGE_KEY) == stage.stage_key]
    keys = {t.trial_key for t in stage.trials}
    return [r for r in records if r.trial_key in keys]


def done_keys(records: list[TrialRecord], stage: StagePlan, spec: SweepSpec) -> set[str]:
    """The stage's keys a rerun does not run again: a grid stage's done keys (resume_done); a search's ended runs
    (its budget counts FAILED and STOPPED ones too, as Optuna was told of them)."""
    runs = stage_records(records, stage)
    if stage.search:
        return {r.trial_key for r in ended(runs)}
    stopping = stage.stop_signature(spec)
    return {r.trial_key for r in runs if resume_done(r, stopping)}


def to_run(records: list[TrialRecord], stage: StagePlan, spec: SweepSpec) -> int:
    """How many of the stage's trials `sweep run` would run now: the planned ones (the search budget) that are
    neither done (done_keys) nor running. One count for `run`, `status` and `plan`."""
    running = {r.trial_key for r in running_per_key(stage_records(records, stage))}
    done = done_keys(records, stage, spec)
    return max(stage.size - len(done) - len(running - done), 0)


def stale_stops(records: list[TrialRecord], stage: StagePlan, spec: SweepSpec) -> int:
    """The stage's keys whose only outcome is a stop decided under another early-stopping rule than the spec's now
    (other rungs, η, metric, or early stopping since turned off): a grid runs them again, a search keeps them."""
    stopping = stage.stop_signature(spec)
    runs = latest_per_key(stage_records(records, stage))
    return sum(r.status == RunStatus.STOPPED and not resume_done(r, stopping) for r in runs)


def start_order(tasks: list[TrialTask], seed: Optional[int]) -> list[TrialTask]:
    """The order trials start in: the grid's, or under early stopping (seed given) shuffled with `seed`, so the
    first trials at each rung (which always go on, and set the bar) are not all one corner of the grid."""
    if seed is None:
        return tasks
    shuffled = list(tasks)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def select_init(records: list[TrialRecord], stage: StagePlan, shared_workdir: bool = True) -> dict[str, str]:
    """Runtime fields that point preference trials at the best finished trial of `stage`: its folder on the shared
    workdir, or (shared_workdir false) its run, whose artifacts hold the checkpoint (runtime.node_files)."""
    finished = [r for r in latest_per_key(stage_records(records, stage)) if r.status == RunStatus.FINISHED]
    if not finished:
        raise SweepError(f"no trial of stage {stage.stage!r} finished, so there is no checkpoint to start the "
                         "preference stages from; see the FAILED runs' posweep.failure tag")
    best = min(finished, key=lambda r: best_first(r.metrics.get(SELECTION_METRIC, float("nan")), r.trial_key))
    if not shared_workdir:
        if TAG_CHECKPOINT_ARTIFACT not in best.tags or TAG_SAMPLES_SHA not in best.tags:
            raise SweepError(f"the selected {stage.stage} trial {best.run_name!r} (run {best.run_id}) ran with a "
                             "shared workdir: its checkpoint is on that disk, not in the tracking store. Delete that "
                             "run in MLflow and rerun (it runs again), or set executor.shared_workdir: true")
        return {"init_run_id": best.run_id, "init_trial_key": best.trial_key}
    checkpoint, samples = best.tags.get(TAG_CHECKPOINT), best.tags.get(TAG_SAMPLES)
    if not checkpoint or not Path(checkpoint).is_dir() or not samples or not Path(samples).is_file():
        raise SweepError(f"the selected {stage.stage} trial {best.run_name!r} (run {best.run_id}) has no "
                         f"checkpoint/samples at {checkpoint} on the driver's disk: the workdir was removed or moved, "
                         "or the trial ran on a node that does not share it (executor.shared_workdir: false is for "
                         "clusters without a shared disk). Delete that run in MLflow (or use a fresh tracking store) "
                         "and rerun")
    problem = folder_problem(Path(checkpoint)) or verified_mismatch(Path(samples), unrecorded_ok=True)
    if problem:  # preference trials would start from, or compare against, what that trial did not write
        raise SweepError(f"the selected {stage.stage} trial {best.run_name!r} (run {best.run_id}) left files that "
                         f"cannot be trusted: {problem}. Delete that run in MLflow and rerun: it runs again")
    return {"init_checkpoint": checkpoint, "init_trial_key": best.trial_key, "sft_samples": samples}


def check_artifacts_reachable(tracker: SweepTracker, shared_workdir: bool, served: bool) -> None:
    """Without a shared workdir, trials on other nodes must reach the sweep's artifacts through the store: the
    server this sweep started (`served`) serves them; an experiment whose artifacts are paths on a disk, in a store
    used directly or through a user's server that does not proxy them, cannot give them to other nodes."""
    if shared_workdir or served:
        return
    location = tracker.artifact_location
    if unreachable_artifacts(location):
        raise SweepError(f"executor.shared_workdir is false, but sweep {tracker.sweep!r} keeps its artifacts at "
                         f"{location}, a path on one disk that trials on other nodes cannot reach: use a SQLite "
                         "store (sweep run serves its artifacts), an MLflow server started with --serve-artifacts, "
                         "or set executor.shared_workdir: true")


# Stages that can run side by side: the untrained baseline with the SFT grid, then every preference method
# together (they all start from the picked SFT checkpoint), so an executor's slots are not idle at a
# stage boundary.
def phases(stages: list[StagePlan]) -> list[list[StagePlan]]:
    first = [s for s in stages if s.kind is not StageKind.PREFERENCE]
    return [first, [s for s in stages if s not in first]]


def runtime_fields(spec: SweepSpec, tracker: SweepTracker, tracking_uri: str, share_work: bool,
                   store_uri: str) -> dict:
    """The TrialRuntime fields every trial of the sweep shares (a stage adds its own). `tracking_uri`: where trials
    log (the server this sweep started for `store_uri`, or the store itself)."""
    keep = spec.checkpoints.keep
    # trials on nodes without the driver's disk reach the store's artifacts through the server this sweep started
    served = tracking_uri != store_uri and not spec.executor.shares_workdir
    fields = dict(sweep=tracker.sweep, tracking_uri=tracking_uri, experiment_id=tracker.experiment_id,
                  workdir=str(Path(spec.workdir).resolve()), share_work=share_work,
                  checkpoint_every=spec.executor.checkpoint_every,
                  processes=spec.executor.processes_per_trial, sharding=spec.executor.sharding,
                  keep_models=None if keep == "none" else keep, register_models=spec.checkpoints.registry,
                  system_metrics_interval=(spec.tracking.system_metrics_interval
                                           if spec.tracking.system_metrics else None),
                  shared_workdir=spec.executor.shares_workdir, node_dir=spec.executor.node_dir,
                  served_root=local_artifact_root(store_uri, Path(spec.workdir)) if served else None)
    fields["rank_launcher"], fields["rank_resources"] = spec.executor.rank_launch()
    return fields


def _task_of(trial: Optional[TrialSpec], runtime: TrialRuntime) -> Optional[TrialTask]:
    return None if trial is None else TrialTask(trial=trial, runtime=runtime)


class _StageRunner:
    """Runs the phases of one sweep through one executor, its trials sharing `runtime` (runtime_fields)."""

    def __init__(self, spec: SweepSpec, tracker: SweepTracker, executor, runtime: dict, progress: TrialProgress,
                 trial_fn):
        self.spec, self.tracker, self.executor, self.trial_fn = spec, tracker, executor, trial_fn
        self.progress, self.runtime = progress, runtime
        self.results: list[TrialResult] = []

    def _runtime(self, stage: StagePlan, parent: str, init: dict[str, str]) -> TrialRuntime:
        return TrialRuntime(**{**self.runtime, "early_stopping": stage.early_stopping(self.spec)},
                            parent_run_id=parent, stage_key=stage.stage_key, **init)

    def _drive(self, next_task: Callable[[], Optional[TrialTask]],
               on_result: Callable[[TrialResult], None] = lambda result: None) -> None:
        """Run tasks from next_task on the executor, slots kept full (cluster.drive), each result to on_result as
        it ends. A result the store could not record stops new tasks; those running end, then the sweep stops."""
        unrecorded: list[TrialResult] = []

        def next_one() -> Optional[TrialTask]:
            task = None if unrecorded else next_task()
            if task is not None:
                self.progress.expect([task])
            return task

        def done(task: TrialTask, result: TrialResult) -> None:
            self.results.append(result)
            if result.unrecorded:
                unrecorded.append(result)
            elif task.runtime.early_stopping and not unrecorded:  # the next decisions read the stage's rung record
                self.tracker.rung_records.refresh(task.runtime.parent_run_id, task.runtime.stage_key)
            on_result(result)

        drive(self.executor, next_one, self.trial_fn, done, self.progress)
        if unrecorded:  # going on would run trials whose results cannot be kept
            raise SweepError(f"the tracking store stopped answering: {len(unrecorded)} trial(s) could not record "
                             f"their outcome ({unrecorded[0].error}). Finished trials are safe in the store; "
                             "rerun the same command to run the missing ones")

    def run_phase(self, phase: list[StagePlan], finished: dict[str, set[str]], init: dict[str, str]) -> None:
        parents = {s.stage: self.tracker.stage_run(s.stage, _stage_description(s, self.tracker.sweep)) for s in phase}
        for stage in phase:
            if stage.early_stopping(self.spec):  # what a resumed stage's trials decide against, read once here
                self.tracker.rung_records.refresh(parents[stage.stage], stage.stage_key)
        try:
            self._run_stages(phase, parents, finished, init)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the stage runs end KILLED, as their trials do
            for parent in parents.values():
                self.tracker.finish_stage(parent, RunStatus.KILLED)
            raise
        for parent in parents.values():
            self.tracker.finish_stage(parent)
        records = self.tracker.trials()
        for stage in phase:
            runs = latest_per_key(stage_records(records, stage))
            # counts in OUTCOMES' order: finished, failed, stopped
            self.progress.stage_done(stage.stage, stage.size, *(sum(r.status == s for r in runs) for s in OUTCOMES))

    def _run_stages(self, phase: list[StagePlan], parents: dict[str, str], finished: dict[str, set[str]],
                    init: dict[str, str]) -> None:
        grid_tasks = []
        for stage in phase:
            if stage.search is None:
                runtime = self._runtime(stage, parents[stage.stage], init)
                grid_tasks += [TrialTask(trial=t, runtime=runtime) for t in stage.trials
                               if t.trial_key not in finished[stage.stage]]
        self.tracker.close_stale(t.trial.trial_key for t in grid_tasks)  # one search for the whole phase
        stopping = self.spec.search.early_stopping
        queue = start_order(grid_tasks, stopping.order_seed if stopping else None)[::-1]
        self._drive(lambda: queue.pop() if queue else None)
        for stage in phase:
            if stage.search is not None:
                self._search(stage, self._runtime(stage, parents[stage.stage], init))

    def _search(self, stage: StagePlan, runtime: TrialRuntime) -> None:
        """A searched stage, by one driver at a time: a second driver of the sweep waits for the first's search of
        the stage to end (its study would be rebuilt under the other's feet), then runs what is left of it."""
        workdir, echo = Path(self.spec.workdir), self.progress.output.echo
        name = study_name(self.tracker.sweep, stage.stage, stage.stage_key)
        lock = workdir / "locks" / f"search-{self.tracker.sweep}-{stage.stage}.lock"
        with exclusive_lock(lock, on_wait=lambda: echo(f"stage {stage.stage}: another driver is running its "
                                                       "search; waiting for it to end")):
            records = stage_records(self.tracker.trials(stage.stage), stage)
            # a dead driver's (this one holds the stage's search lock), as for grids
            self.tracker.close_stale({r.trial_key for r in running_per_key(records)}, records)
            run_search(stage.search, records,  # as read: its interrupted points run again first
                       lambda next_trial, on_result: self._drive(
                           lambda: _task_of(next_trial(), runtime), on_result),
                       study_storage(workdir, echo), name, echo)


def run_sweep(spec: SweepSpec, tracking_uri: str, *, smoke: bool = False, executor=None, output: Output = Output(),
              share_work: bool = True, trial_fn=None) -> SweepOutcome:
    """Run (or resume) a sweep: only trials without a FINISHED run (grids) or the rest of a search's budget.
    `output` takes its messages (a progress bar on a terminal, a line per trial otherwise; QUIET: none);
    `trial_fn` is the lifecycle's run_trial (train and evaluate) unless a probe replaces it (load tests)."""
    echo, started = output.echo, time.monotonic()
    stages = plan_sweep(spec, smoke)
    name = tracked_name(spec, smoke)
    executor = executor or make_executor(spec.executor)
    prepare_store(tracking_uri)  # once, under its lock: another driver or the server may open it at once
    with store_for_workers(tracking_uri, executor.parallel, spec.tracking.server_host,
                           meanwhile=getattr(executor, "start", None),
                           restarts=spec.tracking.server_restarts, workdir=Path(spec.workdir)) as uri:
        if uri != tracking_uri:
            echo(f"trials run in parallel: serving {redacted(tracking_uri)} through an MLflow server at {uri}")
        tracker = SweepTracker(uri, name, workdir=Path(spec.workdir))
        check_artifacts_reachable(tracker, spec.executor.shares_workdir, served=uri != tracking_uri)
        tracker.show_trials(hyperparameter_names(stages))
        for stage in preference_stages(stages):  # each keeps its method's best model
            problem = verify_kept_best(uri, name, stage.stage, spec.checkpoints.keep, Path(spec.workdir).resolve())
            if problem:
                echo(problem)
        before = tracker.trials()
        finished = {s.stage: done_keys(before, s, spec) for s in stages}
        skipped = sum(len(keys) for keys in finished.values())
        echo(f"sweep {name!r}: {sum(s.size for s in stages)} trials in {len(stages)} stages; tracking "
             f"{redacted(tracking_uri)} (experiment {tracker.experiment_id}); executor {spec.executor.kind}")
        if skipped:
            echo(f"resuming: skipping {skipped} trials already done")
        for stage in stages:
            if stage.search and stage.search.capped():
                echo(stage.search.capped())
            stale = stale_stops(before, stage, spec)
            if stale:
                echo(f"stage {stage.stage}: {stale} trial(s) were stopped under other early-stopping settings than "
                     "the spec's now (rungs, η, metric, or early stopping off): "
                     + ("the search keeps them as stopped (they are its history)" if stage.search else
                        "they run again"))
        progress = TrialProgress(sum(s.size for s in stages), skipped, output)
        runtime = runtime_fields(spec, tracker, uri, share_work, tracking_uri)
        runner = _StageRunner(spec, tracker, executor, runtime, progress, trial_fn or run_trial)
        init: dict[str, str] = {}
        try:
            for phase in phases(stages):
                runner.run_phase(phase, finished, init)
                sft = next((s for s in phase if s.kind is StageKind.SFT), None)
                if sft is not None:
                    init = select_init(tracker.trials(sft.stage), sft, spec.executor.shares_workdir)
        finally:
            progress.close()
            close = getattr(executor, "close", None)
            if close:
                close()
        records = tracker.trials()
        models = keep_best_models(spec, uri, name, stages, records, echo)
    ran = runner.results
    return SweepOutcome(stages, latest_per_key([r for s in stages for r in stage_records(records, s)]), skipped,
                        len(ran), sum(r.status == RunStatus.FAILED for r in ran), time.monotonic() - started,
                        sum(r.status == RunStatus.STOPPED for r in ran), models)


def hyperparameter_names(stages: list[StagePlan]) -> list[str]:
    """Every hyperparameter a stage's trials set or search, for the runs table's columns."""
    names = {k for s in stages for t in s.trials for k in t.hparams}
    names |= {k for s in stages if s.search for k in (*s.search.space, *s.search.fixed)}
    return sorted(names)


def keep_best_models(spec: SweepSpec, uri: str, name: str, stages: list[StagePlan], records: list[TrialRecord],
                     echo=lambda line: None) -> dict[str, str]:
    """checkpoints.keep applied to every preference method once more, now that no trial of this run is writing
    (trials apply it as they finish; this completes what a killed process left half done); registered model
    name -> the version its alias `best` points at. A method whose finished trials kept no weights (they ran
    under keep: none) gets a line saying nothing is kept for it."""
    keep = spec.checkpoints.keep
    if keep == "none":
        return {}
    registered = {}
    for stage in preference_stages(stages):
        method = stage.stage
        version = keep_models(uri, name, method, keep, spec.checkpoints.registry, Path(spec.workdir).resolve())
        if version is not None:
            registered[registered_model_name(name, method)] = version
        finished = [r for r in latest_per_key(stage_records(records, stage)) if r.status == RunStatus.FINISHED]
        if finished and not any(r.tags.get(TAG_WEIGHTS) == "logged" for r in finished):
            echo(f"checkpoints.keep {keep}: none of the {len(finished)} finished {method} trials kept its weights "
                 "(they ran under keep: none), so none is kept or registered; trials run from now on keep theirs")
    return registered
