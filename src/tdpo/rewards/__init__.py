"""Reward models behind one protocol.

A reward is a callable ``reward(images, prompts, metadata) -> (rewards, info)`` where
``images`` is a float tensor [B, 3, H, W] in [0, 1], ``prompts`` a list of B strings,
``metadata`` a list of B dicts (may be empty dicts), ``rewards`` a float tensor [B] and
``info`` a dict of extra per-batch values for logging.

Rewards are built by name from a registry (``build_reward("jpeg_compressibility")``), or from
a dotted path ``package.module:factory`` naming a user factory, or as a weighted sum of those
(``"pickscore:1.0,aesthetic:0.5"``, parsed by :mod:`tdpo.rewards.spec`). Building a reward by
dotted path imports and runs user code: only use paths you trust.

A factory is called as ``factory(device=torch.device)`` and returns the reward callable.
Heavy imports belong inside factories, so that listing or validating names loads nothing.
The registered names are this package's own (:mod:`tdpo.rewards.builtin`,
:mod:`tdpo.rewards.hub`) and those of the plug-ins (:mod:`tdpo.plugins`), which register theirs
with :func:`register_reward`. Importing this package imports neither torch nor a plug-in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tdpo.errors import UsageError
from tdpo.plugins import load_plugins
from tdpo.rewards.combine import weighted_sum
from tdpo.rewards.registry import _REGISTRY, Reward, RewardFactory, register_reward
from tdpo.rewards.spec import check_factory_modules, is_dotted_path, is_weighted, parse_reward_spec

if TYPE_CHECKING:
    import torch

__all__ = [
    "Reward",
    "RewardFactory",
    "available_rewards",
    "build_reward",
    "build_weighted_reward",
    "check_factory_modules",
    "check_reward_name",
    "is_dotted_path",
    "parse_reward_spec",
    "register_reward",
]


def _load_reward_modules() -> None:
    # deferred: importing them registers their factories, and they import torch; spec checks
    # (check_factory_modules, before a run starts) stay torch-free.
    from tdpo.rewards import builtin, hub  # noqa: F401

    load_plugins()


def available_rewards() -> list[str]:
    _load_reward_modules()
    return sorted(_REGISTRY)


def check_reward_name(spec: str, field: str = "reward.name") -> None:
    """Validate a reward name or weighted spec ``a:1.0,b:0.5`` without building it (no loads)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(field, spec, "name a reward, e.g. jpeg_compressibility")
    if is_weighted(spec, field):
        for name, _ in parse_reward_spec(spec, field):
            check_reward_name(name, field)
        return
    if is_dotted_path(spec):
        return
    names = available_rewards()
    if spec not in names:
        raise UsageError(
            field,
            spec,
            f"unknown reward; choose one of {', '.join(names)} "
            "or give a factory as package.module:callable",
        )


def build_reward(
    spec: str, device: torch.device | str = "cpu", field: str = "reward.name"
) -> Reward:
    """Build a reward from a registered name, a ``package.module:factory`` path, or a weighted
    sum of those such as ``"pickscore:1.0,aesthetic:0.5"``."""
    import torch  # deferred: checking and parsing names stays torch-free

    device = torch.device(device)
    if is_weighted(spec, field):
        return build_weighted_reward(parse_reward_spec(spec, field), device, field)
    if is_dotted_path(spec):
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(field, spec, f"cannot import the reward factory ({exc})") from None
        if not callable(factory):
            raise UsageError(
                field,
                spec,
                f"{attr} is a {type(factory).__name__}, not a callable factory(device) -> reward",
            )
        return _checked(factory(device=device), spec, field)
    check_reward_name(spec, field)
    return _checked(_REGISTRY[spec](device=device), spec, field)


def _checked(reward: Any, spec: str, field: str) -> Reward:
    """The factory's product must be callable as ``reward(images, prompts, metadata)``."""
    if not callable(reward):
        raise UsageError(
            field,
            spec,
            f"the factory returned a {type(reward).__name__}, not a callable "
            "reward(images, prompts, metadata) -> (rewards, info)",
        )
    return reward


def build_weighted_reward(
    terms: list[tuple[str, float]], device: torch.device | str = "cpu", field: str = "reward.name"
) -> Reward:
    """One reward from weighted terms ``[(name, weight), ...]``; a single term of weight 1 is
    returned unwrapped."""
    if not terms:
        raise UsageError(field, terms, "no reward terms")
    built = [(name, weight, build_reward(name, device, field)) for name, weight in terms]
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]
    return weighted_sum(built)
