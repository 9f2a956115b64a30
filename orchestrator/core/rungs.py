"""Early stopping at rungs (ASHA), decided by each trial itself from the tracking store; torch-free.

A trial with evaluation.rungs evaluates at those fractions of its steps (trainers.rungs) and hands the rung's
metrics to its RungJudge, which logs them into the trial's run (rung/* at the training step, and the value
ASHA compares as asha/rung_K) and, with search.early_stopping set, reads the values the stage's other trials
logged at the same rung and applies the ASHA rule: below the (1 - 1/η) quantile of theirs, the trial stops
(TrialStopped: the body returns it as TrialOutcome.stopped, and the lifecycle records the run STOPPED).

Why the tracking store carries the decision, not a scheduler in the driver or an Optuna study: every trial
already reaches it, from the driver (local), a Ray worker or a Slurm node (through the MLflow server a parallel
sweep runs), it outlives a killed driver, and it is what a rerun reads to know which keys are done; a second
store (an Optuna journal every worker would open, a Ray scheduler's memory) could disagree with it after a
crash. The rule only needs each trial's value at one rung, so one search of the stage's runs per rung suffices.
As with Ray Tune's ASHAScheduler, which trials a decision compares against depends on which reached the rung
first: on a parallel executor that is timing, so decisions are not reproducible run to run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from orchestrator.core.spec import AshaSpec, EvaluationSpec

RUNG_PREFIX = "rung/"
DEFAULT_RUNG_METRIC = f"{RUNG_PREFIX}mean_score"  # what asha/rung_K holds without early stopping


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def rung_signature(evaluation: EvaluationSpec, settings: Optional[AshaSpec]) -> str:
    """What makes two trials' rung values comparable: where the rungs fall (rungs, rung_every or rung_steps),
    which prompts a rung evaluates (rung_prompts of the first num_prompts, drawn with seed) and which metric is
    compared. Tagged on every trial run with rungs; a decision reads only values of runs with the same one, so a
    rerun with other rung settings never compares a value taken at step 10 with one taken at step 2."""
    return _digest({"rungs": evaluation.rungs, "rung_every": evaluation.rung_every,
                    "rung_steps": evaluation.rung_steps, "rung_prompts": evaluation.rung_prompts,
                    "num_prompts": evaluation.num_prompts, "seed": evaluation.seed,
                    "metric": settings.metric if settings else DEFAULT_RUNG_METRIC})


def stop_signature(evaluation: EvaluationSpec, settings: Optional[AshaSpec]) -> Optional[str]:
    """The early-stopping rule a stop was decided under: the rung signature and ASHA's η, mode, min_rung and
    min_peers (None without early stopping). Tagged on every STOPPED run: a stop holds (the trial counts as done)
    only while the sweep stops early under the same rule (runs.resume_done)."""
    if settings is None:
        return None
    rule = {"rungs": rung_signature(evaluation, settings), "reduction_factor": settings.reduction_factor,
            "mode": settings.mode, "min_rung": settings.min_rung}
    if settings.min_peers:  # stops decided before min_peers existed were decided with none: their rule is unchanged
        rule["min_peers"] = settings.min_peers
    return _digest(rule)


def rung_value_key(rung: int) -> str:
    """The metric holding the value ASHA compared at `rung` (1-based), one per rung so the stage's runs can be
    read at any rung (the rung/* curves hold only their latest point in a search)."""
    return f"asha/rung_{rung}"


def logged_rung_values(metrics: dict[str, float]) -> dict[int, float]:
    """{rung: the value ASHA compared there} read back from a trial's metrics (the asha/rung_K keys)."""
    found = {re.fullmatch(r"asha/rung_(\d+)", key): value for key, value in metrics.items()}
    return dict(sorted((int(match.group(1)), value) for match, value in found.items() if match))


def rung_steps(fractions: Sequence[float], total_steps: int, every: Optional[int] = None,
               at: Sequence[int] = ()) -> dict[int, int]:
    """{optimizer step: rung number (1-based)} of a trial of `total_steps`: rung k at round(f_k * total), at
    least step 1 (evaluation.rungs), at step k * every (evaluation.rung_every), or at the k-th of `at`
    (evaluation.rung_steps). A rung that would fall on the last step (the final evaluation's) or later, or on an
    earlier rung's step (a very short trial), is not held; rung numbers stay those of the spec, so trials
    compare like with like."""
    if every is not None:
        return {k * every: k for k in range(1, (total_steps - 1) // every + 1)}
    if at:
        return {step: k for k, step in enumerate(at, start=1) if step < total_steps}
    steps: dict[int, int] = {}
    for rung, fraction in enumerate(fractions, start=1):
        step = max(1, round(fraction * total_steps))
        if step < total_steps and step not in steps:
            steps[step] = rung
    return steps


def rungs_of(evaluation: EvaluationSpec, total_steps: int) -> dict[int, int]:
    """{optimizer step: rung number} of a trial of `total_steps` under the spec's evaluation section, however it
    places its rungs (rungs, rung_every or rung_steps)."""
    return rung_steps(evaluation.rungs, total_steps, evaluation.rung_every, evaluation.rung_steps)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy.percentile's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class RungDecision:
    """What ASHA decided for one trial at one rung."""
    rung: int
    step: int
    metric: str
    value: float
    cutoff: Optional[float]   # None: no other trial had reached the rung (the first always goes on)
    compared: int             # other trials' finite values at this rung
    stop: bool

    def reason(self, reduction_factor: float, min_peers: int = 0) -> str:
        """In words: 'rung 1 (step 13): rung/mean_score 1.2, outside the best third of the 7 other trials at this
        rung (cutoff 1.53)'."""
        where = f"rung {self.rung} (step {self.step}): {self.metric} {self.value:.4g}"
        if not math.isfinite(self.value):
            return f"{where}, not a number"
        others = f"{self.compared} other trial{'s' * (self.compared != 1)}"
        if self.cutoff is None:
            return (f"{where}, the first trial at this rung" if not self.compared else
                    f"{where}; only {others} reached this rung, fewer than the {min_peers} early stopping waits for")
        side = "outside" if self.stop else "within"
        return (f"{where}, {side} the best {_share(reduction_factor)} of the {others} at this rung "
                f"(cutoff {self.cutoff:.4g})")


def _share(reduction_factor: float) -> str:
    """1/η in words: 'half', 'third', 'quarter', else '1/η'."""
    return {2.0: "half", 3.0: "third", 4.0: "quarter"}.get(float(reduction_factor), f"1/{reduction_factor:g}")


def asha_decision(value: float, others: Sequence[float], reduction_factor: float, mode: str = "max",
                  min_peers: int = 0) -> tuple[bool, Optional[float]]:
    """(stop, cutoff) for a trial whose rung value is `value`, given the other trials' values at the rung: the
    cutoff is their (1 - 1/η) quantile (for mode min, their 1/η quantile, lower being better); the trial stops
    when its value is worse than the cutoff, or not a finite number. No finite other value, or fewer than
    `min_peers`: no cutoff, and a finite value goes on."""
    finite = [v for v in others if math.isfinite(v)]
    if not finite or len(finite) < min_peers:
        return (not math.isfinite(value)), None
    better_is_higher = mode == "max"
    cutoff = quantile(finite, 1 - 1 / reduction_factor if better_is_higher else 1 / reduction_factor)
    if not math.isfinite(value):
        return True, cutoff
    return (value < cutoff if better_is_higher else value > cutoff), cutoff


class TrialStopped(Exception):
    """Raised by the RungJudge when ASHA stops a trial at a rung: the body's loop unwinds to its top, which returns
    it as TrialOutcome.stopped; the lifecycle ends the run STOPPED."""

    def __init__(self, decision: RungDecision, reason: str, values: dict[int, float]):
        super().__init__(reason)
        self.decision, self.reason = decision, reason
        self.values = values  # rung -> the compared value at every rung the trial reached
