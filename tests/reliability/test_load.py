"""Load: a 200-trial no-op sweep through Ray with the MLflow server `sweep run` starts (for a SQLite file and for a
PostgreSQL database): every trial FINISHED
exactly once, and the robustness report over the 198 preference runs builds."""

import functools
import time

import pytest
from local_postgres import tracking_store

from analysis.report import render
from cluster.probe import probe_trial
from orchestrator.core.spec_file import parse_spec
from orchestrator.pipeline import run_sweep
from orchestrator.progress import Output
from orchestrator.reporting import load_report_inputs
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml

RAY = "{kind: ray, num_cpus: 2, max_concurrent_trials: 2, resources_per_trial: {cpu: 1}}"
PROMPTS = 20


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_two_hundred_noop_trials_through_ray_and_the_server_then_a_report(tmp_path, no_ray_left, store, request):
    """The same on a SQLite file and on a PostgreSQL database, each served by the sweep's MLflow server."""
    store_uri = tracking_store(store, tmp_path, request)
    spec = parse_spec(noop_sweep_yaml("load", tmp_path / "work", n_beta=11, n_lr=6, executor=RAY))
    started = time.monotonic()
    messages: list[str] = []
    outcome = run_sweep(spec, store_uri, output=Output(messages.append, bar=False),
                        trial_fn=functools.partial(probe_trial, steps=2, prompts=PROMPTS))
    sweep_seconds = time.monotonic() - started
    assert any("through an MLflow server at http://127.0.0.1:" in m for m in messages)
    assert outcome.ran == 200 and outcome.failed == 0

    records = SweepTracker(store_uri, "load").trials()
    finished = [r.trial_key for r in records if r.status == "FINISHED"]
    assert len(records) == len(finished) == len(set(finished)) == 200  # no duplicate, no leftover run

    started = time.monotonic()
    inputs = load_report_inputs(spec, store_uri, show_progress=False)
    page = render(inputs, "html")
    report_seconds = time.monotonic() - started
    assert len(inputs.frame) == 198 and len(inputs.samples) == 198 * PROMPTS
    assert page.count("<h2") >= 5 and "simpo" in page and "ln_dpo" in page
    print(f"\n200 no-op trials through ray + server ({store}): {sweep_seconds:.1f} s; report load+render "
          f"{report_seconds:.1f} s")
