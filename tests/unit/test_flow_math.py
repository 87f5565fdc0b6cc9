"""The flow-matching SDE step (tdpo.algos.flow): its log-density against torch.distributions,
noise level 0 against diffusers' Euler step, and the SDE's marginals on a Gaussian data
distribution whose exact velocity is known (a sign error in the drift fails it)."""

from __future__ import annotations

import math

import pytest
import torch

from tdpo.algos.flow import flow_sde_std, flow_sde_step_logprob


def test_log_prob_matches_torch_normal_on_one_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=gen)
    v = torch.randn(3, 4, 5, 5, generator=gen)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    sigma_next = torch.tensor([0.7, 0.3, 0.0])
    a = 0.7
    step = flow_sde_step_logprob(
        v, sigma, sigma_next, x, a, 0.95, noise=torch.randn(x.shape, generator=gen)
    )
    # the mean as Flow-GRPO writes it: x (1 + std^2 dt / 2s) + v (1 + std^2 (1 - s) / 2s) dt
    s, s_next = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    dt = s_next - s
    sde_std = a * torch.sqrt(s / (1 - s))
    mean = x * (1 + sde_std**2 / (2 * s) * dt) + v * (1 + sde_std**2 * (1 - s) / (2 * s)) * dt
    std = sde_std * torch.sqrt(-dt)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, std)
    oracle = torch.distributions.Normal(mean, std).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step.log_prob, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.pred_original, x - s * v)
    # the draw is mean + std * noise, and the log-prob of another point is lower on average
    other = flow_sde_step_logprob(v, sigma, sigma_next, x, a, 0.95, prev_sample=step.mean + 3 * std)
    assert (other.log_prob < step.log_prob).all()


def test_noise_level_zero_is_the_schedulers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        step = flow_sde_step_logprob(
            v, scheduler.sigmas[k], scheduler.sigmas[k + 1], x, 0.0, scheduler.sigmas[1]
        )
        torch.testing.assert_close(step.prev_sample, expected, atol=1e-6, rtol=0)
        assert torch.equal(step.log_prob, torch.zeros(2))  # deterministic: 0, not NaN
        x = expected


def test_sigma_one_uses_the_stand_in():
    # at s = 1 the coefficient a sqrt(s / (1 - s)) is infinite; Flow-GRPO puts the schedule's
    # second sigma in the denominator instead
    std = flow_sde_std(torch.tensor([1.0, 0.5]), 0.7, 0.8)
    torch.testing.assert_close(std, torch.tensor([0.7 * math.sqrt(1 / 0.2), 0.7]))
    step = flow_sde_step_logprob(
        torch.ones(1, 2), 1.0, 0.8, torch.zeros(1, 2), 0.7, 0.8, noise=torch.zeros(1, 2)
    )
    assert torch.isfinite(step.mean).all() and torch.isfinite(step.log_prob).all()


def test_drawing_needs_noise_when_the_level_is_positive():
    with pytest.raises(ValueError, match="noise is required"):
        flow_sde_step_logprob(torch.ones(1, 2), 0.5, 0.2, torch.zeros(1, 2), 0.7, 0.9)


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_the_sde_keeps_the_flows_marginals(noise_level):
    """Data x0 ~ N(0, c^2), x_s = (1 - s) x0 + s eps: the exact velocity E[eps - x0 | x_s] is
    linear, v = (s - (1 - s) c^2) / var_s * x_s with var_s = (1 - s)^2 c^2 + s^2. Integrating the
    SDE from s = 1 (pure noise) to 0 must give back variance c^2 whatever the noise level; a
    wrong sign of the drift's correction term (or of dt) would not."""
    c2 = 0.25
    n, steps = 20000, 200
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    for k in range(steps):
        s = sigmas[k]
        var = (1 - s) ** 2 * c2 + s**2
        v = (s - (1 - s) * c2) / var * x
        noise = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        x = flow_sde_step_logprob(v, s, sigmas[k + 1], x, noise_level, sigmas[1], noise=noise)[0]
        if k == steps // 2:  # halfway the variance is the interpolation's
            s_mid = sigmas[k + 1]
            expected = (1 - s_mid) ** 2 * c2 + s_mid**2
            assert abs(float(x.var()) - float(expected)) < 0.04 * float(expected)
    assert abs(float(x.var()) - c2) < 0.05 * c2, float(x.var())
