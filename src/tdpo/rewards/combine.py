"""Weighted sums of rewards: ``"pickscore:1.0,aesthetic:0.5"``.

Specs are parsed by :func:`parse_reward_spec` (:mod:`tdpo.rewards.spec`, re-exported here);
:func:`tdpo.rewards.build_reward` builds each term and :func:`weighted_sum` combines them. The
combined reward returns ``sum_i w_i * r_i`` and logs each term's mean under ``<name>_mean`` (its
own info keys too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tdpo.rewards.spec import parse_reward_spec

if TYPE_CHECKING:
    import torch

    from tdpo.rewards.registry import Reward

__all__ = ["parse_reward_spec", "weighted_sum"]


def weighted_sum(built: list[tuple[str, float, Reward]]) -> Reward:
    """One reward ``sum_i w_i * r_i`` from ``[(name, weight, reward), ...]``; its ``terms``
    attribute lists ``(name, weight)``."""

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]):
        total = None
        info: dict[str, Any] = {}
        for name, weight, term in built:
            values, term_info = term(images, prompts, metadata)
            values = values.float()
            info.update(term_info)
            info[f"{name}_mean"] = values.detach().mean().item()
            total = weight * values if total is None else total + weight * values.to(total.device)
        return total, info

    reward.terms = [(name, weight) for name, weight, _ in built]
    return reward
