"""Built-in rewards that need no model: JPEG (in)compressibility, as in DDPO."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from tdpo.images import to_uint8_arrays
from tdpo.rewards.registry import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image [B,3,H,W] in [0,1] saved as JPEG at ``quality``."""
    arrays = to_uint8_arrays(images)
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(device: torch.device | None = None):
    """Negative JPEG size in kB: higher for simpler images (not differentiable)."""

    def reward(images, prompts, metadata):
        sizes = jpeg_size_kb(images)
        return -sizes, {"jpeg_kb": sizes.mean().item()}

    return reward


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(device: torch.device | None = None):
    """JPEG size in kB: higher for busier images (not differentiable)."""

    def reward(images, prompts, metadata):
        sizes = jpeg_size_kb(images)
        return sizes, {"jpeg_kb": sizes.mean().item()}

    return reward
