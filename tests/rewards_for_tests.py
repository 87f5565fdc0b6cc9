"""Reward factories used by tests through the dotted-path plug-in mechanism."""

from __future__ import annotations

import torch


def brightness(device=None):
    """Mean pixel value: simple and differentiable in the images."""

    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)), {}

    return reward


def nan_every_other(device=None):
    """Brightness, with NaN on even-indexed samples and +inf on every 4th (non-finite handling)."""

    def reward(images, prompts, metadata):
        values = images.float().mean(dim=(1, 2, 3)).detach().clone()
        values[0::2] = float("nan")
        values[0::4] = float("inf")
        return values, {}

    return reward


def nan_once(device=None):
    """Brightness with one NaN per call."""

    def reward(images, prompts, metadata):
        values = images.float().mean(dim=(1, 2, 3)).detach().clone()
        values[0] = float("nan")
        return values, {}

    return reward


def wrong_shape(device=None):
    def reward(images, prompts, metadata):
        return torch.zeros(len(prompts), 2), {}

    return reward


def wrong_type(device=None):
    """Returns a Python list instead of a tensor."""

    def reward(images, prompts, metadata):
        return [0.0] * len(prompts), {}

    return reward


def nan_after_two_epochs(device=None):
    """Brightness for the first 2 calls (the trainer scores each epoch in one call), then NaN and
    +inf on every sample: a run stops in its third epoch."""
    calls = {"n": 0}

    def reward(images, prompts, metadata):
        calls["n"] += 1
        values = images.float().mean(dim=(1, 2, 3)).detach().clone()
        if calls["n"] > 2:
            values[0::2] = float("nan")
            values[1::2] = float("inf")
        return values, {}

    return reward


def neg_inf_all(device=None):
    """-inf on every sample from the first call."""

    def reward(images, prompts, metadata):
        return torch.full((len(prompts),), float("-inf")), {}

    return reward
