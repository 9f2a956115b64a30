"""Loss values against numbers computed by hand (log σ(x) = -log(1 + e^-x))."""

import math

import pytest
import torch

from orchestrator.core.methods import METHODS
from trainers.losses import get_loss

# Two pairs: summed log-probs and lengths.
POLICY_CHOSEN = torch.tensor([-10.0, -5.0], dtype=torch.float64)
POLICY_REJECTED = torch.tensor([-12.0, -4.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-11.0, -5.0], dtype=torch.float64)
REF_REJECTED = torch.tensor([-11.0, -5.0], dtype=torch.float64)
CHOSEN_LEN = torch.tensor([5.0, 2.0], dtype=torch.float64)
REJECTED_LEN = torch.tensor([4.0, 2.0], dtype=torch.float64)
ARGS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN, REJECTED_LEN)


def test_dpo_hand_computed():
    """beta=0.1. Pair 1: rewards 0.1*(-10+11)=0.1 and 0.1*(-12+11)=-0.1, margin 0.2,
    loss = log(1+e^-0.2) = 0.5981388694. Pair 2: rewards 0 and 0.1*(-4+5)=0.1, margin -0.1,
    loss = log(1+e^0.1) = 0.7443966601."""
    losses, chosen, rejected = get_loss("dpo")(*ARGS, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.5981388694, 0.7443966601], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.1], dtype=torch.float64))


def test_simpo_hand_computed_ignores_reference():
    """beta=2, gamma=0.5. Pair 1: 2*(-10/5) = -4, 2*(-12/4) = -6, margin -4+6-0.5 = 1.5,
    loss = log(1+e^-1.5) = 0.2014132780. Pair 2: 2*(-5/2) = -5, 2*(-4/2) = -4, margin -1.5,
    loss = log(1+e^1.5) = 1.7014132780."""
    losses, chosen, rejected = get_loss("simpo")(POLICY_CHOSEN, POLICY_REJECTED, None, None, CHOSEN_LEN,
                                                 REJECTED_LEN, beta=2.0, gamma=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.2014132780, 1.7014132780], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([-4.0, -5.0], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([-6.0, -4.0], dtype=torch.float64))


def test_ln_dpo_hand_computed():
    """beta=2. Pair 1: 2*(-10+11)/5 = 0.4, 2*(-12+11)/4 = -0.5, margin 0.9, loss = log(1+e^-0.9)
    = 0.3411538747. Pair 2: 0 and 2*(1)/2 = 1, margin -1, loss = log(1+e^1) = 1.3132616875."""
    losses, chosen, rejected = get_loss("ln_dpo")(*ARGS, beta=2.0)
    torch.testing.assert_close(losses, torch.tensor([0.3411538747, 1.3132616875], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 1.0], dtype=torch.float64))


def test_reference_methods_refuse_missing_reference():
    with pytest.raises(ValueError, match="needs reference"):
        get_loss("dpo")(POLICY_CHOSEN, POLICY_REJECTED, None, None, CHOSEN_LEN, REJECTED_LEN, beta=0.1)


def test_unknown_loss_lists_known_and_suggests():
    with pytest.raises(KeyError) as info:
        get_loss("dp0")
    message = str(info.value)
    assert "did you mean 'dpo'" in message and "ln_dpo" in message and "simpo" in message


def test_every_preference_method_has_a_loss_and_back():
    """Each catalogue entry names its torch code lazily; every reference must load: the loss of each preference
    method (and of nothing else), its state factory where it has one, and the objective of every trained method."""
    from trainers.objectives import Objective

    preference = {name for name, m in METHODS.items() if m.kind == "preference"}
    assert {name for name, m in METHODS.items() if m.loss} == preference
    for name, method in METHODS.items():
        if method.loss:
            assert callable(method.loss_function()) and method.loss_function() is get_loss(name)
        if method.state:
            assert hasattr(method.new_state(), "state_dict")
        assert (method.objective is not None) == method.trains
        if method.trains:
            assert issubclass(method.objective_class(), Objective)


def test_losses_backpropagate_to_policy_only():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, chosen_reward, _ = get_loss("dpo")(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN,
                                              REJECTED_LEN, beta=0.1)
    losses.sum().backward()
    assert chosen.grad is not None and (chosen.grad < 0).all()  # raising log π(yw) lowers the loss
    assert not chosen_reward.requires_grad


def test_ipo_hand_computed():
    """beta=0.5, so the target margin 1/(2β) = 1. Pair 1: log-ratios averaged per token 1/5 = 0.2 and
    -1/4 = -0.25, Δ = 0.45, loss (0.45-1)² = 0.3025. Pair 2: 0/2 and 1/2, Δ = -0.5, loss (-1.5)² = 2.25."""
    losses, chosen, rejected = get_loss("ipo")(*ARGS, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.3025, 2.25], dtype=torch.float64))
    torch.testing.assert_close(chosen - rejected, torch.tensor([0.45, -0.5], dtype=torch.float64))


def test_rdpo_hand_computed():
    """beta=0.1, alpha=0.05. Pair 1: DPO margin 0.2 minus 0.05·(5-4) = 0.15, loss log(1+e^-0.15) =
    0.6209570478. Pair 2: equal lengths, so plain DPO: margin -0.1, loss 0.7443966601."""
    losses, _, _ = get_loss("rdpo")(*ARGS, beta=0.1, alpha=0.05)
    torch.testing.assert_close(losses, torch.tensor([0.6209570478, 0.7443966601], dtype=torch.float64))
    dpo, _, _ = get_loss("dpo")(*ARGS, beta=0.1)
    torch.testing.assert_close(get_loss("rdpo")(*ARGS, beta=0.1, alpha=0.0)[0], dpo)


def test_orpo_hand_computed():
    """beta=0.1. Mean log-probs: pair 1 chosen -10/5 = -2, rejected -12/4 = -3; log odds =
    (−2+3) − (log(1−e^−2) − log(1−e^−3)) = 1.0943442769. NLL per pair −log π(yw)/mean|yw| = 10/3.5.
    loss = 2.8571428571 + 0.1·log(1+e^−1.0943442769) = 2.8860179356. Pair 2: mean log-probs -2.5 and -2,
    log odds -0.5597629741, loss 5/3.5 + 0.1·log(1+e^0.5597629741) = 1.5297408864."""
    losses, chosen, _ = get_loss("orpo")(*ARGS, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([2.8860179356, 1.5297408864], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([-0.2, -0.25], dtype=torch.float64))


def test_kto_hand_computed():
    """beta=1. Log-ratios: chosen [1, 0], rejected [-1, 1]. Reference points: chosen mean 0.5, rejected mean
    0 (clamped at 0). Chosen losses 1−σ(1−0) = 0.2689414214, 1−σ(0) = 0.5; rejected losses 1−σ(0.5+1) =
    0.1824255238, 1−σ(0.5−1) = 0.6224593312. Per pair the mean: 0.2256834726, 0.5612296656."""
    losses, _, _ = get_loss("kto")(*ARGS, beta=1.0)
    torch.testing.assert_close(losses, torch.tensor([0.2256834726, 0.5612296656], dtype=torch.float64))
    weighted, _, _ = get_loss("kto")(*ARGS, beta=1.0, desirable_weight=2.0, undesirable_weight=0.0)
    torch.testing.assert_close(weighted, torch.tensor([0.2689414214, 0.5], dtype=torch.float64))


def test_kto_reference_points_carry_no_gradient():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, _, _ = get_loss("kto")(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN, REJECTED_LEN,
                                   beta=1.0)
    losses.sum().backward()
    # d/dc of (1 − σ(c − z_l))/2 is −σ'(·)/2 per pair; through z_w it would add the rejected side's term
    expected = -torch.sigmoid(torch.tensor([1.0, 0.0], dtype=torch.float64)) * (
        1 - torch.sigmoid(torch.tensor([1.0, 0.0], dtype=torch.float64))) / 2
    torch.testing.assert_close(chosen.grad, expected)


def gaps_args(gaps):
    """Inputs whose DPO log-ratio differences (the β-DPO 'gaps') are `gaps`: policy chosen = gap, rest 0."""
    g = torch.tensor(gaps, dtype=torch.float64)
    zero = torch.zeros_like(g)
    return g, zero, zero, zero, torch.ones_like(g), torch.ones_like(g)


def test_beta_dpo_hand_computed_without_filter():
    """Rules of junkangwu/beta-DPO. gaps [1, 2, 3, 6]: batch mean 3, std sqrt(14/3) = 2.1602. A fresh state
    with momentum 0.9 becomes mean 0.3, std 0.21602. rho=0 keeps all 4, so the kept mean is 3 and
    β_batch = 0.1·(1 + 0.5·(3 − 0.3)) = 0.235. Losses log(1+e^(−0.235·g)) = 0.5825344794, 0.4855092116,
    0.4015297576, 0.2184471671."""
    from trainers.losses import BetaDPOState

    state = BetaDPOState()
    losses, _, _ = get_loss("beta_dpo")(*gaps_args([1, 2, 3, 6]), beta=0.1, alpha=0.5, rho=0.0, momentum=0.9,
                                         state=state)
    assert state.gap_mean == pytest.approx(0.3) and state.gap_std == pytest.approx(0.2160246899)
    torch.testing.assert_close(losses, torch.tensor([0.5825344794, 0.4855092116, 0.4015297576, 0.2184471671],
                                                    dtype=torch.float64))


def test_beta_dpo_filter_drops_outlying_gaps_and_averages_over_kept():
    """gaps [0, 0, 50, −50]: after the update mean 0, std 0.1·40.82 = 4.08, so the outliers weigh e^−75 and
    the two kept pairs (rho=0.5) are the zeros. Kept mean 0 = running mean, so β_batch = β; each kept loss
    log 2 is scaled by 4/2, dropped ones are 0: the batch mean is log 2."""
    from trainers.losses import BetaDPOState

    losses, _, _ = get_loss("beta_dpo")(*gaps_args([0, 0, 50, -50]), beta=0.1, alpha=1.0, rho=0.5, momentum=0.9,
                                         state=BetaDPOState())
    torch.testing.assert_close(losses, torch.tensor([2 * math.log(2), 2 * math.log(2), 0, 0], dtype=torch.float64))


def test_beta_dpo_running_statistics_accumulate():
    from trainers.losses import BetaDPOState

    state = BetaDPOState()
    for _ in range(2):
        get_loss("beta_dpo")(*gaps_args([1, 3]), beta=0.1, alpha=0.5, rho=0.0, momentum=0.9, state=state)
    assert state.gap_mean == pytest.approx(0.9 * 0.2 + 0.1 * 2)  # 0.1·2 after one step, then EMA again


def test_epsilon_steps_each_branch():
    """oddqueue/e-dpo: +1 if plus > policy > minus, −1 if minus > policy > plus, 0 otherwise (ties too)."""
    from trainers.losses import epsilon_steps

    policy = torch.tensor([1.0, 1.0, 1.0, 1.0])
    plus = torch.tensor([2.0, 0.0, 1.5, 1.0])
    minus = torch.tensor([0.0, 2.0, 1.5, 0.0])
    assert epsilon_steps(policy, plus, minus).tolist() == [1, -1, 0, 0]


def test_epsilon_dpo_hand_computed():
    """beta=0.1, epsilon=0.5, s = [+1, −1, 0]: β_i = 0.1/1.5, 0.1/0.5, 0.1. Every pair has Δlog-ratio 2, so the
    losses are log(1+e^(−2β_i)) = 0.6287010920, 0.5130152524, 0.5981388694."""
    g = torch.full((3,), 2.0, dtype=torch.float64)
    zero = torch.zeros_like(g)
    losses, chosen, _ = get_loss("epsilon_dpo")(g, zero, zero, zero, zero + 1, zero + 1, beta=0.1, epsilon=0.5,
                                                steps=torch.tensor([1, -1, 0]))
    torch.testing.assert_close(losses, torch.tensor([0.6287010920, 0.5130152524, 0.5981388694], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([2 * 0.1 / 1.5, 2 * 0.2, 2 * 0.1], dtype=torch.float64))
