"""Tracking -> the report's inputs: the sweep's trials as analysis frames, with every finished trial's
per-sample table loaded from MLflow (with a progress bar: a 300-run sweep means 300 artifact downloads)."""

from __future__ import annotations

from tqdm import tqdm

from analysis.frames import samples_frame, sweep_frame
from analysis.report import ReportInputs
from orchestrator.grid import plan_sweep
from orchestrator.pipeline import latest_per_key, stage_records
from orchestrator.spec import SweepSpec, grid_fields
from orchestrator.tracking import SweepTracker
from trainers.methods import METHODS


def load_report_inputs(spec: SweepSpec, uri: str, smoke: bool = False, show_progress: bool = True) -> ReportInputs:
    stages = plan_sweep(spec, smoke)
    tracker = SweepTracker(uri, spec.name, create=False)
    everything = tracker.trials()
    records = latest_per_key([r for s in stages for r in stage_records(everything, s)])
    methods = [s.stage for s in stages if s.stage not in ("base", "sft")]
    own = {m: [k for k in METHODS[m].params.model_fields] for m in methods}
    hyperparameters = sorted({k for m in methods for k in grid_fields(METHODS[m])})
    frame = sweep_frame([r.model_dump() for r in records], hyperparameters)
    wanted = [r for r in records if r.status == "FINISHED" and r.stage in methods]
    samples = {r.trial_key: tracker.load_samples(r.run_id)
               for r in tqdm(wanted, desc="loading samples", unit="run", disable=None if show_progress else True)}
    sft_runs = frame[(frame["stage"] == "sft") & (frame["status"] == "FINISHED")]
    sft = sft_runs.loc[sft_runs["mean_score"].idxmax()].to_dict() if len(sft_runs) else None
    return ReportInputs(sweep=spec.name, frame=frame[frame["stage"].isin(methods)].reset_index(drop=True),
                        samples=samples_frame(samples), methods=methods, hyperparameters=own, sft=sft)
