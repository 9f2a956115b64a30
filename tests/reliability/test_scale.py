"""The 1,000-trial simulation (benchmarks/bench_scale.py) at 100 trials: probe trials under ASHA, 16 at once on Ray,
logging through the sweep's MLflow server into a SQLite file and into a PostgreSQL database. Every planned key
ends exactly once (FINISHED or STOPPED), none is lost, rung decisions were made against the stage's rung record,
and the report builds from the store."""

import functools

import pytest
from local_postgres import tracking_store

from analysis.report import render
from cluster.probe import probe_trial
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_KIND, TAG_STAGE
from orchestrator.grid import plan_sweep
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.reporting import load_report_inputs
from orchestrator.runtime.store import store_client
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.probe import noop_sweep_yaml

RAY = "{kind: ray, num_cpus: 2, max_concurrent_trials: 16, resources_per_trial: {cpu: 0.125}}"


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_hundred_trials_sixteen_at_once_under_asha_end_exactly_once(tmp_path, no_ray_left, store, request):
    uri = tracking_store(store, tmp_path, request)
    spec = parse_spec(noop_sweep_yaml("scale", tmp_path / "work", n_beta=6, n_lr=6, executor=RAY,
                                      early_stopping=True))
    outcome = run_sweep(spec, uri, output=QUIET, trial_fn=functools.partial(
        probe_trial, steps=2, seconds=0.3, prompts=8, timings=True))
    planned = {t.trial_key for s in plan_sweep(spec) for t in s.trials}
    assert len(planned) == 110 and outcome.failed == 0

    records = SweepTracker(uri, "scale").trials()
    ended = [r.trial_key for r in records if r.status in ("FINISHED", "STOPPED")]
    assert sorted(ended) == sorted(planned)  # none lost, none twice
    assert len(records) == len(planned)  # no retry was needed either
    stopped = [r for r in records if r.status == "STOPPED"]
    assert stopped and all("probe/rung_ms" in r.metrics for r in stopped)

    tracker = SweepTracker(uri, "scale")
    [dpo] = store_client(uri).search_runs([tracker.experiment_id],
                                          f"tags.`{TAG_KIND}` = 'stage' and tags.`{TAG_STAGE}` = 'dpo'")
    assert store_client(uri).list_artifacts(dpo.info.run_id, "posweep/rungs"), "no rung record kept for the stage"

    inputs = load_report_inputs(spec, uri, show_progress=False)
    assert len(inputs.frame) == 108 and "<h2" in render(inputs, "html")
