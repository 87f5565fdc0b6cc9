"""PPO-clip policy loss, clipped value loss, KL estimators and KL-coefficient controllers.

Symbols (algorithm.md, step 6): ``rho = exp(log pi_theta - log pi_old)`` the importance ratio,
``A`` the (normalized) advantage, ``eps`` the policy clip range, ``V`` the critic's value,
``V_old`` its value at sampling time, ``G`` the return, ``c`` the value clip range, ``beta`` the
KL penalty coefficient.
"""

from __future__ import annotations

import torch

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "clipped_value_loss",
    "kl_estimate",
    "ppo_clip_loss",
]


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate ``L_pi = mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))``.

    Args:
        log_prob: ``log pi_theta`` of the stored transitions (with grad).
        old_log_prob: ``log pi_old`` recorded at sampling.
        advantages: ``A``, same shape.
        clip_range: ``eps``.

    Returns:
        ``(loss, info)`` with detached ``info``: ``approx_kl = 0.5 * mean((logp - logp_old)^2)``,
        ``clipfrac = mean(|rho - 1| > eps)``, ``ratio = mean(rho)``.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"shapes differ: log_prob {tuple(log_prob.shape)}, old_log_prob "
            f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}"
        )
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * torch.mean(log_ratio.detach() ** 2),
            "clipfrac": torch.mean((torch.abs(ratio.detach() - 1.0) > clip_range).float()),
            "ratio": torch.mean(ratio.detach()),
        }
    return loss, info


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range: float = 0.2,
) -> torch.Tensor:
    """Clipped critic loss ``L_V = 0.5 * mean(max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2))``."""
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError(
            f"shapes differ: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
            f"returns {tuple(returns.shape)}"
        )
    clipped_values = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.mean(torch.maximum(unclipped_loss, clipped_loss))


KL_ESTIMATORS = ("kl", "abs", "square", "clip", "approx")


def kl_estimate(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    estimator: str = "kl",
    clip_value: float = 1.0,
) -> torch.Tensor:
    """Per-element estimate of ``KL(pi_theta || pi_ref)`` from samples of ``pi_theta``.

    With ``d = log pi_theta(x) - log pi_ref(x)``:

    - ``"kl"``: ``d`` (Schulman's k1; unbiased, high variance, can be negative);
    - ``"abs"``: ``|d|``;
    - ``"square"``: ``0.5 * d^2`` (Schulman's k2; low variance, biased);
    - ``"clip"``: ``clamp(d, -clip_value, clip_value)`` (k1 with bounded outliers);
    - ``"approx"``: ``(exp(-d) - 1) + d`` (Schulman's k3 with ``r = pi_ref / pi_theta``;
      unbiased and always ``>= 0``).

    Raises:
        ValueError: for an unknown estimator.
    """
    d = log_prob - ref_log_prob
    if estimator == "kl":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "square":
        return 0.5 * d**2
    if estimator == "clip":
        return d.clamp(-clip_value, clip_value)
    if estimator == "approx":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


class FixedKLController:
    """Constant KL coefficient ``beta``."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the coefficient is fixed)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of ``beta`` (Ziegler et al. 2019, as in TRL).

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``beta <- beta * (1 + error * n_steps / horizon)``.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``beta`` towards the value that keeps ``current_kl`` at ``target``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
