"""denoiser_dtype: the UNet's dtype read once per module (diffusers' ModelMixin.dtype walks every
submodule on each call), and read again after a cast."""

from __future__ import annotations

import torch

from tdpo.policy_base import _DTYPES, denoiser_dtype


def test_denoiser_dtype_follows_casts_and_is_remembered():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    assert denoiser_dtype(unet) == unet.dtype == torch.float32
    assert _DTYPES[unet][2] == torch.float32  # remembered
    unet.to(torch.bfloat16)
    assert denoiser_dtype(unet) == torch.bfloat16
    wrapped = torch.nn.Module()
    wrapped.module = unet  # as DDP / accelerate wrap it
    assert denoiser_dtype(wrapped) == torch.bfloat16
    unet.to(torch.float32)
    assert denoiser_dtype(wrapped) == torch.float32
