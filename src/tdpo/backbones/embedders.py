"""Frozen CLIP image towers: :class:`ImageEmbedder` and the loaders of transformers CLIP models."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tdpo.backbones.preprocess import (
    PreprocessConfig,
    preprocess_config_from_processor,
    preprocess_images,
)
from tdpo.backbones.sources import hub_error_fix, is_local
from tdpo.errors import UsageError

FIELD = "critic.backbone"


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


def load_clip_preprocess(
    spec: str,
    processor_spec: str | None = None,
    image_size: int | None = None,
    field_name: str = FIELD,
) -> PreprocessConfig:
    """The CLIP preprocessing of ``processor_spec`` (default ``spec``): from its
    preprocessor_config.json when present, else CLIP defaults at ``image_size``."""
    # deferred: transformers takes seconds to import; specs are checked before anything loads
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    candidates = [processor_spec, spec] if processor_spec else [spec]
    for candidate in candidates:
        if is_local(candidate) and not os.path.exists(
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
    # deferred: transformers takes seconds to import; specs are checked before anything loads
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = os.path.expanduser(spec)
    if is_local(spec) and not os.path.exists(path):
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
