"""ASHA's rule, rung placement and the judge (orchestrator.core.rungs), with hand-computed numbers."""

import math

import pytest

from orchestrator.core.rungs import (TrialStopped, asha_decision, logged_rung_values, quantile, rung_steps,
                                     rung_value_key)
from orchestrator.core.spec import AshaSpec
from orchestrator.runtime.judge import AshaJudge


def test_quantile_interpolates_between_order_statistics_like_numpy():
    # sorted [1, 2, 4, 10]; q = 2/3 -> position 3 * 2/3 = 2 -> 4.0; q = 0.5 -> position 1.5 -> 2 + 0.5 * 2 = 3.0
    assert quantile([10, 1, 4, 2], 2 / 3) == pytest.approx(4.0)
    assert quantile([10, 1, 4, 2], 0.5) == pytest.approx(3.0)
    assert quantile([7.0], 0.9) == 7.0


def test_asha_stops_a_trial_below_the_top_third_of_the_others():
    # others [1, 2, 3, 4], η = 3: cutoff = their 2/3 quantile = position 3 * 2/3 = 2 -> 3.0
    assert asha_decision(3.0, [1, 2, 3, 4], 3) == (False, 3.0)
    assert asha_decision(2.99, [1, 2, 3, 4], 3) == (True, 3.0)
    # η = 2: cutoff = the median 2.5
    assert asha_decision(2.4, [1, 2, 3, 4], 2) == (True, 2.5)


def test_mode_min_keeps_the_lowest_third():
    # lower is better: cutoff = the 1/3 quantile of [1, 2, 3, 4] = position 1 -> 2.0
    assert asha_decision(2.0, [1, 2, 3, 4], 3, "min") == (False, 2.0)
    assert asha_decision(2.5, [1, 2, 3, 4], 3, "min") == (True, 2.0)


def test_the_first_trial_at_a_rung_goes_on_and_a_non_finite_value_stops():
    assert asha_decision(-100.0, [], 3) == (False, None)
    assert asha_decision(-100.0, [math.nan], 3) == (False, None)  # others' non-finite values are not a bar
    assert asha_decision(math.nan, [1.0], 3) == (True, 1.0)
    assert asha_decision(math.inf * -1, [], 3)[0] is True


def test_rungs_fall_on_rounded_fractions_of_the_steps_and_never_on_the_last():
    assert rung_steps([0.2, 0.5], 63) == {13: 1, 32: 2}  # round(12.6), round(31.5) (banker's: 32)
    assert rung_steps([0.2, 0.5], 189) == {38: 1, 94: 2}
    # a 3-step trial: 0.2 -> step 1, 0.5 -> round(1.5) = 2; a 1-step trial holds no rung
    assert rung_steps([0.2, 0.5], 3) == {1: 1, 2: 2}
    assert rung_steps([0.2, 0.5], 1) == {}
    # two rungs on one step: the later one is not held, numbers stay the spec's
    assert rung_steps([0.1, 0.2, 0.6], 4) == {1: 1, 2: 3}
    # rung_every: rung k at step k * N, before the last step
    assert rung_steps([], 63, every=20) == {20: 1, 40: 2, 60: 3}
    assert rung_steps([], 60, every=20) == {20: 1, 40: 2}
    assert rung_steps([], 5, every=20) == {}
    # rung_steps: ASHA's geometric milestones, those before the last step
    assert rung_steps([], 63, at=[12, 36, 108]) == {12: 1, 36: 2}
    assert rung_steps([], 189, at=[12, 36, 108]) == {12: 1, 36: 2, 108: 3}


class Store:
    def __init__(self, others):
        self.others, self.logged = others, []

    def log_metrics(self, metrics, step=0):
        self.logged.append((step, metrics))

    def rung_values(self, stage_key, metric, exclude_key, signature):
        assert (stage_key, exclude_key, signature) == ("stage", "me", "sig")
        return self.others.get(metric, [])


def test_the_judge_logs_every_rung_and_stops_below_the_cutoff():
    store = Store({rung_value_key(1): [0.0, 5.0], rung_value_key(2): [1.0, 2.0, 3.0, 9.0]})
    judge = AshaJudge(store, "stage", "me", AshaSpec(kind="asha", min_rung=1, min_peers=0), "sig")
    decision = judge(1, 10, {"mean_score": 4.0, "kl": 0.5})  # cutoff: 0 + 2/3 * 5 = 3.33; 4.0 goes on
    assert not decision.stop and decision.cutoff == pytest.approx(10 / 3) and decision.compared == 2
    assert store.logged[0] == (10, {"rung/mean_score": 4.0, "rung/kl": 0.5, "asha/rung_1": 4.0})
    with pytest.raises(TrialStopped) as stopped:  # cutoff: [1, 2, 3, 9] at 2/3 -> position 2 -> 3.0
        judge(2, 20, {"mean_score": 2.5})
    assert stopped.value.decision.step == 20 and stopped.value.values == {1: 4.0, 2: 2.5}
    assert stopped.value.reason == ("rung 2 (step 20): rung/mean_score 2.5, outside the best third of the 4 other "
                                    "trials at this rung (cutoff 3)")


def test_without_early_stopping_or_before_min_rung_the_judge_only_logs():
    store = Store({rung_value_key(1): [100.0]})
    assert AshaJudge(store, "stage", "me", None, "sig")(1, 5, {"mean_score": 0.0}) is None
    assert AshaJudge(store, "stage", "me", AshaSpec(kind="asha", min_rung=2), "sig")(1, 5, {"mean_score": 0.0}) is None
    # a stage without the compared metric (SFT has no KL) is never stopped on it
    assert AshaJudge(store, "stage", "me", AshaSpec(kind="asha", metric="rung/kl", mode="min"), "sig")(
        1, 5, {"mean_score": 0.0}) is None
    assert len(store.logged) == 3


def test_rung_values_read_back_from_a_runs_metrics_in_rung_order_with_gaps():
    metrics = {"asha/rung_3": 0.5, "asha/rung_1": 0.25, "rung/mean_score": 0.5, "asha/rung_x": 9.0, "wall_seconds": 1}
    assert logged_rung_values(metrics) == {1: 0.25, 3: 0.5}
    assert list(logged_rung_values(metrics)) == [1, 3]


def test_rung_and_stop_signatures_follow_the_settings_that_make_values_and_stops_comparable():
    from orchestrator.core.rungs import rung_signature, stop_signature
    from orchestrator.core.spec import EvaluationSpec

    at_2, at_10 = EvaluationSpec(rung_steps=[2]), EvaluationSpec(rung_steps=[10])
    asha, eta_2 = AshaSpec(kind="asha"), AshaSpec(kind="asha", reduction_factor=2)
    assert rung_signature(at_2, asha) != rung_signature(at_10, asha)          # another step
    assert rung_signature(at_2, asha) != rung_signature(EvaluationSpec(rung_steps=[2], rung_prompts=8), asha)
    assert rung_signature(at_2, asha) == rung_signature(at_2, eta_2)          # η decides, it does not measure
    assert rung_signature(at_2, asha) != rung_signature(at_2, AshaSpec(kind="asha", metric="rung/kl", mode="min"))
    assert stop_signature(at_2, asha) != stop_signature(at_2, eta_2) and stop_signature(at_2, None) is None
    assert rung_signature(EvaluationSpec(rung_steps=[2], temperature=0.5), asha) == rung_signature(at_2, asha)


def test_min_peers_lets_a_trial_go_on_until_enough_others_reached_the_rung():
    """Ray's ASHA stops a trial against a single other one; early_stopping.min_peers waits for more."""
    store = Store({rung_value_key(1): [5.0, 6.0]})
    waiting = AshaJudge(store, "stage", "me", AshaSpec(kind="asha", min_peers=3), "sig")
    decision = waiting(1, 10, {"mean_score": 0.0})  # far below both, but only 2 others reached the rung
    assert not decision.stop and decision.cutoff is None and decision.compared == 2
    assert decision.reason(3, 3) == ("rung 1 (step 10): rung/mean_score 0; only 2 other trials reached this rung, "
                                     "fewer than the 3 early stopping waits for")
    with pytest.raises(TrialStopped):  # with two peers enough, the same value stops
        AshaJudge(store, "stage", "me", AshaSpec(kind="asha", min_peers=2), "sig")(1, 10, {"mean_score": 0.0})
    with pytest.raises(TrialStopped, match="not a number"):  # a diverged trial stops whatever the peers
        waiting(1, 10, {"mean_score": float("nan")})


def test_min_peers_is_part_of_the_stop_rule_and_its_zero_keeps_earlier_stops():
    from orchestrator.core.rungs import _digest, rung_signature, stop_signature
    from orchestrator.core.spec import EvaluationSpec

    evaluation = EvaluationSpec(rung_steps=[2])
    none, two = AshaSpec(kind="asha", min_peers=0), AshaSpec(kind="asha", min_peers=2)
    assert stop_signature(evaluation, none) != stop_signature(evaluation, two)
    before = _digest({"rungs": rung_signature(evaluation, none), "reduction_factor": 3.0, "mode": "max", "min_rung": 1})
    assert stop_signature(evaluation, none) == before  # the rule every stop had before min_peers existed
