"""Weighted sums of rewards: ``"pickscore:1.0,aesthetic:0.5"``.

An item is ``name`` or ``name:weight``; a user factory ``package.module:factory`` also contains a
colon, so an item is weighted only when the text after its *last* colon parses as a float
(``pkg.mod:factory:0.5`` is that factory with weight 0.5). The combined reward returns
``sum_i w_i * r_i`` and logs each term's mean under ``<name>_mean`` (its own info keys too).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tdpo.errors import UsageError


def parse_reward_spec(spec: str, field: str = "reward.name") -> list[tuple[str, float]]:
    """``"a:1.0,b:0.5,c"`` -> ``[("a", 1.0), ("b", 0.5), ("c", 1.0)]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            field, spec, "give a reward name, or weighted terms like 'pickscore:1.0,aesthetic:0.5'"
        )
    terms: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UsageError(field, spec, "empty term; separate terms with single commas")
        name, weight = item, 1.0
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                pass  # a dotted path package.module:factory
            else:
                name = head.strip()
                if not name:
                    raise UsageError(field, spec, f"term {item!r} has a weight but no name")
                if not math.isfinite(weight):
                    raise UsageError(field, spec, f"weight of {name!r} must be a finite number")
        terms.append((name, weight))
    return terms


def check_reward_spec(spec: str, field: str = "reward.name") -> None:
    """Validate every term's name (no model loads)."""
    from tdpo.rewards import check_reward_name

    for name, _ in parse_reward_spec(spec, field):
        check_reward_name(name, field)


def build_weighted_reward(
    terms: list[tuple[str, float]], device: torch.device | str = "cpu", field: str = "reward.name"
):
    """One reward from weighted terms; a single term of weight 1 is returned unwrapped."""
    from tdpo.rewards import build_reward

    if not terms:
        raise UsageError(field, terms, "no reward terms")
    built = [(name, weight, build_reward(name, device, field)) for name, weight in terms]
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]

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


def build_reward_spec(spec: str, device: torch.device | str = "cpu", field: str = "reward.name"):
    """``build_weighted_reward(parse_reward_spec(spec))``."""
    return build_weighted_reward(parse_reward_spec(spec, field), device, field)
