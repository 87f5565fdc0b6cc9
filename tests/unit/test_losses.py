"""PPO / value losses, KL estimators and KL controllers on hand-computed values."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tdpo.algos.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    kl_estimate,
    ppo_clip_loss,
)


def test_ppo_clip_loss_hand_values_and_gradients():
    ratios = [1.0, 1.5, 0.5, 1.05]
    log_prob = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0])
    # per element, max(-A * rho, -A * clip(rho, 0.8, 1.2)):
    #   rho=1.00, A= 1: max(-1.00, -1.00) = -1.00
    #   rho=1.50, A= 2: max(-3.00, -2.40) = -2.40   (clipped)
    #   rho=0.50, A=-1: max( 0.50,  0.80) =  0.80   (clipped)
    #   rho=1.05, A=-3: max( 3.15,  3.15) =  3.15
    # mean = 0.55 / 4 = 0.1375
    loss, info = ppo_clip_loss(log_prob, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(0.1375, abs=1e-6)
    # approx_kl = 0.5 * mean(d^2) = 0.5 * (0 + 0.1644 + 0.4805 + 0.0024) / 4 = 0.0809044
    assert info["approx_kl"].item() == pytest.approx(0.0809044, abs=1e-6)
    assert info["clipfrac"].item() == pytest.approx(0.5)  # |rho - 1| > 0.2 for 1.5 and 0.5
    assert info["ratio"].item() == pytest.approx(1.0125)  # (1 + 1.5 + 0.5 + 1.05) / 4
    assert all(not v.requires_grad for v in info.values())

    loss.backward()
    # d/dlogp of -A * rho / 4 where unclipped; 0 where the clipped term is the max
    expected_grad = torch.tensor([-1.0 * 1.0 / 4, 0.0, 0.0, 3.0 * 1.05 / 4])
    torch.testing.assert_close(log_prob.grad, expected_grad)


def test_clipped_value_loss_hand_values():
    values = torch.tensor([1.0, 0.0, 2.0])
    old = torch.tensor([0.5, 0.5, 2.0])
    returns = torch.tensor([2.0, 0.0, 1.0])
    # unclipped (V-G)^2 = [1, 0, 1]; clip(V, V_old +- 0.2) = [0.7, 0.3, 2.0] -> [1.69, 0.09, 1]
    # max = [1.69, 0.09, 1]; 0.5 * mean = 0.5 * 2.78 / 3 = 0.4633333
    got = clipped_value_loss(values, old, returns, clip_range=0.2)
    assert got.item() == pytest.approx(0.4633333, abs=1e-6)
    # a huge clip range gives the plain squared error 0.5 * mean([1, 0, 1]) = 0.3333333
    assert clipped_value_loss(values, old, returns, 100.0).item() == pytest.approx(1 / 3)


def test_kl_estimators_hand_values():
    logp = torch.tensor([0.5, -1.0, 2.0])
    ref = torch.zeros(3)  # d = [0.5, -1, 2]
    expected = {
        "kl": [0.5, -1.0, 2.0],
        "abs": [0.5, 1.0, 2.0],
        "square": [0.125, 0.5, 2.0],
        "clip": [0.5, -1.0, 1.0],  # clip_value = 1
        # exp(-d) - 1 + d
        "approx": [0.1065307, 0.7182818, 1.1353353],
    }
    assert set(expected) == set(KL_ESTIMATORS)
    for name, values in expected.items():
        got = kl_estimate(logp, ref, name, clip_value=1.0)
        torch.testing.assert_close(got, torch.tensor(values), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        kl_estimate(logp, ref, "clip", clip_value=0.7), torch.tensor([0.5, -0.7, 0.7])
    )
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "js")


def test_kl_estimators_are_unbiased_for_gaussians():
    # x ~ pi = N(0, 1), ref = N(0.5, 1): KL(pi || ref) = 0.5^2 / 2 = 0.125
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pi, ref = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.5, 1.0)
    logp, ref_logp = pi.log_prob(x), ref.log_prob(x)
    for name in ("kl", "approx"):
        assert kl_estimate(logp, ref_logp, name).mean().item() == pytest.approx(0.125, abs=0.01)
    assert (kl_estimate(logp, ref_logp, "approx") >= 0).all()


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.3)
    ctl.update(100.0, 256)
    assert ctl.value == 0.3
    other = FixedKLController(0.0)
    other.load_state_dict(_round_trip(ctl.state_dict()))
    assert other.value == 0.3


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 256)  # error = clip(12/6 - 1) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 1e4)
    assert ctl.value == pytest.approx(0.100512)
    ctl.update(3.0, 256)  # error = clip(-0.5) = -0.2 -> * 0.99488
    assert ctl.value == pytest.approx(0.09999737856)
    ctl.update(6.6, 100)  # error = 0.1 -> * 1.001
    assert ctl.value == pytest.approx(0.10009737593856)

    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(_round_trip(ctl.state_dict()))
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10_000)
    ctl.update(7.0, 10)
    restored.update(7.0, 10)
    assert restored.value == ctl.value
