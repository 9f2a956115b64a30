"""What the per-trial extras of tracking cost on the quickstart: system metrics and kept models.

    python benchmarks/bench_tracking_extras.py --repeats 3

Runs the built-in quickstart sweep (21 trials, local executor, a fresh store and workdir each time) in three
configurations, interleaved round by round so machine noise hits each alike:

  baseline         tracking.system_metrics false, checkpoints.keep none
  system metrics   tracking.system_metrics true (default: a sample every 10 s and one when each trial ends)
  + kept models    system metrics and checkpoints.keep best_per_method with registration (the defaults)

and prints the median sweep wall time of each with its overhead against the baseline. On this noisy machine a
sweep's wall time moves by 10-20% between runs, more than these extras cost, so the script also measures them
directly (`--direct-only` for that part alone), each the median of 30 calls on a local SQLite store:

  system metrics   entering and leaving the sampler around a trial shorter than its interval (priming
                   psutil, the last sample, its log_batch): what every quickstart trial pays
  kept models      one kept-models pass for a method (searches, registry calls, deletions), as each
                   preference trial runs once it FINISHED; plus the weights upload, from the trials'
                   time_checkpoint_s in the "+ kept models" sweep

and turns them into a share of the baseline sweep's wall time.
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

from orchestrator import api  # noqa: E402
from orchestrator.progress import QUIET  # noqa: E402

CONFIGS = {
    "baseline": {"tracking": {"system_metrics": False}, "checkpoints": {"keep": "none"}},
    "system metrics": {"tracking": {"system_metrics": True}, "checkpoints": {"keep": "none"}},
    "+ kept models": {"tracking": {"system_metrics": True}, "checkpoints": {"keep": "best_per_method"}},
}


def run_once(overrides: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        spec = api.load("quickstart")
        spec = spec.model_copy(update={
            "workdir": str(Path(tmp) / "work"),
            "tracking": spec.tracking.model_copy(update=overrides["tracking"]),
            "checkpoints": spec.checkpoints.model_copy(update=overrides["checkpoints"]),
        })
        started = time.perf_counter()
        outcome = api.run(spec, tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}", output=QUIET)
        wall = time.perf_counter() - started
        assert outcome.failed == 0 and outcome.ran == 21, outcome
        return wall


def timed_ms(call, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def direct_costs() -> tuple[float, float, float]:
    """(system-metrics ms per trial, kept-models pass ms, weights upload s summed over a quickstart's 18
    preference trials)."""
    from orchestrator.runtime.kept_models import keep_models
    from orchestrator.runtime.sweep_runs import SweepTracker
    from orchestrator.runtime.trial_log import SystemMetrics, TrialLogger

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tracker = SweepTracker(uri, "extras")
        logger = TrialLogger(uri, tracker.experiment_id, tracker.stage_run("dpo"))
        logger.start("probe", {"posweep.trial_key": "k", "posweep.method": "dpo", "posweep.stage": "dpo"}, {})

        def around_a_short_trial():
            with SystemMetrics(logger, interval=10.0):
                pass

        sampler_ms = timed_ms(around_a_short_trial)
        spec = api.load("quickstart")
        spec = spec.model_copy(update={"workdir": str(Path(tmp) / "work"), "tracking": spec.tracking.model_copy(
            update={"system_metrics": False})})
        api.run(spec, tracking_uri=uri, output=QUIET)
        keep_ms = timed_ms(lambda: keep_models(uri, "quickstart", "dpo", "best_per_method", True, spec.workdir))
        uploads = sum(r.metrics.get("time_checkpoint_s", 0.0) for r in SweepTracker(uri, "quickstart").trials()
                      if r.stage not in ("base", "sft"))
    return sampler_ms, keep_ms, uploads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--direct-only", action="store_true", help="only the direct per-trial measurements")
    parser.add_argument("--baseline-seconds", type=float, help="the baseline sweep's wall time, with --direct-only")
    args = parser.parse_args()
    base = args.baseline_seconds
    if not args.direct_only:
        walls: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for round_ in range(1, args.repeats + 1):
            for name, overrides in CONFIGS.items():
                walls[name].append(run_once(overrides))
                print(f"round {round_} {name}: {walls[name][-1]:.1f} s", flush=True)
        base = statistics.median(walls["baseline"])
        print(f"\nquickstart sweep (21 trials), median of {args.repeats}")
        print(f"{'configuration':<16} {'wall s':>8} {'overhead':>9}   runs")
        for name, values in walls.items():
            median = statistics.median(values)
            print(f"{name:<16} {median:>8.1f} {median / base - 1:>+8.1%}   {', '.join(f'{v:.1f}' for v in values)}")
    sampler_ms, keep_ms, uploads = direct_costs()
    print(f"\ndirect costs (median of 30 calls): system metrics {sampler_ms:.1f} ms per trial; a kept-models pass "
          f"{keep_ms:.1f} ms per preference trial; weights uploads {uploads:.2f} s over the sweep's 18 preference "
          "trials")
    if base:
        metrics_share = 21 * sampler_ms / 1000 / base
        kept_share = (18 * keep_ms / 1000 + uploads) / base
        print(f"share of a {base:.1f} s quickstart: system metrics {metrics_share:.2%}, kept models {kept_share:.2%}")


if __name__ == "__main__":
    main()
