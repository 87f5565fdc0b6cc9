"""One step of the flow-matching SDE with the Gaussian log-density of its transition.

Rectified-flow models (Stable Diffusion 3) interpolate ``x_s = (1 - s) x_0 + s eps`` for a noise
level ``s`` ("sigma") that falls from 1 (noise) to 0 (data) while sampling, and predict the
velocity ``v = eps - x_0``. diffusers' ``FlowMatchEulerDiscreteScheduler.step`` is the Euler step of
the probability-flow ODE, ``x_{s'} = x_s + (s' - s) v`` with ``s' < s``. Flow-GRPO (Liu et al.,
2025, eq. 9 and ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``) replaces it by the
Euler-Maruyama step of an SDE with the same marginals, noise level ``a``::

    sigma_s = a * sqrt(s / (1 - s))            (s = 1 uses the schedule's second sigma below)
    dt      = s' - s  (< 0)
    mean    = x_s + [v + sigma_s^2 / (2 s) * (x_s + (1 - s) v)] * dt
    x_{s'}  = mean + sigma_s * sqrt(-dt) * z,  z ~ N(0, I)

so each step is the Gaussian policy ``N(mean_theta, sigma_s^2 |dt| I)``; with ``a = 0`` it is the
scheduler's Euler step. docs/algorithm.md ("Flow-matching models") derives the drift.

Written for this project from those equations (not copied); what differs from Flow-GRPO's
function: the sigmas of the step are passed in (per sample), not looked up in a scheduler; a
zero noise level gives log-prob 0 instead of NaN (as :func:`tdpo.algos.ddim.gaussian_log_prob`);
float64 inputs stay float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tdpo.algos.ddim import gaussian_log_prob

__all__ = ["FlowStepOutput", "flow_sde_std", "flow_sde_step_logprob"]


class FlowStepOutput(NamedTuple):
    """Result of :func:`flow_sde_step_logprob`.

    Attributes:
        prev_sample: ``x_{s'}``, in the dtype of ``sample``.
        log_prob: ``[B]``: ``log N(x_{s'}; mean, std^2 I)`` **averaged** over the non-batch
            dimensions (as DDPO and Flow-GRPO); 0 where ``std == 0`` (noise level 0).
        mean: the transition's mean, same shape as ``sample`` (computation dtype).
        std: the transition's standard deviation ``sigma_s * sqrt(s - s')``, ``[B, 1, ..., 1]``.
        pred_original: ``x0_hat = x_s - s v``, the model's estimate of the final image latent.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original: torch.Tensor


def _per_sample(value, batch: int, ndim: int, device, dtype) -> torch.Tensor:
    """A scalar or ``[B]`` value as ``[B, 1, ..., 1]``."""
    value = torch.as_tensor(value, device=device).to(dtype)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected a scalar or shape [{batch}], got {tuple(value.shape)}")
    return value.reshape(batch, *([1] * (ndim - 1)))


def flow_sde_std(sigma: torch.Tensor, noise_level: float, sigma_at_one) -> torch.Tensor:
    """``sigma_s = a * sqrt(s / (1 - s))``, Flow-GRPO's diffusion coefficient.

    At ``s = 1`` (the first step of SD3's schedule) the formula is infinite; as Flow-GRPO does,
    the denominator then uses ``sigma_at_one`` (the schedule's second sigma) instead of ``s``."""
    denominator = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_at_one).to(sigma), sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def flow_sde_step_logprob(
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    sample: torch.Tensor,
    noise_level: float,
    sigma_at_one,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> FlowStepOutput:
    """One SDE step ``x_s -> x_{s'}`` of a flow-matching model and its log-probability.

    Args:
        velocity: the model's (guided) velocity ``v`` at ``(x_s, s)``, ``[B, ...]``.
        sigma: ``s``, a scalar or ``[B]`` (the scheduler's ``timestep / num_train_timesteps``).
        sigma_next: ``s' < s``, a scalar or ``[B]`` (0 at the last step).
        sample: ``x_s``.
        noise_level: ``a >= 0``; 0 is the scheduler's deterministic Euler step.
        sigma_at_one: what the denominator of :func:`flow_sde_std` uses where ``s = 1``.
        prev_sample: ``x_{s'}`` whose log-prob to compute; if None it is drawn as
            ``mean + std * noise``.
        noise: standard-normal noise of ``sample``'s shape for the draw (required when
            ``prev_sample`` is None and ``noise_level > 0``).

    Returns:
        :class:`FlowStepOutput`; ``log_prob`` is computed on ``prev_sample.detach()`` (the gradient
        flows through the mean only), in float32 (float64 for float64 inputs).
    """
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}"
        )
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    s = _per_sample(sigma, batch, ndim, device, dtype)
    s_next = _per_sample(sigma_next, batch, ndim, device, dtype)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    dt = s_next - s  # negative: the noise level falls
    sde_sigma = flow_sde_std(s, noise_level, sigma_at_one)
    # drift of the reverse SDE: v + sigma_s^2 / (2 s) * (x + (1 - s) v)   (Flow-GRPO eq. 9)
    drift = v + sde_sigma**2 / (2 * s) * (x + (1 - s) * v)
    mean = x + drift * dt
    std = sde_sigma * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            if noise_level > 0:
                raise ValueError("noise is required to draw a step with noise_level > 0")
            noise = torch.zeros_like(mean)
        prev_sample = (mean + std * noise.to(dtype)).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
        )
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return FlowStepOutput(prev_sample, log_prob, mean, std, x - s * v)
