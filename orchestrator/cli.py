"""`sweep` command line: run, plan, status, report, ui.

Exit codes: 0 success; 1 the sweep ran but could not finish (SweepError) or trials failed; 2 bad input
(spec, arguments) — one line on stderr, no traceback, nothing started.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from analysis.frames import sweep_frame
from analysis.summary import format_summary, time_split
from orchestrator import api
from orchestrator.core.methods import StageKind
from orchestrator.core.spec import Choice, IntRange, SweepSpec
from orchestrator.core.spec_file import SpecError, field_line
from orchestrator.grid import PlanError, preference_stages, tracked_name
from orchestrator.infra.errors import first_line
from orchestrator.infra.net import is_loopback
from orchestrator.pipeline import SweepError
from orchestrator.planner import plan_stages, prompt_tokens, reward_parameters, sequence_tokens
from orchestrator.progress import Output
from orchestrator.runtime.kept_models import verify_kept_best
from orchestrator.runtime.server import (TrackingServerError, mlflow_command, stop_server, store_login, wait_healthy,
                                         with_login)
from orchestrator.runtime.store import (BadTrackingUri, CorruptArtifact, StoreUnavailable, check_reachable,
                                        check_writable, is_unreachable, redacted, resolve_tracking_uri, sqlite_path,
                                        store_exists)
from orchestrator.runtime.sweep_runs import existing_trials, runs_view_url, sweep_experiments
from orchestrator.status import TrialCost, cost_estimate, elapsed_seconds, format_hours, status_table
from trainers.preflight import InputError, Preflight

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
UI_LISTED_SWEEPS = 20  # `sweep ui` links the runs view of the most recent sweeps


def _checked(args, spec: SweepSpec) -> Preflight:
    """The inputs the spec points at, checked (api.check: trainers.preflight) and reported with resolved paths;
    an unusable input is a SpecError naming the spec's file, line and field. Once per command: `run` hands the
    result to api.run, which would check again otherwise."""
    try:
        checked = api.check(spec)
    except InputError as exc:
        path = api.spec_path(args.spec)
        raise SpecError(str(path), exc.field, exc.message, field_line(path, exc.field)) from None
    print("inputs:\n" + "\n".join(f"  {line}" for line in checked.inputs))
    for warning in checked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return checked


def _methods_list(text: Optional[str]) -> list[str]:
    """--only dpo,simpo -> ["dpo", "simpo"]."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _load(args) -> SweepSpec:
    try:
        return api.load(args.spec, max_trials=getattr(args, "max_trials", None),
                        executor=getattr(args, "executor", None), smoke=getattr(args, "smoke", False),
                        overrides=getattr(args, "set", None) or (), only=_methods_list(getattr(args, "only", None)))
    except PlanError as exc:
        path = api.spec_path(args.spec)
        raise SpecError(str(path), "stages", str(exc), field_line(path, "stages")) from None


def _describe_range(search_range) -> str:

    if isinstance(search_range, Choice):
        return f"one of {search_range.choices}"
    if isinstance(search_range, IntRange):
        return f"integer in [{search_range.int_low}, {search_range.int_high}]"
    kind = "log-uniform" if search_range.log else "uniform"
    return f"{kind} in [{search_range.low:g}, {search_range.high:g}]"


def _stage_head(stage) -> str:
    return f"stage {stage.stage} ({stage.size} trial{'s' * (stage.size != 1)})"


def _stage_line(stage) -> str:
    """'stage dpo (20 trials): beta 5 × learning_rate 2 × epochs 2' (values per varied hyperparameter), the
    plan's summary of one stage."""
    head = _stage_head(stage)
    if stage.search:
        return f"{head}: an Optuna search ({stage.search.settings.sampler}) over {', '.join(stage.search.space)}"
    values: dict[str, set] = {}
    for trial in stage.trials:
        for key, value in trial.hparams.items():
            values.setdefault(key, set()).add(value)
    varied = [f"{key} {len(v)}" for key, v in values.items() if len(v) > 1]
    return f"{head}: {' × '.join(varied)}" if varied else head


def _print_stage(stage) -> None:
    print(f"\n{_stage_head(stage)}")
    if stage.search:
        s = stage.search
        print(f"  optuna search ({s.settings.sampler}, seed {s.settings.seed}, maximizing {s.settings.metric}): "
              f"{s.n_trials} trials")
        for key, search_range in s.space.items():
            print(f"    {key}: {_describe_range(search_range)}")
        for key, value in s.fixed.items():
            print(f"    {key}: {value} (fixed)")
        if s.capped():
            print(f"  note: {s.capped()}")
        return
    print(f"  {'key':<12}  {'method':<10}  hyperparameters")
    for trial in stage.trials:
        hp = ", ".join(f"{k}={v}" for k, v in trial.hparams.items()) or "-"
        print(f"  {trial.trial_key[:12]}  {trial.method:<10}  {hp}")


def _size(n_bytes: float) -> str:
    for unit, scale in (("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g}{unit}"
    return "0" if n_bytes == 0 else f"{n_bytes:.0f}B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _print_plan(spec, plan, source: str) -> None:
    """Per stage: memory per GPU by part, whether it fits the declared GPU, GPU-hours from FLOPs."""

    c, t = spec.cost, spec.training
    if plan is None:
        print(f"\nmemory and compute per trial: the model's shape is unknown ({source})")
        return
    setup = (f"{int(c.gpus_per_trial)} GPU(s) per trial, {c.sharding}" if c.gpus_per_trial else "1 device per trial")
    setup += (f", {t.precision}"
             f"{', gradient checkpointing' if t.gradient_checkpointing else ''}"
             f"{f', micro-batches of {t.micro_batch_size} pairs' if t.micro_batch_size else ''}"
             f"{f', LoRA r={t.lora.r}' if t.lora else ', full fine-tuning'}")
    gpus = c.gpus_per_trial > 0
    print(f"\nmemory per GPU and compute per trial: {_count(plan.parameters)} parameters (shape from {source}); "
          f"{setup}; {plan.pairs or '?'} training pairs of {sequence_tokens(c, t)} tokens"
          + (f"; {c.utilization * 100:.3g}% of {c.peak_tflops:g} TFLOPS per GPU" if gpus else "")
          + " (formulas: orchestrator/planner.py)")
    e = spec.evaluation
    reward, reward_source = reward_parameters(spec)
    print(f"  evaluation per trial: {e.num_prompts} prompts x ({prompt_tokens(c, t)} prompt + {e.max_new_tokens} new "
          f"tokens), in FLOPs; reward model: "
          + (f"{_count(reward)} parameters ({reward_source})" if reward else reward_source))
    fit_head = f"fits {c.gpu_memory_gb:g} GB" if c.gpu_memory_gb else "fits"
    print(f"  {'stage':<12} {'weights':>8} {'grads':>8} {'optim':>8} {'ref':>8} {'activ':>8} {'total':>8} "
          f"{fit_head:>12}" + (f" {'GPU-h/trial':>11} {'GPU-h':>9}" if gpus else ""))
    too_big = []
    for e in plan.stages:
        p = e.plan
        fits = p.fits(c.gpu_memory_gb)
        verdict = "-" if fits is None else ("yes" if fits else "NO")
        if fits is False:
            too_big.append(e.stage)
        print(f"  {e.stage:<12} {_size(p.weights):>8} {_size(p.gradients):>8} {_size(p.optimizer):>8} {_size(p.reference):>8} "
              f"{_size(p.activations):>8} {_size(p.total_bytes):>8} {verdict:>12}"
              + (f" {format_hours(e.gpu_hours / e.trials):>11} {format_hours(e.gpu_hours):>9}" if gpus else ""))
    if gpus:
        print(f"  {'reference log-probs, once (shared by the preference trials)':<86} "
              f"{format_hours(plan.reference_gpu_hours):>9}")
        print(f"  {'all (GPU-hours from FLOPs)':<86} {format_hours(plan.gpu_hours):>9}")
    else:
        print("  (GPU-hours from FLOPs: set cost.gpus_per_trial to plan for GPUs)")
    if too_big:
        print(f"  will not fit {c.gpu_memory_gb:g} GB per GPU (with 10% kept free): {', '.join(too_big)}; try "
              "cost.sharding: fsdp with more GPUs, training.gradient_checkpointing, training.lora or a smaller batch")
    if not plan.pairs:
        print("  (training pairs unknown for a hub dataset: set cost.train_pairs for the training GPU-hours)")


def _print_cost(spec, stages, records, estimates=None) -> None:


    table = cost_estimate(stages, records, spec, estimates)
    print("\ncost estimate (per trial: the mean of this sweep's measured trials, else the spec's `cost`)")
    print(f"  {'stage':<12} {'trials':>6} {'to run':>6} {'s/trial':>8}  {'source':<17} {'trial-h':>8} "
          f"{'to run':>8} {'GPU-h':>8} {'to run':>8}")
    for row in table.itertuples():
        seconds = "?" if pd.isna(row.seconds_per_trial) else f"{row.seconds_per_trial:.1f}"
        print(f"  {row.stage:<12} {row.trials:>6} {row.to_run:>6} {seconds:>8}  {row.source:<17} "
              f"{format_hours(row.trial_hours):>8} {format_hours(row.trial_hours_to_run):>8} "
              f"{format_hours(row.gpu_hours):>8} {format_hours(row.gpu_hours_to_run):>8}")
    total = lambda col: None if table[col].isna().any() else table[col].sum()  # noqa: E731
    print(f"  {'all':<12} {table.trials.sum():>6} {table.to_run.sum():>6} {'':>8}  {'':<17} "
          f"{format_hours(total('trial_hours')):>8} {format_hours(total('trial_hours_to_run')):>8} "
          f"{format_hours(total('gpu_hours')):>8} {format_hours(total('gpu_hours_to_run')):>8}")
    if (table.source == "unknown").any():
        print("  (? = no trial measured yet: set cost.trial_seconds and cost.gpus_per_trial in the spec, or "
              "run some trials)")


def cmd_plan(args) -> int:
    spec = _load(args)
    uri = resolve_tracking_uri(args.tracking_uri, spec.tracking.uri)  # a bad URI is refused before anything prints
    _checked(args, spec)
    stages = api.plan(spec, smoke=args.smoke)
    print(f"sweep {spec.name!r}{' (smoke)' if args.smoke else ''}: nothing is run by `plan`")
    n_pref = sum(s.size for s in preference_stages(stages))
    n_sft = sum(s.size for s in stages if s.kind is StageKind.SFT)
    print(f"\n{sum(s.size for s in stages)} trials: 1 untrained baseline, {n_sft} SFT, {n_pref} preference")
    for stage in stages:
        print(f"  {_stage_line(stage)}")
    plan, source = plan_stages(spec, stages)
    flops = {e.stage: TrialCost(e.seconds_per_trial, e.gpu_hours / e.trials, "FLOPs estimate")
             for e in (plan.stages if plan else []) if spec.cost.gpus_per_trial > 0}
    _print_cost(spec, stages, _measured_trials(uri, tracked_name(spec, args.smoke)), flops)
    _print_plan(spec, plan, source)
    if args.trials:
        for stage in stages:
            _print_stage(stage)
    else:
        print("\n(each trial's key and hyperparameters: sweep plan ... --trials)")
    return EXIT_OK


def _measured_trials(uri: str, sweep: str) -> list:
    """The sweep's trials for `plan`'s cost figures, or none (with a note) when the store is not at hand."""
    try:
        check_reachable(uri)
    except StoreUnavailable as exc:
        print(f"note: {exc}; costs come from the spec alone", file=sys.stderr)
        return []
    return existing_trials(uri, sweep)


def cmd_status(args) -> int:
    spec = _load(args)
    uri = resolve_tracking_uri(args.tracking_uri, spec.tracking.uri)
    check_reachable(uri)
    if not store_exists(uri):
        raise StoreUnavailable(f"no tracking store at {uri}: nothing of sweep {spec.name!r} has run there; run it "
                               "first (sweep run), or pass the --tracking-uri that holds it")
    stages = api.plan(spec, smoke=args.smoke)
    name = tracked_name(spec, args.smoke)
    records = existing_trials(uri, name)
    table = status_table(stages, records, spec)
    print(f"sweep {name!r} in {redacted(uri)}")
    print(f"  {'stage':<12} {'planned':>7} {'done':>5} {'running':>7} {'failed':>6} {'stopped':>7} {'pending':>7} "
          f"{'trial-h':>8} {'GPU-h':>8}")
    for row in table.to_dict("records") + [{**table.sum(numeric_only=True).to_dict(), "stage": "all"}]:
        print(f"  {row['stage']:<12} {row['planned']:>7.0f} {row['done']:>5.0f} {row['running']:>7.0f} "
              f"{row['failed']:>6.0f} {row['stopped']:>7.0f} {row['pending']:>7.0f} "
              f"{format_hours(row['trial_hours']):>8} {format_hours(row['gpu_hours']):>8}")
    elapsed = elapsed_seconds(records, int(time.time() * 1000))
    print(f"\nelapsed: {'-' if elapsed is None else f'{elapsed / 60:.1f} min'} (first trial start to last end); "
          f"trial-h sums every attempt's wall time, GPU-h its wall time x GPUs held")
    _print_time_split(time_split(sweep_frame([r.model_dump() for r in records], []), "stage",
                                 [s.stage for s in stages]))
    if records:
        for stage in preference_stages(stages):
            problem = verify_kept_best(uri, name, stage.stage, spec.checkpoints.keep, spec.workdir, repair=False)
            if problem:
                print(f"warning: {problem}", file=sys.stderr)
    return EXIT_OK


def _print_time_split(table: pd.DataFrame) -> None:
    if table.empty:
        return
    print("\nwhere a finished trial's time goes (mean seconds; eval = generate + reward + KL + the rest):")
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}",
                           na_rep="-")
    print("\n".join("  " + line for line in text.splitlines()))


def cmd_run(args) -> int:
    spec = _load(args)
    uri = api.tracking_uri(spec, args.tracking_uri)  # a bad URI is refused before anything prints or is created
    check_reachable(uri)  # the store's problems first (exit 1), then the inputs' (exit 2)
    check_writable(uri)
    checked = _checked(args, spec)
    if not store_exists(uri):
        print(f"new tracking store at {sqlite_path(uri)}: no sweep has run there yet (to resume a sweep, pass the "
              "--tracking-uri that holds it)")
    try:
        outcome = api.run(spec, tracking_uri=uri, smoke=args.smoke, output=Output(bar=not args.no_progress),
                          share_work=not args.no_shared_work, checked=checked)
    except SweepError as exc:
        print(f"sweep stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the driver's own requests to a store that went away
        if not is_unreachable(exc):
            raise
        print(f"sweep stopped: the tracking store did not answer ({first_line(exc)}). Finished trials are safe in "
              "the store; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    early = f", {outcome.stopped} stopped early" if outcome.stopped else ""
    print(f"\n{outcome.ran} trials run, {outcome.skipped} skipped (already done), "
          f"{outcome.failed} failed{early}, in {outcome.wall_seconds:.0f} s\n")
    print(format_summary(outcome.summary))
    if outcome.models:
        print("\nbest models (MLflow Model Registry, alias best): "
              + ", ".join(f"{name} v{version}" for name, version in outcome.models.items()))
    print(f"\nbrowse: sweep ui --tracking-uri {redacted(uri)}")
    return EXIT_FAILED if outcome.failed else EXIT_OK


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def cmd_ui(args) -> int:
    uri = resolve_tracking_uri(args.tracking_uri, None)
    if uri.startswith(("http://", "https://")):  # a tracking server already serves its own UI
        print(f"MLflow UI: {uri}")
        return EXIT_OK
    if not store_exists(uri):
        print(f"error: no tracking store at {uri}: run a sweep here first, or pass --tracking-uri", file=sys.stderr)
        return EXIT_FAILED
    # beyond loopback the UI asks for the store's login (the one the sweeps' servers use), as they do
    if not is_loopback(args.host) and not uri.startswith("sqlite:"):
        print(f"error: --host {args.host} serves the store beyond this machine, behind the login kept beside a SQLite "
              f"store; {redacted(uri)} has no such folder: serve it on 127.0.0.1 (e.g. through an SSH tunnel)",
              file=sys.stderr)
        return EXIT_FAILED
    login = None if is_loopback(args.host) else store_login(sqlite_path(uri).parent)
    if _port_taken(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is in use (another sweep ui or MLflow server?); choose one "
              "with --port", file=sys.stderr)
        return EXIT_FAILED
    mlflow, env = mlflow_command()
    url = f"http://{args.host}:{args.port}"
    command, env = with_login([mlflow, "ui", "--backend-store-uri", uri, "--registry-store-uri", uri, "--host",
                               args.host, "--port", str(args.port)], env, login)
    # the server's own output (MLflow's and uvicorn's warnings, access lines) goes to a log file beside the store:
    # the terminal shows the URLs, once they answer, and nothing else unless the server fails
    log = ui_log_path(uri)
    with open(log, "ab") as sink:
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, process, timeout=180)
        print(f"MLflow UI for {redacted(uri)} at {url} (Ctrl-C stops it; server log: {log})", flush=True)
        if login is not None:
            print(f"  it asks for a login: {login.how_to_log_in()}", flush=True)
        for name, experiment_id in sweep_experiments(uri)[:UI_LISTED_SWEEPS]:
            print(f"  sweep {name}: {runs_view_url(url, experiment_id)}", flush=True)
        return process.wait()
    except TrackingServerError as exc:
        print(f"error: {exc}; the server's log, {log}, ends:\n{_tail(log)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): the server goes with us
        return EXIT_OK
    finally:
        stop_server(process)


def ui_log_path(uri: str) -> Path:
    """Where `sweep ui` writes the server's output: mlflow-ui.log beside a SQLite store, else here."""
    return (sqlite_path(uri).parent if uri.startswith("sqlite:") else Path.cwd()) / "mlflow-ui.log"


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(unreadable)"


def _is_sweep_name(arg: Optional[str]) -> bool:
    """A bare name that is neither a file nor a built-in spec: the name of a sweep in the tracking store."""
    return bool(arg) and not Path(arg).exists() and "/" not in arg and not arg.endswith((".yaml", ".yml")) \
        and api.builtin_spec_path(arg) is None


def cmd_report(args) -> int:
    if _is_sweep_name(args.spec) and (args.set or args.only):  # report always parses both flags
        raise SpecError("--set" if args.set else "--only", "", f"{args.spec!r} is read from the tracking store "
                        "as a sweep's name; --set and --only change a spec (give its YAML file or built-in name)")
    source = args.spec if _is_sweep_name(args.spec) else _load(args)
    out, run_id = api.report(source, tracking_uri=args.tracking_uri, out=args.out, fmt=args.format,
                             smoke=args.smoke, progress=not args.no_progress, grid=args.grid)
    name = source if isinstance(source, str) else source.name
    print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB); also the artifact report.{args.format} of run "
          f"{run_id} (\"sweep {name}\")")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Hyperparameter sweeps for preference "
                                     "optimization (DPO, SimPO, LN-DPO, ...), tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, spec=True, spec_help="sweep YAML, or a built-in name (default: quickstart)"):
        if spec:
            p.add_argument("spec", nargs="?", help=spec_help)
            p.add_argument("--smoke", action="store_true",
                           help="at most 2 trials per grid, few steps, prompts and pairs (CI, first tries)")
            p.add_argument("--max-trials", type=int, metavar="N",
                           help="plan up to N trials (default: the spec's max_trials, 10,000)")
            p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                           help="change one spec field, VALUE as YAML (repeatable): --set training.batch_size=8 "
                                "--set stages.methods.dpo.grid.beta=[0.1,0.3]; part of the trial keys like any "
                                "setting")
            p.add_argument("--only", metavar="METHODS",
                           help="only these preference methods of the spec, comma-separated (e.g. dpo,simpo); "
                                "the untrained baseline and the SFT stage they start from stay")
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
    plan = sub.add_parser("plan", help="print the trial count, cost estimate and memory per GPU; runs nothing")
    common(plan)
    plan.add_argument("--trials", action="store_true", help="also list every trial: its key and hyperparameters")
    plan.set_defaults(func=cmd_plan)
    status = sub.add_parser("status", help="done/running/failed/stopped/pending per stage, elapsed time and GPU-hours")
    common(status)
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="robustness report (tables, figures, best-of-k) as one HTML or "
                                           "Markdown file; also logged to MLflow")
    common(report, spec_help="sweep YAML, a built-in name, or the name of a sweep in the tracking store")
    report.add_argument("--out", help="output file (default: WORKDIR/reports/SWEEP-report.html or .md; for a "
                        "sweep given by name, the current folder)")
    report.add_argument("--format", choices=["html", "md"], default="html")
    report.add_argument("--no-progress", action="store_true", help="no progress bar while loading runs")
    report.add_argument("--grid", metavar="SWEEP", help="a full-grid sweep in the same tracking store to draw "
                        "beside this (early-stopped) one in the budget curve, with its top 10%% as the target")
    report.set_defaults(func=cmd_report)
    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store (127.0.0.1)")
    common(ui, spec=False)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (timeout, systemd, Slurm ending a job) is handled as Ctrl-C: running trials are closed KILLED and
    # the servers this command started are stopped, instead of leaving runs RUNNING until a rerun
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return args.func(args)
    except (SpecError, PlanError, BadTrackingUri) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreUnavailable, CorruptArtifact, api.NothingToReport) as exc:  # not the input: one line, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished trials are skipped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
