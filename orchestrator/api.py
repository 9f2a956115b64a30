"""posweep from Python: the three moves as functions. The `sweep` command line is a thin layer over these.

    from orchestrator import api

    spec = api.load("quickstart")                 # a YAML path, a built-in name, or a dict
    outcome = api.run(spec, tracking_uri="sqlite:///mlflow.db")
    print(outcome.summary)                        # the best trial per stage
    trials = api.trials(spec, tracking_uri="sqlite:///mlflow.db")    # one row per trial (pandas)
    samples = api.samples(spec, tracking_uri="sqlite:///mlflow.db")  # one row per trial and prompt
    api.report(spec, tracking_uri="sqlite:///mlflow.db", out="report.html")

Errors are exceptions that say what is wrong in one line: SpecError (the spec, or an argument), InputError (what it
points at), PlanError (its grids), BadTrackingUri (a tracking URI that can name no store), StoreUnavailable (the
tracking store), SweepError (a sweep that cannot go on), NothingToReport.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePath
from typing import Optional, Union

import pandas as pd
import yaml
from pydantic import TypeAdapter

from analysis.budget import grid_mismatch
from analysis.report import ReportInputs, render
from cluster import EXECUTORS
from orchestrator.core.registry import unknown_name_message
from orchestrator.core.runs import RunStatus
from orchestrator.core.spec import SMOKE_SUFFIX, ExecutorSpec, SweepSpec
from orchestrator.core.spec_file import SpecError, load_spec, parse_spec
from orchestrator.grid import StagePlan, check_plan_size, plan_sweep, tracked_name
from orchestrator.pipeline import SweepOutcome, run_sweep
from orchestrator.progress import Output
from orchestrator.reporting import load_report_inputs, load_report_inputs_by_name, preference_frame
from orchestrator.runtime.store import StoreUnavailable, check_reachable, check_writable, resolve_tracking_uri
from orchestrator.runtime.sweep_runs import SweepTracker, existing_trials
from trainers.preflight import Preflight, preflight

SpecSource = Union[str, Path, dict, SweepSpec]
REPORT_FORMATS = ("html", "md")


class NothingToReport(ValueError):
    """A sweep without a finished preference trial: no report to make yet."""


def builtin_spec_path(name: str) -> Optional[Path]:
    """Specs shipped in sweeps/ (e.g. `quickstart`), so they load from any directory."""
    candidate = resources.files("sweeps") / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None


def builtin_spec_names() -> list[str]:
    return sorted(Path(str(p)).stem for p in resources.files("sweeps").iterdir() if str(p).endswith(".yaml"))


def spec_path(source: Optional[str]) -> Path:
    """A spec argument as a file: a path, or a built-in name (none: quickstart); SpecError with a did-you-mean."""
    if source is None:
        return builtin_spec_path("quickstart")
    path = Path(source)
    if path.exists() or "/" in str(source) or str(source).endswith((".yaml", ".yml")):
        return path
    builtin = builtin_spec_path(str(source))
    if builtin:
        return builtin
    close = difflib.get_close_matches(str(source), builtin_spec_names(), n=1)
    raise SpecError(str(source), "", f"no spec file {str(source)!r} here, nor a built-in spec of that name"
                                     f"{f' (did you mean {close[0]!r}?)' if close else ''}; built-in: "
                                     f"{', '.join(builtin_spec_names())}")


def plain(value, where: str = "<dict>", path: str = ""):
    """A spec value as YAML holds it: numpy and other scalars with .item() become Python numbers, paths strings,
    tuples and sets lists, mapping keys strings; anything else is a SpecError naming where it is."""
    if value is None:
        return value
    for kind in (bool, int, float, str):  # builtins, also from their subclasses (numpy's float64 is a float)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, where, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [plain(v, where, f"{path}[{i}]") for i, v in enumerate(items)]
    if callable(getattr(value, "tolist", None)):  # numpy (and torch) scalars and arrays
        return plain(value.tolist(), where, path)
    raise SpecError(where, path, f"{type(value).__name__} is not a spec value (strings, numbers, booleans, lists "
                                 "and mappings of those)")


def load(source: SpecSource = None, *, max_trials: Optional[int] = None, executor: Optional[str] = None,
         smoke: bool = False, overrides: Sequence[str] = (), only: Sequence[str] = ()) -> SweepSpec:
    """A validated spec from a YAML path, a built-in name, a dict or a spec; `max_trials` lifts the cap on the
    grids' size, `executor` swaps the spec's executor for that kind's defaults. `overrides` ("FIELD=VALUE", the
    command line's --set) change fields before validation, so they are checked as the YAML is and change trial
    keys like any setting; `only` keeps those preference methods (--only; the baseline and SFT stages stay).
    Loading reads no file but the spec itself (check() reads what it points at)."""
    if isinstance(source, SweepSpec):
        spec = source if not overrides else parse_spec(
            yaml.safe_dump(source.model_dump(mode="json", exclude_unset=True), sort_keys=False), "<spec>", overrides)
    elif isinstance(source, Mapping):
        spec = parse_spec(yaml.safe_dump(plain(source), sort_keys=False), "<dict>", overrides)
    elif isinstance(source, (str, PurePath)) or source is None:
        spec = load_spec(spec_path(None if source is None else str(source)), overrides)
    else:
        raise SpecError("<spec>", "", f"a spec is a YAML path, a built-in name, a dict or a SweepSpec; got "
                                      f"{type(source).__name__}")
    if max_trials:
        spec = spec.model_copy(update={"max_trials": max_trials})
    if executor:
        if executor not in EXECUTORS:
            raise SpecError("--executor", "", unknown_name_message("executor", executor, EXECUTORS.names()))
        if executor != spec.executor.kind:  # the other kind's defaults; the spec's section is for its kind
            spec = spec.model_copy(update={"executor": TypeAdapter(ExecutorSpec).validate_python({"kind": executor})})
    if only:
        spec = only_methods(spec, only)
    check_plan_size(spec, smoke)
    return spec


def only_methods(spec: SweepSpec, methods: Sequence[str]) -> SweepSpec:
    """The spec with only these of its preference methods (in the spec's order); SpecError with a did-you-mean
    for a method the spec does not sweep."""
    for name in methods:
        if name not in spec.stages.methods:
            raise SpecError("--only", "", unknown_name_message("method of this sweep", name,
                                                               list(spec.stages.methods)))
    kept = {name: grid for name, grid in spec.stages.methods.items() if name in methods}
    return spec.model_copy(update={"stages": spec.stages.model_copy(update={"methods": kept})})


def plan(spec: SweepSpec, *, smoke: bool = False) -> list[StagePlan]:
    """The sweep's stages and trials, in run order; nothing runs."""
    return plan_sweep(_a_spec(spec, "plan"), smoke)


def check(spec: SweepSpec) -> Preflight:
    """What the spec points at (data rows, model and reward folders, the workdir), read as the trials will read
    it; InputError names the field. Returns every input resolved and the warnings."""
    return preflight(_a_spec(spec, "check"))


def tracking_uri(spec: Optional[SweepSpec] = None, uri: Optional[str] = None) -> str:
    """The store a call uses: `uri`, the spec's tracking.uri, $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db."""
    return resolve_tracking_uri(uri, spec.tracking.uri if spec is not None else None)


def _a_spec(spec, call: str) -> SweepSpec:
    """`spec` when it is a loaded SweepSpec; else a SpecError that says to load it first."""
    if not isinstance(spec, SweepSpec):
        raise SpecError("<spec>", "", f"api.{call} takes a loaded spec, not a {type(spec).__name__}: "
                                      f"api.{call}(api.load(...))")
    return spec


def run(spec: SweepSpec, *, tracking_uri: Optional[str] = None, executor=None, smoke: bool = False,
        output: Output = Output(), share_work: bool = True, checked: Optional[Preflight] = None) -> SweepOutcome:
    """Run or resume the sweep (trials already FINISHED are skipped) after checking its inputs (unless `checked`
    holds what check(spec) returned: the command line checks once, before it prints); its outcome."""
    spec = _a_spec(spec, "run")
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    check_reachable(uri)
    check_writable(uri)
    if checked is None:
        check(spec)
    return run_sweep(spec, uri, smoke=smoke, executor=executor, output=output, share_work=share_work)


def _inputs(source: Union[SweepSpec, str], uri: Optional[str], smoke: bool, progress: bool
            ) -> tuple[str, str, ReportInputs]:
    """(sweep name, store, report inputs) of a spec, or of a sweep name without its spec."""
    if isinstance(source, SweepSpec):
        name, store = tracked_name(source, smoke), resolve_tracking_uri(uri, source.tracking.uri)
    elif isinstance(source, str):
        name, store = f"{source}{SMOKE_SUFFIX}" if smoke else source, resolve_tracking_uri(uri, None)
    else:
        raise SpecError("<spec>", "", f"a report reads a loaded spec or a sweep's name, not a {type(source).__name__}: "
                                      "api.load(...) first")
    check_reachable(store)
    if not existing_trials(store, name):
        raise StoreUnavailable(f"no trial of sweep {name!r} in {store}; run it first (sweep run), or give its spec or "
                               "the tracking URI that holds it")
    inputs = (load_report_inputs(source, store, smoke=smoke, show_progress=progress)
              if isinstance(source, SweepSpec) else load_report_inputs_by_name(name, store, show_progress=progress))
    return name, store, inputs


def trials(source: Union[SweepSpec, str], *, tracking_uri: Optional[str] = None, smoke: bool = False
           ) -> pd.DataFrame:
    """One row per preference trial (status, method, hyperparameters, metrics, cost) of a spec or a sweep name."""
    return _inputs(source, tracking_uri, smoke, progress=False)[2].frame


def samples(source: Union[SweepSpec, str], *, tracking_uri: Optional[str] = None, smoke: bool = False
            ) -> pd.DataFrame:
    """One row per finished preference trial and evaluation prompt (score, length, KL, SFT and chosen scores)."""
    return _inputs(source, tracking_uri, smoke, progress=False)[2].samples


def default_report_path(source: Union[SweepSpec, str], name: str, fmt: str) -> Path:
    """Where a report goes without `out`: beside the sweep's other outputs, WORKDIR/reports/NAME-report.FMT (a sweep
    read by name, without its spec, has no workdir here: the current folder)."""
    folder = Path(source.workdir) / "reports" if isinstance(source, SweepSpec) else Path(".")
    return folder / f"{name}-report.{fmt}"


def report(source: Union[SweepSpec, str], *, tracking_uri: Optional[str] = None, out: Optional[str] = None,
           fmt: str = "html", smoke: bool = False, progress: bool = True, grid: Optional[str] = None
           ) -> tuple[Path, str]:
    """Write the robustness report of a spec or a sweep name and log it to the sweep's `sweep NAME` run;
    (the file, that run's id). `grid`: the name of a full-grid sweep in the same store, drawn beside this one in
    the budget curve (for an early-stopped sweep)."""
    if fmt not in REPORT_FORMATS:
        raise SpecError("fmt", "", unknown_name_message("report format", str(fmt), list(REPORT_FORMATS)))
    name, store, inputs = _inputs(source, tracking_uri, smoke, progress)
    if grid is not None:
        inputs.grid = (grid, preference_frame(grid, store))
        if inputs.grid[1].empty:
            raise StoreUnavailable(f"no preference trial of sweep {grid!r} (--grid) in {store}")
        mismatch = grid_mismatch(inputs.frame, inputs.grid[1], inputs.methods)
        if mismatch:
            raise SpecError("--grid", "", f"sweep {grid!r} is not the full grid of sweep {name!r}: {mismatch}; give "
                                          "a sweep of the same grids without early stopping")
    if not inputs.methods or not (inputs.frame["status"] == RunStatus.FINISHED).any():
        raise NothingToReport(f"sweep {name!r} has no FINISHED preference trial yet; nothing to compare")
    check_writable(store)  # the report is logged to the store: refuse before anything is rendered or written
    text = render(inputs, fmt)
    path = Path(out) if out else default_report_path(source, name, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, SweepTracker(store, name).log_report(text, f"report.{fmt}")
