"""Rung-decision latency as a stage fills: what one ASHA decision (TrialLogger.rung_values, the read behind it)
costs with 100, 1,000 and 5,000 ended trials in the stage, read through the MLflow server a parallel sweep runs:
before (every run of the stage with its params, tags and metrics) and after (the stage's rung record, plus the runs
still running and those ended since the record).

    python benchmarks/bench_rungs.py --sizes 100 1000 5000 --repeats 7

The store is filled with probe runs (tagged like trials of one stage, one rung value each, ended), written
straight into its SQLite file, then left to age past the record's overlap window (10 s); 4 runs are left running
(the slots of a parallel sweep). The record is written once by the driver's RungRecords, as a sweep does after each
trial ends. Medians of `repeats` decisions.
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

import orchestrator.runtime.trial_log as trial_log  # noqa: E402
from orchestrator.core.tags import TAG_KEY, TAG_RUNG_SIGNATURE, TAG_STAGE_KEY  # noqa: E402
from orchestrator.runtime.rung_record import OVERLAP_MS  # noqa: E402
from orchestrator.runtime.server import store_for_workers  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402
from orchestrator.runtime.trial_log import TrialLogger  # noqa: E402

PARAMS = {f"param_{i}": 0.001 * i for i in range(30)}  # a preference trial logs about 30 params


def fill(uri: str, tracker: SweepTracker, parent: str, n: int, first: int) -> None:
    for i in range(first, first + n):
        logger = TrialLogger(uri, tracker.experiment_id, parent)
        logger.start(f"probe {i}", {TAG_KEY: f"key{i:06d}", TAG_STAGE_KEY: "stage", TAG_RUNG_SIGNATURE: "sig"},
                     PARAMS)
        logger.log_metrics({"asha/rung_1": (i * 7919 % 1000) / 1000, "rung/mean_score": 0.5}, step=10)
        logger.finish("FINISHED")


def decision_ms(logger: TrialLogger, repeats: int, record: bool) -> float:
    original = trial_log.read_record
    if not record:
        trial_log.read_record = lambda repository, signature: None
    try:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            values = logger.rung_values("stage", "asha/rung_1", "me", "sig")
            times.append((time.perf_counter() - started) * 1000)
        assert values
        return statistics.median(times)
    finally:
        trial_log.read_record = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rungs-") as tmp:
        for size in args.sizes:
            sqlite = f"sqlite:///{Path(tmp) / f'{size}.db'}"
            tracker = SweepTracker(sqlite, "rungs")
            parent = tracker.stage_run("dpo")
            started = time.monotonic()
            fill(sqlite, tracker, parent, size, 0)
            print(f"  filled {size} runs in {time.monotonic() - started:.0f} s", flush=True)
            # a stage's older runs ended more than the overlap ago (the 100-run fill takes 2 s: all of it would be
            # re-read as "recently ended", which is not what a decision in a long-running stage reads)
            time.sleep(OVERLAP_MS / 1000 + 1)
            with store_for_workers(sqlite, parallel=True) as uri:
                served = SweepTracker(uri, "rungs")
                running = []
                for i in range(4):  # the slots' running trials
                    logger = TrialLogger(uri, served.experiment_id, parent)
                    logger.start(f"running {i}", {TAG_KEY: f"run{i}", TAG_STAGE_KEY: "stage",
                                                  TAG_RUNG_SIGNATURE: "sig"}, PARAMS)
                    logger.log_metrics({"asha/rung_1": 0.5}, step=10)
                    running.append(logger)
                me = running[0]
                before = decision_ms(me, args.repeats, record=False)
                served.rung_records.refresh(parent, "stage")
                after = decision_ms(me, args.repeats, record=True)
                rows.append((size, before, after))
                print(f"  {size} runs: before {before:.1f} ms, after {after:.1f} ms", flush=True)
    base_before, base_after = rows[0][1], rows[0][2]
    print(f"\n{'runs in stage':>13} {'before (ms)':>12} {'after (ms)':>11} {'before / 100':>13} {'after / 100':>12}")
    for size, before, after in rows:
        print(f"{size:>13} {before:>12.1f} {after:>11.1f} {before / base_before:>12.2f}x {after / base_after:>11.2f}x")
    print(f"\n(medians of {args.repeats} decisions through the sweep's MLflow server; 4 trials running)")


if __name__ == "__main__":
    main()
