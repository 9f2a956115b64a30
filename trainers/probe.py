"""A trial body that trains nothing: run through the same lock, MLflow run and result path as a real trial
(cluster.probe.probe_trial), it logs `steps` metric points and reports a score computed from its hyperparameters. For measuring an executor's
dispatch overhead (benchmarks/bench_dispatch.py), testing executors, tracking under load and search, and
(with `prompts`) whole no-op sweeps and reports at scale, without paying for training."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from orchestrator.core.methods import METHODS, StageKind
from orchestrator.core.outcome import Checkpointing, Report, RungJudge, SharedFiles, TrialLog, TrialOutcome
from orchestrator.core.rungs import TrialStopped, rungs_of
from orchestrator.core.task import TrialTask
from orchestrator.infra.files import write_folder_atomically

# Method levels of the fake per-sample scores: a report over probe trials has a known ordering.
PROBE_METHOD_LEVEL = {"dpo": 1.0, "simpo": 1.2, "ln_dpo": 1.1}


NOOP_SWEEP = """\
name: {name}
workdir: {workdir}
data: {{kind: synthetic, n_train: 64, n_eval: 16}}
evaluation: {{num_prompts: 16{rungs}}}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [{betas}], learning_rate: [{lrs}]}}}}
    simpo: {{grid: {{beta: [{betas}], gamma: [0.5], learning_rate: [{lrs}]}}}}
    ln_dpo: {{grid: {{beta: [{betas}], learning_rate: [{lrs}]}}}}
executor: {executor}
tracking: {{server_restarts: {restarts}}}
{search}"""

# With early stopping: one rung, half way, and ASHA (its defaults); a probe reports its probe_score there.
# min_peers 1: the executor tests run two probe trials, and the second must be stopped against the first
ASHA_RUNGS, ASHA_SEARCH = ", rungs: [0.5]", "search: {kind: grid, early_stopping: {kind: asha, min_peers: 1}}\n"


def noop_sweep_yaml(name: str, workdir, n_beta: int, n_lr: int, executor: str = "{kind: local}",
                    restarts: int = 3, early_stopping: bool = False) -> str:
    """A sweep spec for probe trials at scale: base + 1 SFT + 3 methods x n_beta x n_lr preference trials (with
    `early_stopping`, a rung half way and ASHA)."""
    betas = ", ".join(f"{0.05 * (i + 1):.2f}" for i in range(n_beta))
    lrs = ", ".join(f"{1e-5 * (i + 1):.4g}" for i in range(n_lr))  # distinct past 9 (1e-04 twice with .0e)
    rungs, search = (ASHA_RUNGS, ASHA_SEARCH) if early_stopping else ("", "")
    return NOOP_SWEEP.format(name=name, workdir=workdir, betas=betas, lrs=lrs, executor=executor, restarts=restarts,
                             rungs=rungs, search=search)


def probe_score(hparams: dict) -> float:
    """A smooth score with its maximum at learning_rate 1e-4, beta 1 (for search tests)."""
    lr = float(hparams.get("learning_rate", 1e-4))
    beta = float(hparams.get("beta", 1.0))
    return -((math.log10(lr) + 4) ** 2) - (beta - 1) ** 2


def probe_samples(task: TrialTask, prompts: int) -> tuple[list[dict], dict[str, float]]:
    """Per-sample records shaped like trainers.evaluate's (score, length, KL, SFT and chosen scores), seeded by
    the trial key, with a method- and beta-dependent mean score; and the metrics they summarise."""
    rng = np.random.default_rng(int(task.trial.trial_key[:8], 16))
    level = PROBE_METHOD_LEVEL.get(task.trial.method, 0.0) - abs(
        np.log10(float(task.trial.hparams.get("beta", 1.0)))) * 0.3
    scores = rng.normal(level, 1.0, prompts)
    lengths = rng.integers(3, 30, prompts)
    kls = rng.gamma(2.0, size=prompts)
    samples = [{"prompt_id": f"p{i}", "prompt": "...", "generation": "...", "length": int(lengths[i]),
                "score": float(scores[i]), "chosen_score": 0.5, "sft_score": 0.3, "kl": float(kls[i])}
               for i in range(prompts)]
    metrics = {"mean_score": float(scores.mean()), "win_vs_chosen": float((scores > 0.5).mean()),
               "win_vs_sft": float((scores > 0.3).mean()), "kl": float(kls.mean()), "length": float(lengths.mean())}
    return samples, metrics


def _probe_outcome(task: TrialTask, prompts: int) -> TrialOutcome:
    """What a real trial leaves for later stages and the report: samples (samples.json, file and artifact) and, for
    an SFT trial, a finished checkpoint folder (no weights: no later probe loads it, but the driver checks it)."""
    samples, metrics = probe_samples(task, prompts)
    outcome = TrialOutcome(metrics=metrics, samples=samples)
    if METHODS[task.trial.method].kind is StageKind.SFT:
        outcome.checkpoint = write_folder_atomically(
            task.trial_dir / "checkpoint", lambda folder: (folder / "probe.txt").write_text(task.trial.trial_key),
            reuse=False)
    return outcome


@dataclass(frozen=True)
class ProbeBody:
    """A TrialBody (orchestrator.core.outcome) that trains nothing: `steps` metric points spread over `seconds`,
    optionally dying once (SIGKILL) to test an executor's retries, and `prompts` fake samples for whole no-op
    sweeps. With evaluation.rungs, each rung reports probe_score to the trial's judge (early stopping as real
    trials). With `timings`, what its tracking calls took is logged at the end (probe/log_ms_STEP, probe/rung_ms:
    the rung decision, its read of the stage included), for load benchmarks. cluster.probe.probe_trial runs it
    through the real trial path."""
    steps: int = 0
    seconds: float = 0.0
    die_once: bool = False
    prompts: int = 0
    timings: bool = False
    seconds_per_epoch: float = 0.0  # more sleep: this × the trial's epochs (lengths that vary with a hyperparameter)

    def __call__(self, task: TrialTask, log: TrialLog, judge: RungJudge, checkpointing: Optional[Checkpointing],
                 report: Optional[Report], shared: Optional[SharedFiles]) -> TrialOutcome:
        marker = task.trial_dir / "probe-died"
        if self.die_once and not marker.exists():  # a worker lost mid-trial: the executor must retry it
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        rungs = rungs_of(task.trial.evaluation, self.steps) if self.steps else {}
        seconds = self.seconds + self.seconds_per_epoch * float(task.trial.hparams.get("epochs", 1))
        took: dict[str, float] = {}
        for step in range(1, self.steps + 1):  # `seconds` is spread over the steps, like a training loop's logging
            with _timed(took, f"probe/log_ms_{step}"):
                log.log_metrics({"probe/step_value": float(step)}, step)
            if step in rungs:  # the score it will finish with, as every rung's (ASHA's decisions are then known)
                try:
                    with _timed(took, "probe/rung_ms"):
                        judge(rungs[step], step, {"mean_score": probe_score(task.trial.hparams)})
                except TrialStopped as stopped:
                    if self.timings:
                        log.log_metrics(took)
                    return TrialOutcome(stopped=stopped)
            if report:
                report(step, self.steps)
            time.sleep(seconds / self.steps)
        if not self.steps:
            time.sleep(seconds)
        outcome = _probe_outcome(task, self.prompts) if self.prompts else TrialOutcome()
        outcome.metrics.update({"mean_score": outcome.metrics.get("mean_score", probe_score(task.trial.hparams)),
                                "probe_steps": float(self.steps), **(took if self.timings else {})})
        return outcome


@contextlib.contextmanager
def _timed(into: dict[str, float], name: str):
    """Milliseconds the block took, into[name] (also when it raises: a rung's stop is a decision too)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        into[name] = (time.perf_counter() - started) * 1000
