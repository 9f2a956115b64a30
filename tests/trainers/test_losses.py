"""Loss values against numbers computed by hand (log σ(x) = -log(1 + e^-x))."""

import pytest
import torch

from trainers.losses import LOSSES, get_loss
from trainers.methods import METHODS

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
    preference = {name for name, m in METHODS.items() if m.kind == "preference"}
    assert set(LOSSES) == preference


def test_losses_backpropagate_to_policy_only():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, chosen_reward, _ = get_loss("dpo")(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN,
                                              REJECTED_LEN, beta=0.1)
    losses.sum().backward()
    assert chosen.grad is not None and (chosen.grad < 0).all()  # raising log π(yw) lowers the loss
    assert not chosen_reward.requires_grad
