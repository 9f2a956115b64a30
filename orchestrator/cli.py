"""`sweep` command line: run, plan, ui.

Exit codes: 0 success; 1 the sweep ran but could not finish (SweepError) or trials failed; 2 bad input
(spec, arguments) — one line on stderr, no traceback, nothing started.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

from orchestrator.spec import SpecError, SweepSpec, load_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def builtin_spec_path(name: str) -> Optional[Path]:
    """Specs shipped in sweeps/ (e.g. `quickstart`), so `sweep run` works from any directory."""
    candidate = resources.files("sweeps") / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None


def _resolve_spec_path(arg: Optional[str]) -> Path:
    if arg is None:
        return builtin_spec_path("quickstart")
    path = Path(arg)
    if not path.exists() and "/" not in arg and not arg.endswith((".yaml", ".yml")):
        builtin = builtin_spec_path(arg)
        if builtin:
            return builtin
    return path


def _load(args) -> SweepSpec:
    spec = load_spec(_resolve_spec_path(args.spec))
    if getattr(args, "executor", None):
        from cluster import EXECUTORS
        if args.executor not in EXECUTORS:
            from trainers.methods import unknown_name_message
            raise SpecError("--executor", "", unknown_name_message("executor", args.executor, list(EXECUTORS)))
        if args.executor != spec.executor.kind:  # the other kind's defaults; the spec's section is for its kind
            from pydantic import TypeAdapter
            from orchestrator.spec import ExecutorSpec
            executor = TypeAdapter(ExecutorSpec).validate_python({"kind": args.executor})
            spec = spec.model_copy(update={"executor": executor})
    return spec


def cmd_plan(args) -> int:
    from orchestrator.grid import plan_sweep

    spec = _load(args)
    stages = plan_sweep(spec, smoke=args.smoke)
    total = 0
    print(f"sweep {spec.name!r}{' (smoke)' if args.smoke else ''}: nothing is run by `plan`")
    for stage in stages:
        print(f"\nstage {stage.stage} ({len(stage.trials)} trial{'s' * (len(stage.trials) != 1)})")
        print(f"  {'key':<12}  {'method':<10}  hyperparameters")
        for trial in stage.trials:
            hp = ", ".join(f"{k}={v}" for k, v in trial.hparams.items()) or "-"
            print(f"  {trial.trial_key[:12]}  {trial.method:<10}  {hp}")
        total += len(stage.trials)
    n_pref = sum(len(s.trials) for s in stages if s.stage not in ("base", "sft"))
    n_sft = sum(len(s.trials) for s in stages if s.stage == "sft")
    print(f"\n{total} trials: 1 untrained baseline, {n_sft} SFT, {n_pref} preference")
    return EXIT_OK


def cmd_run(args) -> int:
    from analysis.summary import format_summary
    from orchestrator.pipeline import SweepError, run_sweep
    from orchestrator.tracking import resolve_tracking_uri

    spec = _load(args)
    uri = resolve_tracking_uri(args.tracking_uri, spec.tracking.uri)
    try:
        outcome = run_sweep(spec, uri, smoke=args.smoke, show_progress=not args.no_progress,
                            share_work=not args.no_shared_work)
    except SweepError as exc:
        print(f"sweep stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"\n{outcome.ran} trials run, {outcome.skipped} skipped (already FINISHED), "
          f"{outcome.failed} failed, in {outcome.wall_seconds:.0f} s\n")
    print(format_summary(outcome.summary))
    print(f"\nbrowse: sweep ui --tracking-uri {uri}")
    return EXIT_FAILED if outcome.failed else EXIT_OK


def cmd_ui(args) -> int:
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, None)
    if uri.startswith(("http://", "https://")):  # a tracking server already serves its own UI
        print(f"MLflow UI: {uri}")
        return EXIT_OK
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {url} (Ctrl-C stops it)", flush=True)
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Hyperparameter sweeps for preference "
                                     "optimization (DPO, SimPO, LN-DPO, ...), tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, spec=True):
        if spec:
            p.add_argument("spec", nargs="?", help="sweep YAML, or a built-in name (default: quickstart)")
            p.add_argument("--smoke", action="store_true",
                           help=f"at most 2 trials per grid, few steps and prompts (CI, first tries)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, "
                                              "then sqlite:///mlflow.db; `plan` reads no tracking store)")

    run = sub.add_parser("run", help="run a sweep (resumes: finished trials are skipped)")
    common(run)
    run.add_argument("--executor", help="override the spec's executor kind: local, ray or slurm (with that "
                                        "kind's defaults when the spec configures another kind)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-shared-work", action="store_true",
                     help="every trial computes its own reference log-probs and SFT baseline (to measure sharing)")
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="print the trial table and count; runs nothing")
    common(plan)
    plan.set_defaults(func=cmd_plan)
    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store (127.0.0.1)")
    common(ui, spec=False)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished trials are skipped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
