"""cluster.base.drive: slots kept full, the next task asked the moment one ends, in-flight tasks cancelled when the
driver raises; run_tasks returns one result per task in the given order."""

import pytest

from cluster.base import BlockingRun, Submitted, drive
from orchestrator.core.task import TrialResult


class FakeExecutor(BlockingRun):
    """Tasks are ints (their duration); a simulated clock ends the one due first."""
    def __init__(self, slots):
        self.slots, self.now, self.events, self.cancelled = slots, 0, [], []

    def submit(self, task, trial_fn, progress=None):
        self.events.append(("submit", task, self.now))
        return Submitted(task, self.now + task)

    def wait_any(self, pending, progress=None):
        first = min(pending, key=lambda h: h.ref)
        self.now = first.ref
        return [(first, TrialResult(trial_key=str(first.task), run_id=None, status="FINISHED"))]

    def cancel(self, pending):
        self.cancelled += [h.task for h in pending]


def test_a_freed_slot_takes_the_next_task_at_once():
    executor = FakeExecutor(slots=2)
    queue = [10, 1, 1, 1, 1][::-1]
    ended = []
    drive(executor, lambda: queue.pop() if queue else None, None, lambda task, result: ended.append(task))
    # the long task (10) holds one slot; the four short ones run one after another in the other
    assert [(t, at) for _, t, at in executor.events] == [(10, 0), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert ended == [1, 1, 1, 1, 10]


def test_results_come_back_in_task_order_and_in_flight_tasks_are_cancelled_on_an_error():
    executor = FakeExecutor(slots=3)
    assert [r.trial_key for r in executor.run([5, 1, 3, 2], None)] == ["5", "1", "3", "2"]

    def boom(task, result):
        raise RuntimeError("the driver failed")

    queue = [5, 1, 3][::-1]
    with pytest.raises(RuntimeError):
        drive(executor, lambda: queue.pop() if queue else None, None, boom)
    assert sorted(executor.cancelled) == [3, 5]
