"""Rung evaluations (trainers.rungs): the fixed, seeded prompt subset, the implicit-reward signals by hand, and
the claim that makes rung settings key-neutral: a trial's final result is the same with and without rungs."""

import pytest
import torch

from orchestrator.core.spec_file import parse_spec
from orchestrator.pipeline import run_sweep
from orchestrator.progress import QUIET
from orchestrator.runtime.sweep_runs import SweepTracker
from trainers.pairs import PreferencePair
from trainers.rungs import pair_metrics, rung_subset


def _pairs(n):
    return [PreferencePair(prompt_id=f"p{i}", prompt=f"q{i}", chosen="a", rejected="b") for i in range(n)]


def test_the_rung_subset_is_fixed_seeded_and_drawn_from_the_evaluated_prompts():
    pairs = _pairs(64)
    first = rung_subset(pairs, 32, 8, seed=0)
    assert [p.prompt_id for p in first] == [p.prompt_id for p in rung_subset(pairs, 32, 8, seed=0)]
    assert len(first) == 8 and len({p.prompt_id for p in first}) == 8
    assert all(int(p.prompt_id[1:]) < 32 for p in first)              # only the num_prompts evaluated at the end
    assert [int(p.prompt_id[1:]) for p in first] == sorted(int(p.prompt_id[1:]) for p in first)
    assert [p.prompt_id for p in rung_subset(pairs, 32, 8, seed=1)] != [p.prompt_id for p in first]
    assert len(rung_subset(pairs, 32, 40, seed=0)) == 32              # never more than there are


def test_pair_margin_and_accuracy_by_hand():
    # margins: (-1 - -2) - (-3 - -3) = 1; (-2 - -1) - (-1 - -2) = -2; (-1 - -1) - (-1 - -1) = 0 (not a win)
    policy = (torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-3.0, -1.0, -1.0]))
    start = (torch.tensor([-2.0, -1.0, -1.0]), torch.tensor([-3.0, -2.0, -1.0]))
    metrics = pair_metrics(policy, start)
    assert metrics["pair_margin"] == pytest.approx((1 - 2 + 0) / 3)
    assert metrics["pair_accuracy"] == pytest.approx(1 / 3)


SPEC = """\
name: rungs-{tag}
workdir: {workdir}
data: {{kind: synthetic, n_train: 96, n_eval: 16}}
training: {{batch_size: 16, max_length: 40, log_every: 2}}
evaluation: {{num_prompts: 16, max_new_tokens: 12{rungs}}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1], learning_rate: [1.0e-3], epochs: [2]}}}}
"""


def _dpo_run(tmp_path, tag, rungs):
    uri = f"sqlite:///{tmp_path / tag / 'mlflow.db'}"
    spec = parse_spec(SPEC.format(tag=tag, workdir=tmp_path / tag / "work", rungs=rungs))
    run_sweep(spec, uri, output=QUIET)
    tracker = SweepTracker(uri, f"rungs-{tag}")
    [dpo] = [r for r in tracker.trials() if r.stage == "dpo"]
    history = [m.value for m in tracker.client.get_metric_history(dpo.run_id, "train/loss")]
    return dpo, tracker.load_samples(dpo.run_id), history


def test_a_trial_with_rungs_ends_exactly_as_the_same_trial_without(tmp_path):
    plain, plain_samples, plain_loss = _dpo_run(tmp_path, "plain", "")
    rungs, rung_samples, rung_loss = _dpo_run(tmp_path, "rungs", ", rungs: [0.3, 0.6], rung_prompts: 8")
    assert rungs.trial_key == plain.trial_key
    assert {k for k in rungs.metrics if k.startswith("rung/")} >= {"rung/mean_score", "rung/kl", "rung/win_vs_sft",
                                                                  "rung/pair_accuracy", "rung/pair_margin"}
    for metric in ("mean_score", "win_vs_chosen", "win_vs_sft", "kl", "length", "train_steps"):
        assert rungs.metrics[metric] == plain.metrics[metric], metric
    assert rung_loss == plain_loss and len(plain_loss) == 6
    assert rung_samples == plain_samples
