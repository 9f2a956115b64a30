"""Trials that break on their own: a diverging loss and an evaluation that raises. Each is marked FAILED with
its reason and step, the sweep goes on, and the robustness report counts them."""

import torch

from analysis.report import render
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_FAILURE
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.reporting import load_report_inputs
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers import losses, trial as trial_module

SPEC = """\
name: faults
workdir: {workdir}
data: {{kind: synthetic, n_train: 96, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 2}}
evaluation: {{num_prompts: 16, max_new_tokens: 12}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.2, 0.3, 0.5], learning_rate: [3.0e-4]}}}}
"""
DIVERGING_BETA = 0.2
EVALUATE_RAISES_ON_CALL = 4  # local order: base, SFT, dpo b=0.1, (b=0.2 never evaluates), b=0.3


def test_diverging_and_evaluation_failures_are_failed_runs_with_reason_and_step(tmp_path, monkeypatch):
    real_dpo = losses.dpo_loss

    def diverging_dpo(*args, beta, **kwargs):
        out = real_dpo(*args, beta=beta, **kwargs)
        return (out[0] * torch.tensor(float("nan")), *out[1:]) if beta == DIVERGING_BETA else out

    calls = []
    real_evaluate = trial_module.evaluate

    def evaluate_that_raises_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == EVALUATE_RAISES_ON_CALL:
            raise ValueError("reward model returned no score for prompt 3")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(losses, "dpo_loss", diverging_dpo)  # the method catalogue's loss for dpo
    monkeypatch.setattr(trial_module, "evaluate", evaluate_that_raises_once)
    spec = parse_spec(SPEC.format(workdir=tmp_path / "work"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(spec, uri, output=QUIET)
    assert outcome.ran == 6 and outcome.failed == 2  # the sweep went on past both

    dpo = {r.run_name: r for r in SweepTracker(uri, "faults").trials("dpo")}
    assert [dpo[n].status for n in sorted(dpo)] == ["FINISHED", "FAILED", "FAILED", "FINISHED"]
    diverged = dpo["dpo b=0.2 lr=0.0003 e=1"].tags[TAG_FAILURE]
    assert diverged.startswith("NonFiniteLoss: non-finite loss nan at step 1;")
    evaluation = dpo["dpo b=0.3 lr=0.0003 e=1"].tags[TAG_FAILURE]
    assert evaluation == ("evaluation (after training step 6) failed: ValueError: reward model returned no score "
                          "for prompt 3")

    inputs = load_report_inputs(spec, uri, show_progress=False)
    assert sorted(inputs.frame["status"]) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    report = render(inputs, "md")
    assert "2 of 4 runs failed" in report and "Failed runs (2)" in report
    assert "reward model returned no score" in report and "non-finite loss" in report
