"""Search at cluster scale, simulated: a no-op sweep of about 1,000 preference trials (probe trials through the real
trial path: lock, MLflow run, a few hundred milliseconds of sleep, two metric steps, one rung under ASHA, a 16-row
samples table) with 32 trials at once on a local Ray, logging through the MLflow server `sweep run` starts, once
against a SQLite file and once against a PostgreSQL database; then `sweep report` (load + render) on the store. And
the report on a synthetic store of 10,000 runs.

    python benchmarks/bench_scale.py --trials 1000 --concurrency 32          # the simulation, both stores
    python benchmarks/bench_scale.py --report-runs 10000 --skip-simulation   # the 10,000-run report

Per store: trials per minute (the preference phase: first start to last end of its runs), p50/p99 of a trial's
metric-logging calls and of its rung decision (probe/log_ms_*, probe/rung_ms, timed inside the trial), the rung
decision's p50 in the stage's first and last 100 trials (as the stage fills), failed and lost trials, retries (runs
beyond one per key), and keys lost or duplicated (every planned key must have exactly one FINISHED or STOPPED run).
PostgreSQL is a throwaway cluster started here (tests/local_postgres.py: Debian's initdb/pg_ctl).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # local_postgres

import local_postgres  # noqa: E402

from analysis.report import render  # noqa: E402
from cluster.probe import probe_trial  # noqa: E402
from orchestrator.core.runs import RunStatus  # noqa: E402
from orchestrator.core.spec_file import parse_spec  # noqa: E402
from orchestrator.core.task import TrialRuntime, TrialTask  # noqa: E402
from orchestrator.grid import plan_sweep  # noqa: E402
from orchestrator.pipeline import run_sweep  # noqa: E402
from orchestrator.progress import QUIET  # noqa: E402
from orchestrator.reporting import load_report_inputs  # noqa: E402
from orchestrator.runtime.lifecycle import trial_params, trial_tags  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402
from orchestrator.runtime.trial_log import TrialLogger  # noqa: E402
from trainers.probe import noop_sweep_yaml, probe_samples  # noqa: E402

PROMPTS = 16


def noop_spec(name: str, workdir: Path, trials: int, executor: str, early_stopping: bool = True):
    """A no-op sweep of base + SFT + about `trials` preference trials: 3 methods × β × learning rates, each grid
    rounded down to a rectangle (--trials 1000 plans 972, 10000 plans 9,918)."""
    per_method = max(1, trials // 3)
    n_beta = max(1, int(per_method ** 0.5))
    return parse_spec(noop_sweep_yaml(name, workdir, n_beta=n_beta, n_lr=max(1, per_method // n_beta),
                                      executor=executor, early_stopping=early_stopping))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def simulate(uri: str, workdir: Path, trials: int, concurrency: int, seconds: float) -> dict:
    executor = (f"{{kind: ray, num_cpus: 2, max_concurrent_trials: {concurrency}, "
                f"resources_per_trial: {{cpu: {2 / concurrency:.4f}}}, max_failures: 2}}")
    spec = noop_spec("scale", workdir, trials, executor)
    started = time.monotonic()
    outcome = run_sweep(spec, uri, output=QUIET, trial_fn=functools.partial(
        probe_trial, steps=2, seconds=seconds, prompts=PROMPTS, timings=True))
    sweep_wall = time.monotonic() - started
    planned = {t.trial_key for s in plan_sweep(spec) for t in s.trials}
    records = SweepTracker(uri, "scale").trials()
    ended = [r for r in records if r.status in ("FINISHED", "STOPPED")]
    keys = [r.trial_key for r in ended]
    preference = sorted((r for r in ended if r.stage not in ("base", "sft")), key=lambda r: r.start_time)
    wall = (max(r.end_time for r in preference) - min(r.start_time for r in preference)) / 1000
    logs = [v for r in preference for k, v in r.metrics.items() if k.startswith("probe/log_ms_")]
    rungs = [r.metrics["probe/rung_ms"] for r in preference if "probe/rung_ms" in r.metrics]
    first = [r.metrics["probe/rung_ms"] for r in preference[:100] if "probe/rung_ms" in r.metrics]
    last = [r.metrics["probe/rung_ms"] for r in preference[-100:] if "probe/rung_ms" in r.metrics]
    for record in records:
        if record.status == "FAILED":
            print(f"    FAILED {record.run_name}: {record.tags.get('posweep.failure', '')[:300]}", flush=True)
    report_started = time.monotonic()
    inputs = load_report_inputs(spec, uri, show_progress=False)
    loaded = time.monotonic() - report_started
    render(inputs, "html")
    return {"trials": len(planned), "ran": outcome.ran, "sweep_wall": sweep_wall,
            "per_minute": len(preference) / wall * 60, "log_p50": percentile(logs, 0.5),
            "log_p99": percentile(logs, 0.99), "rung_p50": percentile(rungs, 0.5), "rung_p99": percentile(rungs, 0.99),
            "rung_first100": percentile(first, 0.5), "rung_last100": percentile(last, 0.5),
            "failed": sum(r.status == "FAILED" for r in records),
            "lost": sum(bool(r.tags.get("posweep.failure", "").startswith("the Ray worker")) for r in records),
            "retries": len(records) - len({r.trial_key for r in records}),
            "missing": len(planned - set(keys)), "duplicated": len(keys) - len(set(keys)),
            "stopped": sum(r.status == "STOPPED" for r in ended),
            "report_load": loaded, "report_total": time.monotonic() - report_started}


def synthetic_store(uri: str, workdir: Path, runs: int) -> object:
    """A store holding `runs` preference trials (+ base and SFT) with what a finished probe trial leaves (its tags,
    params, metrics and samples table, lifecycle.trial_tags/trial_params and the probe's own samples), written in
    this process straight into SQLite through the trial's logger, without the trial path's lock and resume reads:
    for the report at scale."""
    spec = noop_spec("synthetic", workdir, runs, "{kind: local}", early_stopping=False)
    tracker = SweepTracker(uri, "synthetic")
    started, done = time.monotonic(), 0
    for stage in plan_sweep(spec):
        runtime = TrialRuntime(sweep="synthetic", tracking_uri=uri, experiment_id=tracker.experiment_id,
                               parent_run_id=tracker.stage_run(stage.stage), workdir=str(workdir),
                               stage_key=stage.stage_key)
        for trial in stage.trials:
            task = TrialTask(trial=trial, runtime=runtime)
            samples, metrics = probe_samples(task, PROMPTS)
            logger = TrialLogger(uri, tracker.experiment_id, runtime.parent_run_id)
            logger.start(trial.run_name, trial_tags(task), trial_params(task))
            logger.log_metrics({**metrics, "wall_seconds": 1.0, "device_hours": 1 / 3600})
            logger.log_samples(samples)
            logger.finish(RunStatus.FINISHED)
            done += 1
            if done % 1000 == 0:
                print(f"    {done} runs logged ({time.monotonic() - started:.0f} s)", flush=True)
    return spec


def report_at(runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-scale-report-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        started = time.monotonic()
        spec = synthetic_store(uri, Path(tmp) / "work", runs)
        built = time.monotonic() - started
        started = time.monotonic()
        inputs = load_report_inputs(spec, uri, show_progress=False)
        loaded = time.monotonic() - started
        render(inputs, "html")
        return {"runs": len(inputs.frame), "built": built, "load": loaded, "total": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000, help="preference trials of the simulated sweep")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=0.3, help="each probe trial's sleep")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--report-runs", type=int, nargs="*", default=[], help="also: the report on N synthetic runs")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()
    rows = {}
    if not args.skip_simulation:
        postgres = local_postgres.postgres_cluster() if "postgresql" in args.stores else contextlib.nullcontext("")
        with postgres as server:
            for store in args.stores:
                with tempfile.TemporaryDirectory(prefix=f"bench-scale-{store}-") as tmp:
                    uri = local_postgres.new_database(server) if store == "postgresql" \
                        else f"sqlite:///{Path(tmp) / 'mlflow.db'}"
                    rows[store] = simulate(uri, Path(tmp) / "work", args.trials, args.concurrency, args.seconds)
                    print(f"  {store}: {rows[store]}", flush=True)
        fields = [("trials planned", "trials", "{:.0f}"), ("sweep wall (s)", "sweep_wall", "{:.0f}"),
                  ("preference trials / min", "per_minute", "{:.0f}"),
                  ("metric log p50 / p99 (ms)", ("log_p50", "log_p99"), "{:.0f} / {:.0f}"),
                  ("rung decision p50 / p99 (ms)", ("rung_p50", "rung_p99"), "{:.0f} / {:.0f}"),
                  ("rung p50: first / last 100 (ms)", ("rung_first100", "rung_last100"), "{:.0f} / {:.0f}"),
                  ("stopped early", "stopped", "{:.0f}"), ("failed / lost", ("failed", "lost"), "{:.0f} / {:.0f}"),
                  ("retries (extra runs)", "retries", "{:.0f}"),
                  ("keys missing / duplicated", ("missing", "duplicated"), "{:.0f} / {:.0f}"),
                  ("report load / load+render (s)", ("report_load", "report_total"), "{:.1f} / {:.1f}")]
        print(f"\n{'':<32}" + "".join(f"{s:>16}" for s in rows))
        for label, key, form in fields:
            keys = key if isinstance(key, tuple) else (key,)
            print(f"{label:<32}" + "".join(f"{form.format(*(rows[s][k] for k in keys)):>16}" for s in rows))
        print(f"\n({args.concurrency} trials at once on a local Ray of 2 CPUs, each probe {args.seconds:g} s)")
    for runs in args.report_runs:
        figures = report_at(runs)
        print(f"\nreport on a synthetic store of {figures['runs']} preference runs ({PROMPTS} samples each; built in "
              f"{figures['built']:.0f} s): load {figures['load']:.1f} s, load + render {figures['total']:.1f} s")


if __name__ == "__main__":
    main()
