"""Tracking -> the report's inputs: the sweep's trials as analysis frames, with every finished trial's
per-sample table loaded from MLflow (with a progress bar: a 300-run sweep means 300 artifact downloads)."""

from __future__ import annotations

from typing import Optional

import pandas as pd
from tqdm import tqdm

from analysis.frames import samples_frame, sweep_frame
from analysis.report import ReportInputs
from analysis.summary import best_of_stage
from orchestrator.core.methods import BASE_STAGE, METHODS, SFT_STAGE, StageKind
from orchestrator.core.runs import RunStatus, latest_per_key
from orchestrator.core.spec import SweepSpec, grid_fields
from orchestrator.grid import plan_sweep, preference_stages, tracked_name
from orchestrator.pipeline import stage_records
from orchestrator.runtime.sweep_runs import SweepTracker, existing_trials


def load_report_inputs(spec: SweepSpec, uri: str, smoke: bool = False, show_progress: bool = True) -> ReportInputs:
    """The trials the spec plans (its grids and searches), read from the sweep's experiment."""
    stages = plan_sweep(spec, smoke)
    tracker = SweepTracker(uri, tracked_name(spec, smoke), create=False)
    everything = tracker.trials()
    records = latest_per_key([r for s in stages for r in stage_records(everything, s)])
    methods = [s.stage for s in preference_stages(stages)]
    return _inputs(tracker.sweep, tracker, records, methods, show_progress)


def load_report_inputs_by_name(sweep: str, uri: str, show_progress: bool = True) -> ReportInputs:
    """Every trial of the experiment named `sweep`, without its spec (e.g. a sweep run elsewhere); methods in
    the registry's order."""
    tracker = SweepTracker(uri, sweep, create=False)
    records = latest_per_key(tracker.trials())
    return _inputs(sweep, tracker, records, _preference_methods(records), show_progress)


def _preference_methods(records) -> list[str]:
    """The preference methods the records hold, in the registry's order."""
    present = {r.stage for r in records}
    return [m for m, method in METHODS.items() if method.kind is StageKind.PREFERENCE and m in present]


def preference_frame(sweep: str, uri: str) -> pd.DataFrame:
    """The preference trials of the experiment named `sweep` as an analysis frame, without their samples (a full
    grid the report sets an early-stopped sweep against: `sweep report NAME --grid GRID`); empty when the store
    has no such sweep."""
    records = latest_per_key(existing_trials(uri, sweep))
    methods = _preference_methods(records)
    frame = _frame(records, methods)
    return frame[frame["stage"].isin(methods)].reset_index(drop=True)


def _frame(records, methods: list[str]) -> pd.DataFrame:
    hyperparameters = sorted({k for m in methods for k in grid_fields(METHODS[m])})
    return sweep_frame([r.model_dump() for r in records], hyperparameters)


def _inputs(sweep: str, tracker: SweepTracker, records, methods: list[str], show_progress: bool) -> ReportInputs:
    own = {m: [k for k in METHODS[m].params.model_fields] for m in methods}
    frame = _frame(records, methods)
    wanted = [r for r in records if r.status == RunStatus.FINISHED and r.stage in methods]
    samples = {r.trial_key: tracker.load_samples(r.run_id, artifact_uri=r.artifact_uri)
               for r in tqdm(wanted, desc="loading samples", unit="run", disable=None if show_progress else True)}
    return ReportInputs(sweep=sweep, frame=frame[frame["stage"].isin(methods)].reset_index(drop=True),
                        samples=samples_frame(samples), methods=methods, hyperparameters=own,
                        sft=_as_dict(best_of_stage(frame, SFT_STAGE)),
                        untrained=_as_dict(best_of_stage(frame, BASE_STAGE)))


def _as_dict(row: Optional[pd.Series]) -> Optional[dict]:
    return None if row is None else row.to_dict()
