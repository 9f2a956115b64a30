"""Rank 0 of a multi-process trial runs in another process (spawned, a Ray Train worker, a Slurm task): what it logs
reaches the trial's run through a JSON-lines file the trial's own process tails, and its TrialOutcome through
outcome.json. Both are checked here without processes: the file formats and the tail are what cross them."""

import threading
import time

import pytest

from orchestrator.core.outcome import TrialOutcome
from trainers import distributed
from trainers.distributed import LOG_FILE, RelayedLog, read_outcome, relayed_log, replay, write_outcome


class RecordingLog:
    """A TrialLog that remembers every call, in order."""
    run_id = "run"

    def __init__(self, fail_on_tags: bool = False):
        self.calls, self.fail_on_tags = [], fail_on_tags

    def log_metrics(self, metrics, step=0):
        self.calls.append(("metrics", metrics, step))

    def set_tags(self, tags):
        if self.fail_on_tags:
            raise RuntimeError("the store refused the tag")
        self.calls.append(("tags", tags))


def test_relayed_records_replay_as_the_same_calls_in_order(tmp_path):
    relayed = RelayedLog(tmp_path / LOG_FILE)
    relayed.log_metrics({"train/loss": 0.5}, step=1)
    relayed.set_tags({"posweep.device": "cpu"})
    relayed.log_metrics({"train/loss": 0.25, "train/accuracy": 1.0}, step=2)
    log = RecordingLog()
    replay((tmp_path / LOG_FILE).read_text().splitlines(), log)
    assert log.calls == [("metrics", {"train/loss": 0.5}, 1), ("tags", {"posweep.device": "cpu"}),
                         ("metrics", {"train/loss": 0.25, "train/accuracy": 1.0}, 2)]


def test_the_tail_holds_back_a_line_still_being_written(tmp_path):
    path = tmp_path / LOG_FILE
    tail = distributed._Tail(path)
    assert tail.new_lines() == []  # no file yet
    path.write_text('{"tags": {"a": "1"}}\n{"metrics": {"x"')
    assert tail.new_lines() == ['{"tags": {"a": "1"}}']
    with open(path, "a") as f:
        f.write(': 1.0}, "step": 4}\n')
    assert tail.new_lines() == ['{"metrics": {"x": 1.0}, "step": 4}']
    assert tail.new_lines() == []


def test_relayed_log_forwards_while_the_ranks_run_and_what_is_left_after(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "RELAY_POLL_S", 0.01)
    log, relayed = RecordingLog(), RelayedLog(tmp_path / LOG_FILE)
    with relayed_log(tmp_path, log):
        relayed.log_metrics({"train/loss": 1.0}, step=1)
        deadline = time.monotonic() + 5
        while not log.calls and time.monotonic() < deadline:  # forwarded while the block still runs
            time.sleep(0.01)
        assert log.calls == [("metrics", {"train/loss": 1.0}, 1)]
        relayed.log_metrics({"train/loss": 0.5}, step=2)  # written last: forwarded once the block ends
    assert log.calls[-1] == ("metrics", {"train/loss": 0.5}, 2) and len(log.calls) == 2
    assert not any(t.name == "rank-0-log" for t in threading.enumerate())


def test_a_record_the_store_refuses_fails_the_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "RELAY_POLL_S", 0.01)
    relayed = RelayedLog(tmp_path / LOG_FILE)
    with pytest.raises(RuntimeError, match="refused the tag"):
        with relayed_log(tmp_path, RecordingLog(fail_on_tags=True)):
            relayed.set_tags({"posweep.device": "cpu"})
            time.sleep(0.1)


@pytest.mark.parametrize("outcome", [
    TrialOutcome(metrics={"mean_score": 0.5, "time_train_s": 12.0}, samples=[{"prompt": "p", "score": 1.5}]),
    TrialOutcome(metrics={"mean_score": -1.0}, samples=None),
])
def test_an_outcome_reads_back_as_written(tmp_path, outcome):
    if outcome.samples is not None:  # with the folders a finished SFT / preference trial hands on
        outcome.checkpoint, outcome.weights = tmp_path / "checkpoint", tmp_path / "weights"
    write_outcome(tmp_path / "outcome.json", outcome)
    assert read_outcome(tmp_path / "outcome.json") == outcome
