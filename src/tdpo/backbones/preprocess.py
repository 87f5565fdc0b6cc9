"""CLIP-style image preprocessing in torch (differentiable in the images).

The one place holding the OpenAI CLIP normalization constants and the resize / centre-crop /
normalize pipeline that the backbones, the Hub rewards and the shapes world's tiny CLIP use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """A CLIP-style image preprocessing, done in torch.

    ``resize``: ``("shortest_edge", n)`` (keep aspect ratio, shortest side to n, the longer side
    truncated as transformers and torchvision do) or ``("exact", (h, w))``; ``crop``: (h, w) of
    the centre crop or None; ``crop_rounding``: ``"floor"`` (transformers) or ``"round"``
    (torchvision, used by open_clip and ImageReward) for the crop offset.
    """

    resize: tuple = ("shortest_edge", 224)
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    crop_rounding: str = "floor"
    extra: dict = field(default_factory=dict, compare=False)


def _resize_shape(height: int, width: int, resize: tuple) -> tuple[int, int]:
    kind, value = resize
    if kind == "exact":
        return int(value[0]), int(value[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(value), int(int(value) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def preprocess_images(images: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] -> normalized pixel values [B,3,h,w] float32; differentiable."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
    x = images.float()
    height, width = x.shape[-2:]
    new_h, new_w = _resize_shape(height, width, config.resize)
    if (new_h, new_w) != (height, width):
        mode = config.interpolation
        kwargs = (
            {"align_corners": False, "antialias": True} if mode in ("bicubic", "bilinear") else {}
        )
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, **kwargs)
        # The processors resize uint8 images, which saturate at 0 and 255.
        x = x.clamp(0.0, 1.0)
    if config.crop is not None:
        crop_h, crop_w = config.crop
        if crop_h > new_h or crop_w > new_w:
            raise ValueError(f"crop {config.crop} larger than the resized image {(new_h, new_w)}")
        if config.crop_rounding == "round":
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        else:
            top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    mean = torch.tensor(config.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def _size_get(size, key):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def preprocess_config_from_processor(processor) -> PreprocessConfig:
    """Read a transformers CLIP image processor (PIL or torchvision backend) into a config."""
    size = getattr(processor, "size", None)
    shortest = _size_get(size, "shortest_edge")
    if getattr(processor, "do_resize", True) is False:
        resize = ("exact", None)
    elif shortest:
        resize = ("shortest_edge", int(shortest))
    elif _size_get(size, "height"):
        resize = ("exact", (int(_size_get(size, "height")), int(_size_get(size, "width"))))
    else:
        raise ValueError(f"unsupported image processor size {size!r}")
    crop = None
    if getattr(processor, "do_center_crop", True):
        crop_size = getattr(processor, "crop_size", None)
        crop = (int(_size_get(crop_size, "height")), int(_size_get(crop_size, "width")))
    resample = getattr(processor, "resample", 3)
    resample = getattr(resample, "value", resample)
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
        int(resample) if isinstance(resample, int) else 3, "bicubic"
    )
    mean = tuple(float(v) for v in (processor.image_mean or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (processor.image_std or OPENAI_CLIP_STD))
    if resize[1] is None:
        raise ValueError("image processors without resizing are not supported")
    return PreprocessConfig(
        resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation
    )
