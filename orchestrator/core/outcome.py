"""A trial body's contract with the runtime that runs it: what it is handed and what it returns.

    outcome = body(task, log, judge, checkpointing, report, shared)

The runtime (orchestrator.runtime.lifecycle) opens the trial's run, hands the body a TrialLog to write curves and
tags into it, a RungJudge for early stopping, where to save its training state (Checkpointing), a progress
callback and, on nodes that share no disk, SharedFiles to pass cache entries between nodes, and records the
TrialOutcome the body returns: its metrics and cost, its per-sample records, the checkpoint later stages start
from, the weights to keep, or the rung it was stopped at. A body never writes the run's outcome itself and never
imports the runtime; it raises BodyFailed (with what it held) when it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from orchestrator.core.rungs import RungDecision, TrialStopped
from orchestrator.core.task import TrialTask

Report = Callable[[int, int], None]  # (step, total_steps): a trial's progress, for the driver's bar


class TrialLog(Protocol):
    """What a body writes into its run while it runs (the runtime's TrialLogger; a rank other than 0 gets one that
    writes nothing)."""
    run_id: Optional[str]

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class RungJudge(Protocol):
    """Called at each rung with the rung's metrics: logs them and, under early stopping, decides; raises
    TrialStopped when the trial stops there (the body ends it as an outcome: TrialOutcome.stopped)."""
    def __call__(self, rung: int, step: int, metrics: dict[str, float]) -> Optional[RungDecision]: ...


@dataclass(frozen=True)
class Checkpointing:
    """Save the loop's whole state to `folder`/state.pt every `every` optimizer steps, so a killed, preempted or
    requeued trial continues from its last save with the same result as an uninterrupted run."""
    folder: Path
    every: int

    @property
    def path(self) -> Path:
        return self.folder / "state.pt"

    @property
    def saved_step(self) -> int:
        """The step of the last save (0: none), read without loading the state itself."""
        meta = self.folder / "step"
        return int(meta.read_text()) if meta.is_file() and self.path.is_file() else 0


def checkpointing(task: TrialTask) -> Optional[Checkpointing]:
    """Where a trial saves its training state (executor.checkpoint_every), or None."""
    every = task.runtime.checkpoint_every
    return Checkpointing(task.trial_dir / "resume", every) if every else None


@dataclass(frozen=True)
class DeviceUsage:
    """What a trial held, for its cost: the device (e.g. "cpu", "cuda:NVIDIA H100 80GB HBM3") and how many."""
    device: str = "cpu"
    count: int = 1


@dataclass
class TrialOutcome:
    """What a body returns. `metrics`: the run's final metrics (the phases' seconds included; a stopped trial's:
    none). The runtime writes `samples` to samples.json and the run, tags `checkpoint` for later stages, logs
    `weights` as the run's model/ artifacts (then removes the folder) and ends a `stopped` trial STOPPED. `usage`:
    the device the trial held, for its cost (the body's entry sets it)."""
    usage: DeviceUsage = DeviceUsage()
    metrics: dict[str, float] = field(default_factory=dict)
    samples: Optional[list[dict]] = None
    checkpoint: Optional[Path] = None
    weights: Optional[Path] = None
    stopped: Optional[TrialStopped] = None


class BodyFailed(Exception):
    """A body that broke: raised from the error that broke it (its reason is that error's), with the device it
    held, so a failed trial is charged too."""

    def __init__(self, usage: DeviceUsage):
        super().__init__("the trial body failed")
        self.usage = usage


class SharedFiles(Protocol):
    """Cache entries (reference log-probs) a trial shares with the sweep's trials on other nodes, when the nodes
    share no disk (executor.shared_workdir: false; with a shared workdir its cache folder is shared already and a
    body gets None). `name` is the entry's path under the cache folder, e.g. "ref_logps/<key>.pt"."""

    def fetch(self, name: str, target: Path) -> bool:
        """Put the entry another trial published at `target` (its sha256 in the sidecar beside it, checked against
        the one recorded at publishing); False when none has been published."""
        ...

    def publish(self, name: str, path: Path) -> None:
        """Make the file at `path` (written with its sidecar) the entry `name` for the sweep's other trials."""
        ...


class TrialBody(Protocol):
    def __call__(self, task: TrialTask, log: TrialLog, judge: RungJudge, checkpointing: Optional[Checkpointing],
                 report: Optional[Report], shared: Optional[SharedFiles]) -> TrialOutcome: ...
