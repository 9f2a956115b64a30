"""The stage's rung record (orchestrator.runtime.rung_record): a rung decision reads the same values as a read of
every run of the stage, but only the runs the record cannot hold (running, or ended since it was taken)."""

import orchestrator.runtime.trial_log as trial_log
from orchestrator.core.runs import RunStatus
from orchestrator.core.tags import TAG_KEY, TAG_RUNG_SIGNATURE, TAG_STAGE_KEY
from orchestrator.runtime.rung_record import record_name
from orchestrator.runtime.sweep_runs import SweepTracker
from orchestrator.runtime.trial_log import TrialLogger


def _trial(tracker, parent, key, values, end=RunStatus.FINISHED, signature="sig", stage_key="stage"):
    logger = TrialLogger(tracker.uri, tracker.experiment_id, parent)
    logger.start(f"trial {key}", {TAG_KEY: key, TAG_STAGE_KEY: stage_key, TAG_RUNG_SIGNATURE: signature}, {})
    for rung, value in enumerate(values, start=1):
        logger.log_metrics({f"asha/rung_{rung}": value}, step=rung)
    if end is not None:
        logger.finish(end)
    return logger


class CountingReads:
    """all_runs in trial_log, counting the runs each read returns."""
    def __init__(self, monkeypatch):
        self.runs = 0
        real = trial_log.all_runs

        def counted(*args):
            found = real(*args)
            self.runs += len(found)
            return found
        monkeypatch.setattr(trial_log, "all_runs", counted)
        monkeypatch.setattr("orchestrator.runtime.rung_record.all_runs", counted)


def test_a_decision_reads_the_record_plus_the_running_and_newly_ended_runs_and_gets_the_same_values(
        tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.runtime.rung_record.OVERLAP_MS", 0)  # one clock here: no lag to cover
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "rungs")
    parent = tracker.stage_run("dpo")
    for i in range(12):  # ended before the record: 10 finished, 1 failed, 1 with no value at rung 2
        _trial(tracker, parent, f"old{i}", [i / 10, i / 5] if i != 11 else [1.1],
               RunStatus.FAILED if i == 10 else RunStatus.FINISHED)
    _trial(tracker, parent, "other-signature", [9.0], signature="other")
    _trial(tracker, parent, "other-stage", [9.0], stage_key="elsewhere")
    tracker.rung_records.refresh(parent, "stage")
    running = _trial(tracker, parent, "running", [0.55], end=None)  # running, not in the record
    _trial(tracker, parent, "new", [0.95, 0.3])  # ended after the record
    me = _trial(tracker, parent, "me", [0.5], end=None)

    reads = CountingReads(monkeypatch)
    with_record = {rung: sorted(me.rung_values("stage", f"asha/rung_{rung}", "me", "sig")) for rung in (1, 2)}
    # per decision: the running runs (running, me, the stage run) and the one ended since (new); two decisions
    assert reads.runs <= 2 * 4, "read more than the running and newly ended runs"
    assert with_record[1] == sorted([i / 10 for i in range(11)] + [1.1, 0.55, 0.95])
    assert with_record[2] == sorted([i / 5 for i in range(11)] + [0.3])

    # the same values from every run of the stage (the read without a record)
    monkeypatch.setattr(trial_log, "read_record", lambda repository, signature: None)
    assert {rung: sorted(me.rung_values("stage", f"asha/rung_{rung}", "me", "sig")) for rung in (1, 2)} == with_record
    assert reads.runs > 14
    running.finish(RunStatus.FINISHED)


def test_the_driver_refreshes_the_record_with_only_the_runs_ended_since_and_a_damaged_record_is_not_trusted(
        tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.runtime.rung_record.OVERLAP_MS", 0)
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "rungs")
    parent = tracker.stage_run("dpo")
    for i in range(20):
        _trial(tracker, parent, f"k{i}", [float(i)])
    tracker.rung_records.refresh(parent, "stage")
    _trial(tracker, parent, "late", [99.0])
    reads = CountingReads(monkeypatch)
    tracker.rung_records.refresh(parent, "stage")
    assert reads.runs == 1  # the run ended since, not the 20 before
    me = _trial(tracker, parent, "me", [1.0], end=None)
    assert sorted(me.rung_values("stage", "asha/rung_1", "me", "sig")) == sorted([float(i) for i in range(20)] + [99.0])

    # a record caught half-written is not read: the decision reads the stage's runs and gets the same values
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "sig.json").write_text('{"as_of_ms": 1, "values": {"asha/rung_1": {"k1"')
    tracker.client.log_artifact(parent, str(folder / "sig.json"), record_name("sig").rpartition("/")[0])
    assert sorted(me.rung_values("stage", "asha/rung_1", "me", "sig")) == sorted([float(i) for i in range(20)] + [99.0])
