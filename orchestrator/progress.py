"""What a running sweep tells its user: a progress bar on a terminal, one line per finished trial otherwise.

On a terminal (stderr a TTY) the bar shows done/total and the current trial's training step. Piped into a file
(CI, nohup, a Slurm job log) or with the bar turned off (`sweep run --no-progress`), carriage-return frames
would fill the log with partial lines, so each finished trial is one line instead:

    [5/21] dpo b=0.3 lr=0.0003 e=1: FINISHED in 2.4 s, mean_score 2.098
    [6/21] dpo b=0.5 lr=0.0003 e=3: STOPPED in 0.9 s: rung 1 (step 38): rung/mean_score 0.81 below the cutoff ...
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from tqdm import tqdm

from orchestrator.core.runs import RunStatus
from orchestrator.core.task import TrialResult, TrialTask


@dataclass(frozen=True)
class Output:
    """Where a sweep's messages go: `echo` takes each line; `bar` asks for a progress bar, drawn only when stderr
    is a terminal (else every finished trial is a line through `echo`)."""
    echo: Callable[[str], None] = print
    bar: bool = True


QUIET = Output(lambda _: None, bar=False)  # tests, and callers that read the outcome instead


def trial_line(index: int, total: int, name: str, result: TrialResult) -> str:
    """'[5/21] dpo b=0.3 ...: FINISHED in 2.4 s, mean_score 2.098' (or the failure's or the stop's reason)."""
    line = f"[{index}/{total}] {name}: {result.status} in {result.wall_seconds:.1f} s"
    score = result.metrics.get("mean_score")
    if result.status == RunStatus.FINISHED and score is not None and math.isfinite(score):
        return f"{line}, mean_score {score:.3f}"
    return f"{line}: {result.error}" if result.error else line


class TrialProgress:
    """The executor's Progress (cluster.base): fed trial starts, steps and results, in any order."""

    def __init__(self, total: int, already_done: int, output: Output):
        self.total, self.done, self.output = total, already_done, output
        drawn = output.bar and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=already_done, unit="trial", desc="trials", dynamic_ncols=True,
                        file=sys.stderr) if drawn else None
        self.names: dict[str, str] = {}  # trial key -> run name, for results that arrive without one
        self.current = ""
        self.failed = 0
        self.stopped = 0

    def expect(self, tasks: Iterable[TrialTask]) -> None:
        """The tasks of the next batch (an executor may report a result before its start)."""
        self.names.update((t.trial.trial_key, t.trial.run_name) for t in tasks)

    def trial_started(self, task: TrialTask) -> None:
        self.current = task.trial.run_name
        if self.bar is not None:
            self.bar.set_postfix_str(self.current)

    def trial_step(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.current} | step {step}/{total}")

    def trial_done(self, result: TrialResult) -> None:
        self.done += 1
        self.failed += result.status == RunStatus.FAILED
        self.stopped += result.status == RunStatus.STOPPED
        name = self.names.get(result.trial_key, result.trial_key[:12])
        if self.bar is None:
            self.output.echo(trial_line(self.done, self.total, name, result))
            return
        self.bar.update(1)
        if self.stopped:
            self.bar.set_description(f"trials ({self.stopped} stopped early)")
        if result.status == RunStatus.FAILED:
            self.bar.write(f"FAILED {name}: {result.error}")

    def stage_done(self, stage: str, planned: int, finished: int, failed: int, stopped: int = 0) -> None:
        """A line per stage when trials are lines too (the bar says it on a terminal)."""
        if self.bar is None:
            early = f", {stopped} stopped early" if stopped else ""
            self.output.echo(f"stage {stage}: {finished} of {planned} finished, {failed} failed{early}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
