"""Reward models behind one protocol.

A reward is a callable ``reward(images, prompts, metadata) -> (rewards, info)`` where
``images`` is a float tensor [B, 3, H, W] in [0, 1], ``prompts`` a list of B strings,
``metadata`` a list of B dicts (may be empty dicts), ``rewards`` a float tensor [B] and
``info`` a dict of extra per-batch values for logging.

Rewards are built by name from a registry (``build_reward("jpeg_compressibility")``), or from
a dotted path ``package.module:factory`` naming a user factory. Building a reward by dotted path
imports and runs user code: only use paths you trust.

A factory is called as ``factory(device=torch.device)`` and returns the reward callable.
Heavy imports belong inside factories, so that listing or validating names loads nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from tdpo.errors import UsageError


class Reward(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


RewardFactory = Callable[..., Reward]

_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: register ``factory(device) -> Reward`` under ``name``."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtin_modules() -> None:
    # Importing these modules registers their factories; their heavy imports stay deferred.
    from tdpo.rewards import builtin, hub  # noqa: F401
    from tdpo.world import rewards as _world_rewards  # noqa: F401


def available_rewards() -> list[str]:
    _load_builtin_modules()
    return sorted(_REGISTRY)


def is_dotted_path(spec: str) -> bool:
    return ":" in spec and "." in spec.split(":", 1)[0]


def _is_weighted(spec: str, field: str) -> bool:
    from tdpo.rewards.combine import parse_reward_spec

    return "," in spec or parse_reward_spec(spec, field) != [(spec, 1.0)]


def check_reward_name(spec: str, field: str = "reward.name") -> None:
    """Validate a reward name or weighted spec ``a:1.0,b:0.5`` without building it (no loads)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(field, spec, "name a reward, e.g. jpeg_compressibility")
    if _is_weighted(spec, field):
        from tdpo.rewards.combine import parse_reward_spec

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
    device = torch.device(device)
    if _is_weighted(spec, field):
        from tdpo.rewards.combine import build_reward_spec

        return build_reward_spec(spec, device, field)
    if is_dotted_path(spec):
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(field, spec, f"cannot import the reward factory ({exc})") from None
        return factory(device=device)
    check_reward_name(spec, field)
    return _REGISTRY[spec](device=device)
