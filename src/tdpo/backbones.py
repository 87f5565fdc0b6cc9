"""Frozen image-embedding backbones (the critic's input, and the image side of CLIP rewards).

``load_image_embedder(spec)`` returns an :class:`ImageEmbedder`: a frozen module in eval mode that
maps images ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W) to L2-normalized embeddings ``[B, d]``.
Preprocessing (resize of the shortest side, centre crop, normalization) is done in torch, so the
embedding is differentiable with respect to the images; it matches the model's own image
processor up to the processor's rounding to uint8 after its resize (see ``docs/rewards.md``).

Spec syntax (``critic.backbone``):

- ``clip`` or ``clip-vit-l-14``: OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), d=768;
- ``pickscore``: the PickScore_v1 image tower (``yuvalkirstain/PickScore_v1``), d=1024;
- ``hpsv2``: the HPS v2.1 image tower (open_clip ViT-H-14 weights, run as a transformers CLIP
  model), d=1024;
- ``hf:<hub id or folder>`` or a bare hub id / folder: any transformers CLIP model (a full
  ``CLIPModel`` or a ``CLIPVisionModelWithProjection``);
- ``open_clip:<architecture>:<checkpoint>``: an open_clip checkpoint file (state dict), e.g.
  ``open_clip:ViT-H-14:/models/HPS_v2.1_compressed.pt``.

Each named model's location can be overridden by an environment variable (see
``tdpo.rewards.sources``), e.g. ``TDPO_CLIP_L14=/models/clip-vit-large-patch14``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tdpo.errors import UsageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FIELD = "critic.backbone"


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


class ImageEmbedder(nn.Module):
    """Frozen image tower: images [B,3,H,W] in [0,1] -> L2-normalized embeddings [B, embed_dim].

    Always in eval mode with ``requires_grad`` False on every parameter; gradients still flow
    to the input images. Subclasses implement :meth:`encode_pixels` (unnormalized features from
    preprocessed pixel values).
    """

    embed_dim: int

    def __init__(self, preprocess: PreprocessConfig, embed_dim: int, name: str = ""):
        super().__init__()
        self.preprocess_config = preprocess
        self.embed_dim = int(embed_dim)
        self.name = name

    def _freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ImageEmbedder:  # noqa: ARG002 - always frozen
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> the model's pixel values (float32, on the images' device)."""
        return preprocess_images(images, self.preprocess_config)

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        features = self.encode_pixels(pixels)
        return F.normalize(features.float(), dim=-1)


class HFCLIPImageEmbedder(ImageEmbedder):
    """A transformers CLIP image tower (vision transformer + visual projection)."""

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        preprocess: PreprocessConfig,
        name: str = "",
    ):
        super().__init__(preprocess, visual_projection.out_features, name)
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self._freeze()

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)


# ----------------------------------------------------------------------------- loading helpers


def _is_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(spec))


def hub_error_fix(spec: str, exc: BaseException) -> str:
    """A one-line fix for a failed ``from_pretrained``/download of ``spec``."""
    if _is_local(spec):
        if not os.path.exists(os.path.expanduser(spec)):
            return "the path does not exist; give an existing model folder or a Hub id"
        return (
            f"cannot load a model from this path ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    where = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
    return (
        f"not found in the local Hugging Face cache and {where}; download it first "
        "(huggingface-cli download ...) or give a local folder"
    )


def load_clip_preprocess(
    spec: str,
    processor_spec: str | None = None,
    image_size: int | None = None,
    field_name: str = FIELD,
) -> PreprocessConfig:
    """The CLIP preprocessing of ``processor_spec`` (default ``spec``): from its
    preprocessor_config.json when present, else CLIP defaults at ``image_size``."""
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    candidates = [processor_spec, spec] if processor_spec else [spec]
    for candidate in candidates:
        if _is_local(candidate) and not os.path.exists(
            os.path.join(os.path.expanduser(candidate), "preprocessor_config.json")
        ):
            continue
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            processor = CLIPImageProcessor.from_pretrained(os.path.expanduser(candidate))
        except (OSError, ValueError):
            continue
        finally:
            hf_logging.set_verbosity(verbosity)
        return preprocess_config_from_processor(processor)
    size = int(image_size or 224)
    return PreprocessConfig(resize=("shortest_edge", size), crop=(size, size))


def load_hf_clip_vision(spec: str, device="cpu", dtype=torch.float32, field_name: str = FIELD):
    """Load (vision_model, visual_projection, vision_config) of a transformers CLIP checkpoint:
    a full ``CLIPModel`` folder/id or a ``CLIPVisionModelWithProjection`` one."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = os.path.expanduser(spec)
    if _is_local(spec) and not os.path.exists(path):
        raise UsageError(
            field_name, spec, "the path does not exist; give a CLIP model folder or a Hub id"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(field_name, spec, hub_error_fix(spec, exc)) from None
    if config.model_type == "clip":
        vision_config = config.vision_config
        # transformers 5 does not carry the top-level projection_dim into the vision config.
        vision_config.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision_config = config
    else:
        raise UsageError(
            field_name,
            spec,
            f"not a CLIP model (model_type {config.model_type!r}); "
            "give a transformers CLIPModel or CLIPVisionModelWithProjection",
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are expected to be unused
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(
            path, config=vision_config, dtype=dtype
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(field_name, spec, hub_error_fix(spec, exc)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(device).eval()
    return model.vision_model, model.visual_projection, vision_config


def load_hf_clip_embedder(
    spec: str,
    device="cpu",
    dtype=torch.float32,
    processor_spec: str | None = None,
    field_name: str = FIELD,
    name: str = "",
) -> HFCLIPImageEmbedder:
    vision_model, projection, vision_config = load_hf_clip_vision(spec, device, dtype, field_name)
    preprocess = load_clip_preprocess(spec, processor_spec, vision_config.image_size, field_name)
    return HFCLIPImageEmbedder(vision_model, projection, preprocess, name=name or spec)


def load_image_embedder(spec: str, device="cpu", dtype=torch.float32) -> ImageEmbedder:
    """Build a frozen image embedder from a spec (see the module docstring)."""
    from tdpo.rewards import sources

    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            FIELD,
            spec,
            "give a backbone: clip, pickscore, hpsv2, hf:<id-or-folder> "
            "or open_clip:<arch>:<checkpoint>",
        )
    spec = spec.strip()
    key = spec.lower()
    if key in ("clip", "clip-vit-l-14", "clip_vit_l14", "aesthetic"):
        return load_hf_clip_embedder(sources.resolve("clip_l14"), device, dtype, name=spec)
    if key == "pickscore":
        return load_hf_clip_embedder(
            sources.resolve("pickscore_model"),
            device,
            dtype,
            processor_spec=sources.resolve("pickscore_processor"),
            name=spec,
        )
    if key in ("hpsv2", "hpsv2.1", "hps"):
        from tdpo.rewards.open_clip_hf import load_open_clip_embedder

        return load_open_clip_embedder(
            "ViT-H-14",
            sources.resolve("hpsv2_checkpoint"),
            device,
            dtype,
            field_name=FIELD,
            name=spec,
        )
    if key.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(
                FIELD,
                spec,
                "write open_clip:<architecture>:<checkpoint file>, "
                "e.g. open_clip:ViT-H-14:/models/HPS_v2.1_compressed.pt",
            )
        from tdpo.rewards.open_clip_hf import load_open_clip_embedder

        return load_open_clip_embedder(
            parts[1], parts[2], device, dtype, field_name=FIELD, name=spec
        )
    if key.startswith("hf:"):
        spec = spec[3:]
    return load_hf_clip_embedder(spec, device, dtype)
