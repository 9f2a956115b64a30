"""A stage's rung record: the rung values of its ended trials, kept by the driver as one small JSON artifact of the
stage run per rung signature (posweep/rungs/SIGNATURE.json), so that a rung decision does not page through every
run of the stage with its parameters and tags (O(N) per decision, O(N²) over a stage of N trials).

A decision (TrialLogger.rung_values) reads the record, then only the runs it cannot hold yet: those still running
(at most the executor's slots, plus runs a killed driver left RUNNING) and those that ended since the record was
taken (minus OVERLAP_MS, for trial clocks and commits that lag). Trials keep logging their values into their own
runs as before, so the store alone still decides: without a record (a trial run outside a sweep, a record being
rewritten at that instant) the decision reads the stage's runs as it always did. The values are the same either
way; only what is read differs.

    {"as_of_ms": 1767450000000, "values": {"asha/rung_1": {"<trial key>": 0.81, ...}, "asha/rung_2": {...}}}
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from orchestrator.core.runs import RunStatus
from orchestrator.core.tags import TAG_KEY, TAG_RUNG_SIGNATURE, TAG_STAGE_KEY
from orchestrator.runtime.store import all_runs

RECORD_FOLDER = "posweep/rungs"
# Runs ended this long before a record was taken are read again: a trial's end_time is its node's clock, taken
# before its store commits the end (at 32 trials ending a second, ~300 runs re-read per decision).
OVERLAP_MS = 10_000
RUNG_METRIC = re.compile(r"asha/rung_\d+")

# signature -> metric (asha/rung_K) -> trial key -> value
RungValues = dict[str, dict[str, dict[str, float]]]


def stage_query(stage_key: str, signature: Optional[str] = None) -> str:
    query = f"tags.`{TAG_STAGE_KEY}` = '{stage_key}'"
    return query + (f" and tags.`{TAG_RUNG_SIGNATURE}` = '{signature}'" if signature else "")


def merge_rung_values(into: RungValues, runs: Iterable, stage_key: Optional[str] = None) -> None:
    """Each run's asha/rung_K values under its signature and key (a key already there keeps its value: a key run
    again after its process died logs the same value again); only runs of `stage_key` when given."""
    for run in runs:
        tags = run.data.tags
        signature, key = tags.get(TAG_RUNG_SIGNATURE), tags.get(TAG_KEY)
        if not signature or not key or (stage_key is not None and tags.get(TAG_STAGE_KEY) != stage_key):
            continue
        for metric, value in run.data.metrics.items():
            if RUNG_METRIC.fullmatch(metric):
                into.setdefault(signature, {}).setdefault(metric, {}).setdefault(key, value)


def record_name(signature: str) -> str:
    return f"{RECORD_FOLDER}/{signature}.json"


def read_record(repository, signature: str) -> Optional[dict]:
    """The record of one signature from the stage run's artifact repository, or None (none yet, or caught
    half-written)."""
    with tempfile.TemporaryDirectory(prefix="posweep-rungs-") as tmp:
        try:
            path = repository.download_artifacts(record_name(signature), tmp)
            record = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - no record or a partial one: the decision reads the stage's runs
            return None
    return record if isinstance(record, dict) and "as_of_ms" in record and "values" in record else None


def values_since(client, experiment_id: str, stage_key: str, as_of_ms: int) -> RungValues:
    """Rung values of the stage's runs a record taken at `as_of_ms` may lack: running ones, and those ended since.
    The queries name no tag: MLflow's SQL store joins the tags table once per tag filter, over every run of the
    experiment (measured: 2.5x slower at 5,000 runs than at 100), while the sweep's running and newly ended runs are
    few; the stage is picked here."""
    found: RungValues = {}
    for query in ("attributes.status = 'RUNNING'", f"attributes.end_time >= {as_of_ms - OVERLAP_MS}"):
        merge_rung_values(found, all_runs(client, experiment_id, query), stage_key)
    return found


class RungRecords:
    """The driver's side: per stage run, the rung values of the stage's ended runs, refreshed after each trial
    ends with a read of only the runs ended since the last refresh, and written when they changed."""

    def __init__(self, client, experiment_id: str):
        self.client, self.experiment_id = client, experiment_id
        self.kept: dict[str, tuple[int, RungValues]] = {}  # stage run id -> (as of, values)

    def refresh(self, stage_run_id: str, stage_key: str) -> None:
        """Bring the stage's record up to now. A store that fails meanwhile leaves the last record, which stays
        right (decisions read what ended after it): the sweep goes on, and its trials report the store's state."""
        try:
            self._refresh(stage_run_id, stage_key)
        except Exception:  # noqa: BLE001 - the record only saves reads; it is never the only copy of a value
            pass

    def _refresh(self, stage_run_id: str, stage_key: str) -> None:
        as_of = int(time.time() * 1000)  # before the read: a run ending meanwhile is read again next time
        previous = self.kept.get(stage_run_id)
        # the first read: every run of the stage; then only the experiment's runs ended since (values_since: why
        # no tag filter)
        query = stage_query(stage_key) if previous is None else f"attributes.end_time >= {previous[0] - OVERLAP_MS}"
        ended = [r for r in all_runs(self.client, self.experiment_id, query) if r.info.status != RunStatus.RUNNING]
        values: RungValues = previous[1] if previous else {}  # the driver's own copy: merged into in place
        before = {signature: _count(by_metric) for signature, by_metric in values.items()}
        merge_rung_values(values, ended, stage_key)
        self.kept[stage_run_id] = (as_of, values)
        changed = [s for s, by_metric in values.items() if _count(by_metric) != before.get(s)]
        # a record left as it was keeps its older as_of_ms: decisions then read a few more ended runs, still right
        with tempfile.TemporaryDirectory(prefix="posweep-rungs-") as tmp:
            for signature in changed:
                path = Path(tmp) / f"{signature}.json"
                path.write_text(json.dumps({"as_of_ms": as_of, "values": values[signature]}))
                self.client.log_artifact(stage_run_id, str(path), RECORD_FOLDER)


def _count(by_metric: dict[str, dict[str, float]]) -> int:
    """Values held for one signature (keys are only ever added, so a new count means new values)."""
    return sum(len(by_key) for by_key in by_metric.values())
