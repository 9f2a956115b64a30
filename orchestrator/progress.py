"""Progress bar over a sweep's trials: done/total, and the current trial's training step."""

from __future__ import annotations

import sys

from tqdm import tqdm

from orchestrator.task import TrialResult, TrialTask


class TrialProgress:
    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=already_done, unit="trial", desc="trials", dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr)  # None: off when not a TTY
        self.current = ""
        self.failed = 0

    def trial_started(self, task: TrialTask) -> None:
        self.current = task.trial.run_name
        self.bar.set_postfix_str(self.current)

    def trial_step(self, step: int, total: int) -> None:
        self.bar.set_postfix_str(f"{self.current} | step {step}/{total}")

    def trial_done(self, result: TrialResult) -> None:
        self.bar.update(1)
        if result.status != "FINISHED":
            self.failed += 1
            self.bar.write(f"FAILED {self.current}: {result.error}")

    def close(self) -> None:
        self.bar.close()
