"""The reward registry itself: names -> factories, and the decorator that fills it.

A leaf module (no torch, no tdpo imports), so that reward modules can register themselves
without importing the package that looks names up (:mod:`tdpo.rewards`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


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
