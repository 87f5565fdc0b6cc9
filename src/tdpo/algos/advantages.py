"""Reward normalization, returns and temporal advantages (algorithm.md, "One epoch", steps 3-5).

Symbols: ``R`` the reward of ``x_0``; ``R~`` the normalized reward; ``T`` the number of denoising
steps; index ``k = 0`` is the first step ``x_T -> x_{T-1}``, ``k = T - 1`` the last one;
``G_k`` the return from step k; ``V_old(k)`` the critic's value of the state before step k at
sampling time; ``A_k = G_k - V_old(k)`` the temporal advantage ("timestepped reward").
"""

from __future__ import annotations

import math
from collections import deque

import torch

__all__ = [
    "PerPromptStatTracker",
    "explained_variance",
    "normalize_advantages",
    "pearson",
    "returns_from_rewards",
    "temporal_advantages",
]

_STD_EPS = 1e-6


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of a non-empty list, in float64."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std(correction=0).item()


class PerPromptStatTracker:
    """Per-prompt reward normalization of ddpo-pytorch (``PerPromptStatTracker``).

    Each prompt keeps a buffer of its ``buffer_size`` most recent rewards. For a batch, each
    prompt's buffer is first extended with this batch's rewards for it; then, if the buffer holds
    at least ``min_count`` rewards, ``R~ = (R - mean(buffer)) / (std(buffer) + 1e-6)``, otherwise the
    whole batch's mean and std are used. Standard deviations are population ones (ddof=0).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add a batch of rewards and return them normalized.

        Args:
            prompts: ``B`` prompt strings.
            rewards: ``[B]`` rewards ``R`` (any float dtype, any device).

        Returns:
            ``[B]`` float32 normalized rewards ``R~`` on ``rewards``' device.
        """
        rewards = torch.as_tensor(rewards)
        if rewards.ndim != 1 or rewards.shape[0] != len(prompts):
            raise ValueError(
                f"rewards must have shape [{len(prompts)}] (one per prompt), "
                f"got {tuple(rewards.shape)}"
            )
        values = rewards.detach().to("cpu", torch.float64).tolist()
        batch_mean, batch_std = _mean_std(values) if values else (0.0, 0.0)

        by_prompt: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt.setdefault(prompt, []).append(i)

        normalized = [0.0] * len(values)
        for prompt, indices in by_prompt.items():
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[i] for i in indices)
            if len(buffer) >= self.min_count:
                mean, std = _mean_std(list(buffer))
            else:
                mean, std = batch_mean, batch_std
            for i in indices:
                normalized[i] = (values[i] - mean) / (std + _STD_EPS)
        return torch.tensor(normalized, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict:
        """Plain-python state (safe for ``torch.load(weights_only=True)``)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {prompt: [float(r) for r in buf] for prompt, buf in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers, ``buffer_size`` and ``min_count`` from :meth:`state_dict`'s output."""
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {
            str(prompt): deque((float(r) for r in buf), maxlen=self.buffer_size)
            for prompt, buf in state["stats"].items()
        }


def returns_from_rewards(
    normalized_rewards: torch.Tensor,
    num_steps: int,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-step returns ``G_k`` with discount 1, only the final step rewarded.

    Per-step reward ``r_k = -kl_coef * kl_k`` (0 without KL), plus ``R~`` at the last step
    ``k = T - 1``; ``G_k = sum_{j >= k} r_j`` (backward cumulative sum over the T axis). Without KL,
    ``G_k = R~`` for every k.

    Args:
        normalized_rewards: ``[B]`` ``R~``.
        num_steps: ``T``.
        kl: optional ``[B, T]`` per-step KL estimates (see ``losses.kl_estimate``).
        kl_coef: ``beta``, the KL penalty coefficient.

    Returns:
        ``[B, T]`` returns in ``normalized_rewards``' (floating) dtype.
    """
    if normalized_rewards.ndim != 1:
        raise ValueError(
            f"normalized_rewards must have shape [B], got {tuple(normalized_rewards.shape)}"
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    rewards = (
        normalized_rewards if normalized_rewards.is_floating_point() else normalized_rewards.float()
    )
    batch = rewards.shape[0]
    step_rewards = torch.zeros(batch, num_steps, dtype=rewards.dtype, device=rewards.device)
    if kl is not None:
        if kl.shape != (batch, num_steps):
            raise ValueError(f"kl must have shape [{batch}, {num_steps}], got {tuple(kl.shape)}")
        step_rewards = step_rewards - kl_coef * kl.to(step_rewards)
    step_rewards[:, -1] += rewards
    # G_k = sum_{j >= k} r_j: reversed cumulative sum along T
    return step_rewards.flip(1).cumsum(1).flip(1)


def temporal_advantages(returns: torch.Tensor, old_values: torch.Tensor) -> torch.Tensor:
    """Temporal advantages ``A_k = G_k - V_old(k)``, ``[B, T]``."""
    if returns.shape != old_values.shape:
        raise ValueError(
            f"returns {tuple(returns.shape)} and old_values {tuple(old_values.shape)} differ in shape"
        )
    return returns - old_values


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(A - mean A) / (std A + eps)`` over ALL elements (samples and steps).

    ``std`` is the population standard deviation (ddof=0), as the reference code's
    ``numpy.std``; a single element normalizes to 0.
    """
    mean = advantages.mean()
    std = advantages.std(correction=0)
    return (advantages - mean) / (std + eps)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)``, over all elements; nan if ``Var(target) == 0``.

    1 is a perfect critic, 0 one no better than a constant, negative one worse than a constant.
    """
    if predicted.shape != target.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape"
        )
    p = predicted.detach().to(torch.float64).flatten()
    y = target.detach().to(torch.float64).flatten()
    var_y = y.var(correction=0).item() if y.numel() else 0.0
    if var_y == 0 or math.isnan(var_y):
        return float("nan")
    return 1.0 - (y - p).var(correction=0).item() / var_y


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of ``a`` and ``b`` over all elements, in float64; 0 when either is
    constant."""
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    d = (a.norm() * b.norm()).item()
    return float((a @ b).item() / d) if d > 0 else 0.0


def merge_moments(
    count: float, mean: torch.Tensor, var: torch.Tensor, batch: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Running mean and (population) variance after adding ``batch`` [n, ...] to ``count``
    earlier values (Chan et al.'s parallel update), in float64."""
    x = batch.detach().double().reshape(-1, *mean.shape)
    n = x.shape[0]
    total = count + n
    delta = x.mean(0) - mean
    new_mean = mean + delta * n / total
    m2 = var * count + x.var(0, correction=0) * n + delta**2 * count * n / total
    return total, new_mean, m2 / total


class RunningRewardStats:
    """``train.normalization=running``: R~ = (R - mean) / (std + eps) with the mean and std of
    every reward of the run so far (this epoch's included), so the critic's target means the
    same thing in every epoch. Its state is checkpointed."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = (
            0.0,
            torch.zeros((), dtype=torch.float64),
            torch.ones((), dtype=torch.float64),
        )

    def update(self, rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        self.count, self.mean, self.var = merge_moments(self.count, self.mean, self.var, rewards)
        return ((rewards.double() - self.mean) / (self.var.sqrt() + eps)).to(rewards.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": float(self.mean), "var": float(self.var)}

    def load_state_dict(self, state: dict) -> None:
        self.count = float(state["count"])
        self.mean = torch.tensor(state["mean"], dtype=torch.float64)
        self.var = torch.tensor(state["var"], dtype=torch.float64)


def group_normalize(rewards: torch.Tensor, groups: list, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` within each group g (GRPO's group-relative reward): every
    sample is compared only with the other samples of its prompt drawn in the same epoch, so the
    target means the same thing from the first epoch to the last. A group of one gets 0."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        values = rewards[rows].float()
        out[rows] = (values - values.mean()) / (values.std(correction=0) + eps)
    return out


def step_quarters(num_steps: int) -> list[range]:
    """The denoising steps 0..T-1 cut into 4 contiguous quarters (q1 = the first steps, from
    noise; q4 = the last, nearest the image); with T < 4 some quarters are empty."""
    bounds = [i * num_steps // 4 for i in range(5)]
    return [range(bounds[i], bounds[i + 1]) for i in range(4)]


def explained_variance_by_quarter(
    predicted: torch.Tensor, target: torch.Tensor
) -> dict[str, float]:
    """``q1`` ... ``q4``: :func:`explained_variance` of ``predicted`` [N, T] for ``target`` [N, T]
    over each quarter of the steps (nan for an empty quarter)."""
    out = {}
    for i, steps in enumerate(step_quarters(target.shape[1]), start=1):
        cols = list(steps)
        out[f"q{i}"] = (
            explained_variance(predicted[:, cols], target[:, cols]) if cols else float("nan")
        )
    return out


def r2_by_quarter(reference: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``q1`` ... ``q4``: the mean over each quarter's steps k of ``pearson(reference[:, k],
    target[:, k])^2``, the share of the target's variance that ``reference`` explains linearly
    at that step (the critic's upper reference)."""
    out = {}
    for i, steps in enumerate(step_quarters(target.shape[1]), start=1):
        r2 = [pearson(reference[:, k], target[:, k]) ** 2 for k in steps]
        out[f"q{i}"] = sum(r2) / len(r2) if r2 else float("nan")
    return out
