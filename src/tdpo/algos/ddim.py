"""One DDIM step with the Gaussian log-density of its transition.

The stochastic DDIM step (eta > 0) is the policy ``pi_theta(x_{t-1} | x_t, c) =
N(mu_theta(x_t, t, c), sigma_t^2 I)`` of the denoising MDP (algorithm.md, "Notation").

Provenance: adapted from ``diffusers.DDIMScheduler.step`` (diffusers 0.42, Apache-2.0) and from
ddpo-pytorch's ``ddim_step_with_logprob`` (MIT). What changed:

- the previous timestep is ``t - num_train_timesteps // num_inference_steps`` and, when it is
  negative, ``alpha_prod_t_prev = final_alpha_cumprod``, exactly as the scheduler does; ddpo-pytorch
  clamps the previous timestep to ``[0, T)`` first, which makes the ``set_alpha_to_one`` branch
  unreachable (the final step then used ``alphas_cumprod[0]`` even with ``set_alpha_to_one=True``);
- ``timestep`` may be an int, a 0-d tensor or a ``[B]`` tensor of per-sample timesteps (alphas are
  gathered per sample, on the sample's device, never through ``.cpu()``);
- the arithmetic runs in float32 (float64 if the inputs are float64) whatever the input dtype;
  ``prev_sample`` is returned in the input dtype and the log-prob is that of the returned tensor;
- deterministic steps (``sigma_t == 0``) get log-prob 0 instead of NaN;
- the mean and sigma_t are returned; ``use_clipped_model_output`` is not supported (DDPO never
  sets it); a CPU generator may drive sampling on another device (as diffusers' ``randn_tensor``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["DDIMStepOutput", "ddim_step_logprob", "gaussian_log_prob"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class DDIMStepOutput(NamedTuple):
    """Result of :func:`ddim_step_logprob`.

    Attributes:
        prev_sample: ``x_{t-1}``, in the dtype of ``sample``.
        log_prob: ``[B]`` float32 (float64 for float64 inputs): ``log pi_theta(x_{t-1} | x_t)``
            **averaged** (not summed) over the non-batch dimensions, as in DDPO; 0 for samples
            whose step is deterministic (``sigma_t == 0``).
        mean: ``mu_theta(x_t, t)``, the mean of the transition, same shape as ``sample``
            (computation dtype).
        std: ``sigma_t = eta * sqrt(variance_t)``, shape ``[B, 1, ..., 1]`` (computation dtype).
        pred_original: the denoiser's estimate of x_0 at this step (after clipping/thresholding
            as the scheduler's config says), same shape as ``sample``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)``, **averaged** over the non-batch dimensions.

    Equals ``torch.distributions.Normal(mean, std).log_prob(x).mean(dim=non-batch dims)`` where
    ``std > 0``. Elements with ``std == 0`` (a degenerate, deterministic transition) contribute 0
    instead of NaN/inf, so a sample whose ``std`` is 0 everywhere gets log-prob 0. Computed in
    float32 (float64 if an input is float64); gradients flow to ``x``, ``mean`` and ``std``.

    Args:
        x: ``[B, ...]`` values.
        mean: broadcastable to ``x``.
        std: broadcastable to ``x``, ``>= 0``.

    Returns:
        ``[B]`` mean log-density.
    """
    dtype = _compute_dtype(torch.promote_types(x.dtype, mean.dtype))
    x = x.to(dtype)
    mean = mean.to(dtype)
    std = torch.as_tensor(std, device=x.device).to(dtype)
    std = torch.broadcast_to(std, torch.broadcast_shapes(std.shape, x.shape, mean.shape))
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of the predicted x_0 (Imagen), per sample.

    Same as ``DDIMScheduler._threshold_sample``: ``s = clamp(quantile(|x0|, ratio), 1, max)``,
    ``x0 <- clamp(x0, -s, s) / s``.
    """
    batch = sample.shape[0]
    flat = sample.reshape(batch, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape)


def _left_broadcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def ddim_step_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """One DDIM step ``x_t -> x_{t-1}`` and its log-probability (DDIM paper eqs. 12 and 16).

    For the same noise this equals ``scheduler.step(model_output, t, sample, eta=eta,
    variance_noise=noise).prev_sample`` (``use_clipped_model_output=False``), for every
    ``prediction_type``, with ``clip_sample`` / ``thresholding`` applied as the scheduler's config
    says and ``final_alpha_cumprod`` used when the previous timestep is negative.

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` on which ``set_timesteps`` has been called.
        model_output: the denoiser's output at ``(x_t, t)`` (epsilon, x_0 or v), ``[B, ...]``.
        timestep: ``t``: an int, a 0-d tensor, or a ``[B]`` tensor of per-sample timesteps.
        sample: ``x_t``, ``[B, ...]``.
        eta: DDIM's eta; ``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``.
        prev_sample: ``x_{t-1}`` whose log-prob to compute; if None, one is drawn as
            ``mean + sigma_t * noise`` with ``noise = randn(generator=generator)`` (drawn in
            ``model_output``'s dtype on the generator's device, like ``scheduler.step``).
        generator: RNG for the noise when ``prev_sample`` and ``noise`` are None.
        noise: the standard-normal ``z`` of the draw ``x_{t-1} = mu_theta + sigma_t z`` when
            ``prev_sample`` is None (then ``prev_sample`` keeps the graph through ``mu_theta``).

    Returns:
        :class:`DDIMStepOutput`. ``log_prob`` is ``log N(x_{t-1}; mu_theta, sigma_t^2 I)``
        **averaged over the non-batch dimensions** (as DDPO), computed in float32 on
        ``x_{t-1}.detach()`` (the gradient flows through ``mu_theta`` only). Where ``sigma_t == 0``
        (eta = 0, or the final step with ``set_alpha_to_one=True``, where ``a_prev = 1``) the
        density is degenerate and ``log_prob`` is defined as 0 for those samples, never NaN.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called first")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        )
    config = scheduler.config
    device = sample.device
    dtype = _compute_dtype(torch.promote_types(sample.dtype, model_output.dtype))
    batch = sample.shape[0]

    # 1. previous timestep t' = t - T_train // n_inference (no clamping: t' < 0 is the final step)
    t = torch.as_tensor(timestep, device=device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    # 2. alpha_bar_t and alpha_bar_{t'} per sample (final_alpha_cumprod where t' < 0)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=dtype)
    final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod).to(device=device, dtype=dtype)
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha)
    alpha_prod_t = _left_broadcast(alpha_prod_t, sample.ndim)
    alpha_prod_t_prev = _left_broadcast(alpha_prod_t_prev, sample.ndim)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    x_t = sample.to(dtype)
    out = model_output.to(dtype)

    # 3. predicted x_0 ("f_theta(x_t, t)", eq. 12) and predicted noise
    if config.prediction_type == "epsilon":
        pred_original_sample = (x_t - beta_prod_t**0.5 * out) / alpha_prod_t**0.5
        pred_epsilon = out
    elif config.prediction_type == "sample":
        pred_original_sample = out
        pred_epsilon = (x_t - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * x_t - beta_prod_t**0.5 * out
        pred_epsilon = alpha_prod_t**0.5 * out + beta_prod_t**0.5 * x_t
    else:
        raise ValueError(
            f"prediction_type {config.prediction_type!r} must be one of "
            "'epsilon', 'sample', 'v_prediction'"
        )

    # 4. clip or threshold the predicted x_0
    if config.get("thresholding", False):
        pred_original_sample = _threshold_sample(
            pred_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value
        )
    elif config.get("clip_sample", False):
        clip_range = config.get("clip_sample_range", 1.0)
        pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)

    # 5. sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (eq. 16)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5

    # 6.-7. mu_theta = sqrt(a_prev) * x_0 + sqrt(1 - a_prev - sigma_t^2) * eps   (eq. 12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

    if prev_sample is None:
        if noise is None:
            noise_device = generator.device if generator is not None else device
            noise = torch.randn(
                model_output.shape,
                generator=generator,
                device=noise_device,
                dtype=model_output.dtype,
            )
        noise = noise.to(device=device, dtype=dtype)
        prev_sample = (prev_sample_mean + std_dev_t * noise).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
        )

    # log pi(x_{t-1} | x_t): mean over non-batch dims; 0 where sigma_t == 0 (deterministic step)
    log_prob = gaussian_log_prob(prev_sample.detach(), prev_sample_mean, std_dev_t)
    return DDIMStepOutput(prev_sample, log_prob, prev_sample_mean, std_dev_t, pred_original_sample)
