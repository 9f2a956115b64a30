"""Per-trial dispatch overhead of each executor, and the share of a real sweep's wall time spent in trials.

    python benchmarks/bench_dispatch.py --repeats 3 [--trials 20] [--skip-slurm] [--skip-quickstart]

1. No-op trials (cluster.probe: the real trial path — lock, MLflow run, params, one metric, result — but no
   training) through local, ray and slurm, one at a time (max_concurrent_trials / array_parallelism 1), so
   batch wall / trials is the cost of dispatching one trial. Ray and SLURM go through the MLflow server that
   `sweep run` starts for them; its start-up, Ray's start-up and the local Slurm's start-up are printed
   separately and not in the per-trial figure. SLURM needs root and Debian's slurm-wlm + munge (a local
   single-node Slurm is started and stopped).
2. The quickstart sweep on ray (`run_sweep`, 21 real trials), at 1 and at 2 concurrent trials:
   share = sum of the trials' own wall_seconds / (sweep wall x concurrent trials). Everything outside trials
   (server and Ray start-up, Tune's scheduling, stage boundaries, idle slots) is the rest.
Medians of --repeats runs.
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
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the throwaway Slurm the tests start

import local_slurm  # noqa: E402

from cluster import make_executor  # noqa: E402
from cluster.probe import probe_trial  # noqa: E402
from orchestrator.api import builtin_spec_path  # noqa: E402
from orchestrator.core.spec import LocalExecutorSpec, RayExecutorSpec, SlurmExecutorSpec  # noqa: E402
from orchestrator.core.spec_file import load_spec, parse_spec  # noqa: E402
from orchestrator.core.task import TrialRuntime, TrialTask  # noqa: E402
from orchestrator.grid import plan_sweep  # noqa: E402
from orchestrator.pipeline import run_sweep  # noqa: E402
from orchestrator.progress import QUIET  # noqa: E402
from orchestrator.runtime.server import store_for_workers  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402

GRID_SPEC = """\
name: {name}
workdir: {workdir}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [{betas}], learning_rate: [1.0e-4]}}}}
"""


def probe_tasks(root: Path, uri: str, name: str, n: int) -> list[TrialTask]:
    betas = ", ".join(str(0.01 * (i + 1)) for i in range(n))
    spec = parse_spec(GRID_SPEC.format(name=name, workdir=root / "work", betas=betas))
    stage = next(s for s in plan_sweep(spec) if s.stage == "dpo")
    tracker = SweepTracker(uri, name)
    runtime = TrialRuntime(sweep=name, tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("dpo"), workdir=str(root / "work"),
                           stage_key=stage.stage_key)
    return [TrialTask(trial=t, runtime=runtime) for t in stage.trials]


def time_dispatch(kind: str, executor_spec, n: int, repeats: int) -> tuple[list[float], float]:
    """Seconds per no-op trial for each repeat, and the one-off start-up (server, and Ray's on the first run)."""
    per_trial, startup = [], 0.0
    executor = make_executor(executor_spec)
    try:
        for r in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                started = time.monotonic()
                with store_for_workers(f"sqlite:///{root / 'mlflow.db'}", executor.parallel) as uri:
                    tasks = probe_tasks(root, uri, f"dispatch-{kind}-{r}", n)
                    if kind == "ray":
                        executor._connect()  # Ray's start-up is a one-off, like the server's
                    startup = max(startup, time.monotonic() - started)
                    t0 = time.monotonic()
                    results = executor.run(tasks, functools.partial(probe_trial, steps=1))
                    per_trial.append((time.monotonic() - t0) / n)
                assert all(res.status == "FINISHED" for res in results), [res.error for res in results]
    finally:
        close = getattr(executor, "close", None)
        if close:
            close()
    return per_trial, startup


def quickstart_share(concurrency: int, repeats: int, n_train: int = 2000) -> list[tuple[float, float, float]]:
    """(sweep wall, sum of trial walls, share) per repeat of the quickstart on ray (`n_train` training pairs:
    2000 as shipped; more makes every trial longer against the same dispatch costs)."""
    spec = load_spec(builtin_spec_path("quickstart"))
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"n_train": n_train})})
    out = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            executor_spec = RayExecutorSpec(kind="ray", num_cpus=2, max_concurrent_trials=concurrency)
            run_spec = spec.model_copy(update={"workdir": str(Path(tmp) / "work"), "executor": executor_spec})
            outcome = run_sweep(run_spec, f"sqlite:///{Path(tmp) / 'mlflow.db'}", output=QUIET)
            assert outcome.failed == 0 and outcome.ran == 21
            inside = sum(r.metrics["wall_seconds"] for r in outcome.records)
            out.append((outcome.wall_seconds, inside, inside / (outcome.wall_seconds * concurrency)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--skip-slurm", action="store_true")
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--skip-dispatch", action="store_true")
    parser.add_argument("--longer-trials", type=int, default=0, metavar="N_TRAIN",
                        help="also run the quickstart with this many training pairs (longer trials), once")
    args = parser.parse_args()
    if not args.skip_dispatch:
        dispatch_table(args)
    if not args.skip_quickstart:
        share_table(args)


def dispatch_table(args) -> None:
    med = statistics.median
    rows = [("local", LocalExecutorSpec()),
            ("ray", RayExecutorSpec(kind="ray", num_cpus=2, max_concurrent_trials=1))]
    print(f"no-op trials, one at a time, {args.trials} per batch, median of {args.repeats}:")
    print(f"  {'executor':<8} {'s/trial':>8} {'runs':<28} {'one-off start-up':>17}")
    results = {}
    for kind, executor_spec in rows:
        per_trial, startup = time_dispatch(kind, executor_spec, args.trials, args.repeats)
        results[kind] = med(per_trial)
        print(f"  {kind:<8} {med(per_trial):>8.3f} {', '.join(f'{x:.3f}' for x in per_trial):<28} "
              f"{startup:>15.1f} s", flush=True)
    why = local_slurm.available()
    if args.skip_slurm or why:
        print(f"  slurm    skipped ({'--skip-slurm' if args.skip_slurm else why})")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            with local_slurm.local_slurm(Path(tmp) / "slurm"):
                up = time.monotonic() - t0
                per_trial, startup = time_dispatch("slurm", SlurmExecutorSpec(
                    kind="slurm", array_parallelism=1, poll_seconds=0.5, folder=str(Path(tmp) / "jobs")),
                    args.trials, args.repeats)
        results["slurm"] = med(per_trial)
        print(f"  {'slurm':<8} {med(per_trial):>8.3f} {', '.join(f'{x:.3f}' for x in per_trial):<28} "
              f"{startup:>15.1f} s (+ {up:.1f} s local Slurm start)", flush=True)
    for kind in ("ray", "slurm"):
        if kind in results:
            print(f"  {kind} vs local: +{results[kind] - results['local']:.3f} s per trial")



def share_table(args) -> None:
    med = statistics.median
    print(f"\nquickstart (21 trials) on ray, median of {args.repeats}:")
    print(f"  {'n_train':>7} {'concurrent':>10} {'sweep wall':>10} {'in trials':>10} {'share':>7}  runs (share)")
    configs = [(2000, 1, args.repeats), (2000, 2, args.repeats)]
    if args.longer_trials:
        configs += [(args.longer_trials, 1, 1)]
    for n_train, concurrency, repeats in configs:
        runs = quickstart_share(concurrency, repeats, n_train)
        print(f"  {n_train:>7} {concurrency:>10} {med(r[0] for r in runs):>9.1f}s {med(r[1] for r in runs):>9.1f}s "
              f"{med(r[2] for r in runs):>7.1%}  {', '.join(f'{r[2]:.1%}' for r in runs)}  (target >= 90%)",
              flush=True)


if __name__ == "__main__":
    main()
