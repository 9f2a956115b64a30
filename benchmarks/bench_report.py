"""Report at scale: a synthetic sweep of 300 preference runs x 500 evaluation prompts.

    python benchmarks/bench_report.py [--runs 300] [--prompts 500] [--repeats 3]

1. Load: the 300 runs (+ base and SFT) are logged through the real trial path (cluster.probe.probe_trial: run_trial
   with a body that trains nothing and logs a 500-row samples table) into a SQLite store behind an MLflow server,
   then `load_report_inputs` reads them back over HTTP (every run's samples table is one artifact download).
2. Report: `render` from the loaded frames (tables, bootstrap intervals, 7+ figures, HTML), timed alone.
Target: the report in under 30 s. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.report import render  # noqa: E402
from cluster.probe import probe_trial  # noqa: E402
from orchestrator.core.spec_file import parse_spec  # noqa: E402
from orchestrator.core.task import TrialRuntime, TrialTask  # noqa: E402
from orchestrator.grid import plan_sweep  # noqa: E402
from orchestrator.reporting import load_report_inputs  # noqa: E402
from orchestrator.runtime.server import store_for_workers  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402
from trainers.probe import noop_sweep_yaml  # noqa: E402


def build(root: Path, runs: int, prompts: int):
    per_method = runs // 3
    n_beta = min(10, per_method)
    spec = parse_spec(noop_sweep_yaml("scale", root / "work", n_beta, per_method // n_beta))
    return spec, plan_sweep(spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec, stages = build(root, args.runs, args.prompts)
        n = sum(s.size for s in stages)
        with store_for_workers(f"sqlite:///{root / 'mlflow.db'}", parallel=True) as uri:
            tracker = SweepTracker(uri, spec.name)
            t0 = time.monotonic()
            for stage in stages:
                runtime = TrialRuntime(sweep=spec.name, tracking_uri=uri, experiment_id=tracker.experiment_id,
                                       parent_run_id=tracker.stage_run(stage.stage), workdir=str(root / "work"),
                                       stage_key=stage.stage_key)
                for trial in stage.trials:
                    probe_trial(TrialTask(trial=trial, runtime=runtime), prompts=args.prompts)
            print(f"logged {n} runs x {args.prompts} samples through the server in {time.monotonic() - t0:.1f} s")
            loads, reports, size = [], [], 0
            for _ in range(args.repeats):
                t0 = time.monotonic()
                inputs = load_report_inputs(spec, uri, show_progress=False)
                loads.append(time.monotonic() - t0)
                t0 = time.monotonic()
                page = render(inputs, "html")
                reports.append(time.monotonic() - t0)
                size = len(page)
        assert len(inputs.frame) == n - 2 and len(inputs.samples) == (n - 2) * args.prompts
        med = statistics.median
        print(f"{len(inputs.frame)} preference runs x {args.prompts} prompts ({len(inputs.samples):,} sample rows)")
        print(f"  load from the MLflow server: median {med(loads):.1f} s  ({', '.join(f'{x:.1f}' for x in loads)})")
        print(f"  report from the loaded frame: median {med(reports):.1f} s  ({', '.join(f'{x:.1f}' for x in reports)})"
              f"  target < 30 s; {size / 1e6:.1f} MB of HTML")


if __name__ == "__main__":
    main()
