"""Slot utilisation of a searched stage: the asynchronous search (a point asked the moment a slot frees) against
the batch search it replaced (ask as many points as slots, wait for the whole batch, tell, ask again), on probe
trials whose length varies 1-3x with their epochs, on the local executor (4 worker processes) and on a local Ray
(4 slots).

    python benchmarks/bench_search.py --rounds 2 --trials 48 --seconds 2.0

Each round runs the sweep (base + SFT grid + a DPO stage searched over epochs {1, 2, 3} and beta) once per mode and
executor, each into a fresh store. Utilisation of the DPO stage = busy slot-seconds / (slots × the stage's wall),
two ways: slots (what the issue asks: a slot is busy from the moment its trial is submitted until its result is
back in the driver; the wall runs from the stage's first submit to its last result) and, stricter, runs (busy =
each trial's MLflow run, from its creation to its end, so a trial's own start-up in its worker counts as idle;
wall = first run start to last run end). The batch mode is the old loop, rebuilt here by wrapping the pipeline's
drive in a barrier. The table holds medians over the rounds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orchestrator.pipeline as pipeline  # noqa: E402
from cluster.base import drive  # noqa: E402
from cluster.probe import probe_trial  # noqa: E402
from orchestrator.core.spec_file import parse_spec  # noqa: E402
from orchestrator.progress import QUIET  # noqa: E402
from orchestrator.runtime.store import store_client  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402

SPEC = """\
name: {name}
workdir: {workdir}
model: {{kind: tiny}}
data: {{kind: synthetic, n_train: 32, n_eval: 8}}
evaluation: {{num_prompts: 8, max_new_tokens: 8}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3], epochs: [1]}}}}
  methods:
    dpo:
      grid: {{learning_rate: [1.0e-4]}}
      space:
        epochs: {{choices: [1, 2, 3]}}
        beta: {{low: 0.05, high: 0.5}}
search: {{kind: optuna, n_trials: {trials}, sampler: tpe, seed: 0}}
executor: {executor}
"""
EXECUTORS = {"local, 4 workers": "{kind: local, workers: 4}",
             "ray, 4 slots": "{kind: ray, num_cpus: 2, max_concurrent_trials: 4, resources_per_trial: {cpu: 0.5}}"}


class SlotClock:
    """Wraps a drive: when each searched (DPO) task was handed to the executor and when its result came back."""
    def __init__(self, inner):
        self.inner, self.submitted, self.done = inner, [], []

    def __call__(self, executor, next_task, trial_fn, on_done, progress=None):
        def next_one():
            task = next_task()
            if task is not None and task.trial.stage == "dpo":
                self.submitted.append(time.monotonic())
            return task

        def finished(task, result):
            if task.trial.stage == "dpo":
                self.done.append(time.monotonic())
            on_done(task, result)
        self.inner(executor, next_one, trial_fn, finished, progress)

    def utilisation(self, slots: int) -> tuple[float, float]:
        wall = max(self.done) - min(self.submitted)
        return (sum(self.done) - sum(self.submitted)) / (slots * wall), wall


def barrier_drive(executor, next_task, trial_fn, on_done, progress=None):
    """The batch search: take up to `slots` tasks, run them all to their end, then take the next ones."""
    while True:
        batch = []
        while len(batch) < executor.slots:
            task = next_task()
            if task is None:
                break
            batch.append(task)
        if not batch:
            return
        drive(executor, lambda: batch.pop(0) if batch else None, trial_fn, on_done, progress)


def run_utilisation(uri: str, sweep: str, slots: int) -> tuple[float, float]:
    """(busy slot-seconds / (slots × stage wall), stage wall in s) of the searched DPO stage's trial runs."""
    client = store_client(uri)
    runs = [client.get_run(r.run_id).info for r in SweepTracker(uri, sweep).trials("dpo")]
    busy = sum(r.end_time - r.start_time for r in runs) / 1000
    wall = (max(r.end_time for r in runs) - min(r.start_time for r in runs)) / 1000
    return busy / (slots * wall), wall


def one_sweep(executor: str, batch: bool, trials: int, seconds: float) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        spec = parse_spec(SPEC.format(name="util", workdir=Path(tmp) / "work", trials=trials, executor=executor))
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        original = pipeline.drive
        clock = SlotClock(barrier_drive if batch else original)
        pipeline.drive = clock
        try:
            outcome = pipeline.run_sweep(spec, uri, output=QUIET, trial_fn=functools.partial(
                probe_trial, steps=2, prompts=8, seconds_per_epoch=seconds))
        finally:
            pipeline.drive = original
        assert not outcome.failed, outcome.summary
        return {"slots": clock.utilisation(4), "runs": run_utilisation(uri, "util", 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=48, help="the searched stage's budget")
    parser.add_argument("--seconds", type=float, default=2.0, help="probe sleep per epoch (trials: 1-3x this)")
    parser.add_argument("--only", choices=list(EXECUTORS), help="one executor")
    args = parser.parse_args()
    rows = []
    for name, executor in EXECUTORS.items():
        if args.only and name != args.only:
            continue
        figures: dict[str, list] = {"batch": [], "asynchronous": []}
        for round_ in range(args.rounds):
            for mode in (["batch", "asynchronous"] if round_ % 2 == 0 else ["asynchronous", "batch"]):
                measured = one_sweep(executor, mode == "batch", args.trials, args.seconds)
                figures[mode].append(measured)
                print(f"  {name}, {mode}, round {round_ + 1}: slots {measured['slots'][0]:.1%} "
                      f"(wall {measured['slots'][1]:.1f} s), runs {measured['runs'][0]:.1%}", flush=True)
        rows.append((name, {mode: {way: statistics.median(m[way][0] for m in ms) for way in ("slots", "runs")}
                            | {"wall": statistics.median(m["slots"][1] for m in ms)} for mode, ms in figures.items()}))
    print(f"\n{'executor':<18} {'':<13} {'slots':>7} {'runs':>7} {'stage wall':>11}")
    for name, by_mode in rows:
        for mode, m in by_mode.items():
            print(f"{name:<18} {mode:<13} {m['slots']:>7.1%} {m['runs']:>7.1%} {m['wall']:>10.1f}s")
        print(f"{name:<18} {'batch/async':<13} {'':>7} {'':>7} "
              f"{by_mode['batch']['wall'] / by_mode['asynchronous']['wall']:>10.2f}x")
    print(f"\n(medians of {args.rounds} rounds; {args.trials} searched trials of {args.seconds:g}-"
          f"{3 * args.seconds:g} s each, 4 slots)")


if __name__ == "__main__":
    main()
