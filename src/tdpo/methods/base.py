"""The interface between the trainer and an algorithm, and what algorithms share.

The :class:`~tdpo.trainers.loop.Trainer` owns the lifecycle (Accelerator, policy, rewards,
optimizer, checkpoints, signals, evaluation, logging). An algorithm is a :class:`Method`: it says
how many optimizer updates an epoch makes (from the config alone), builds what it trains beside
the policy (e.g. the temporal critic), runs one epoch, and carries its own resumable state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only
    from tdpo.config import Config


class Method:
    """One training algorithm. Subclasses set :attr:`name` (its ``train.algorithm``) and
    implement :meth:`plan_updates` and :meth:`run_epoch`."""

    name: ClassVar[str]
    uses_critic: ClassVar[bool] = False  # trains a temporal critic (memory estimate, report)

    # -- from the config alone (no model is loaded) -----------------------------------------

    @classmethod
    def label(cls, config: Config) -> str:
        """The method's name in reports and logs, e.g. "TDPO-R" or "DDPO-2"."""
        return cls.name.upper()

    @classmethod
    def plan_updates(
        cls, config: Config, samples_per_process: int, minibatches: int
    ) -> tuple[int, int, int]:
        """(optimizer updates per inner epoch, backward passes per update, inner epochs);
        raises :class:`tdpo.errors.UsageError` when the config cannot be scheduled."""
        raise NotImplementedError

    # -- during a run ---------------------------------------------------------------------------

    def __init__(self, trainer):
        """Build what the method trains beside the policy. ``trainer`` (a
        :class:`tdpo.trainers.loop.Trainer`) has loaded the policy and the rewards and seeded torch
        for initialization; methods use its public attributes (config, schedule, accelerator,
        device, policy, unet, optimizer, reward_fn) and helpers (draw_prompts, first_sample,
        score, score_panel, gather, progress, check_signal, save_grid)."""
        self.trainer = trainer

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups beside the policy's (one AdamW holds every group)."""
        return []

    def prepare(self, accelerator) -> None:
        """Hand the method's trainable modules to ``accelerator.prepare``."""

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Sample, score, update; return the epoch's metrics (flat keys)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Resumable state beside the policy and the optimizer (checkpointed with them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_final(self, directory) -> None:
        """Write the method's own final artefacts (e.g. the critic head) into ``directory``."""


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    clip_groups: list[tuple[list[nn.Parameter], float]],
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """Unscale once, clip each model's gradient norm separately, step, zero.

    One optimizer holds both models (two parameter groups), so under fp16 the gradient scaler
    unscales every gradient exactly once. (The reference code's two optimizers shared one scaler:
    after the first optimizer's step and scaler update, unscaling again divided the critic's
    gradients by the loss scale a second time, and the critic barely learned.)
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norms = [
        float(torch.nn.utils.clip_grad_norm_(params, max_norm)) for params, max_norm in clip_groups
    ]
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient is inf/nan
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
