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
:mod:`tdpo.backbones.sources`), e.g. ``TDPO_CLIP_L14=/models/clip-vit-large-patch14``.

Modules (the rewards build on these; nothing here imports :mod:`tdpo.rewards`):

- :mod:`tdpo.backbones.preprocess`    CLIP mean/std and the torch preprocessing
- :mod:`tdpo.backbones.sources`       model locations (Hub ids, env overrides, Hub file downloads)
- :mod:`tdpo.backbones.embedders`     :class:`ImageEmbedder` and transformers CLIP loaders
- :mod:`tdpo.backbones.open_clip_hf`  open_clip ViT checkpoints (HPSv2) run as transformers CLIP
"""

from __future__ import annotations

import torch

from tdpo.backbones import sources
from tdpo.backbones.embedders import (
    FIELD,
    HFCLIPImageEmbedder,
    ImageEmbedder,
    load_clip_preprocess,
    load_hf_clip_embedder,
    load_hf_clip_vision,
)
from tdpo.backbones.open_clip_hf import load_open_clip_as_hf, load_open_clip_embedder
from tdpo.backbones.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    preprocess_config_from_processor,
    preprocess_images,
)
from tdpo.backbones.sources import hub_error_fix
from tdpo.errors import UsageError

__all__ = [
    "FIELD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "HFCLIPImageEmbedder",
    "ImageEmbedder",
    "PreprocessConfig",
    "hub_error_fix",
    "load_clip_preprocess",
    "load_hf_clip_embedder",
    "load_hf_clip_vision",
    "load_image_embedder",
    "load_open_clip_as_hf",
    "load_open_clip_embedder",
    "preprocess_config_from_processor",
    "preprocess_images",
]


def load_image_embedder(spec: str, device="cpu", dtype=torch.float32) -> ImageEmbedder:
    """Build a frozen image embedder from a spec (see the module docstring). Hub models read the
    local cache only when the Hub cannot be reached (:func:`sources.hub_access`): a cached model
    loads at once, a missing one fails at once, not after huggingface_hub's retries."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            FIELD,
            spec,
            "give a backbone: clip, pickscore, hpsv2, hf:<id-or-folder> "
            "or open_clip:<arch>:<checkpoint>",
        )
    spec = spec.strip()
    key = spec.lower()
    if key.startswith("open_clip:"):  # a local checkpoint file: no Hub
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(
                FIELD,
                spec,
                "write open_clip:<architecture>:<checkpoint file>, "
                "e.g. open_clip:ViT-H-14:/models/HPS_v2.1_compressed.pt",
            )
        return load_open_clip_embedder(
            parts[1], parts[2], device, dtype, field_name=FIELD, name=spec
        )
    backbone = sources.BACKBONES.get(key)
    if backbone is None:  # hf:<id or folder>, or a bare Hub id or folder
        location = spec[3:] if key.startswith("hf:") else spec
        with sources.hub_access(location):
            return load_hf_clip_embedder(location, device, dtype)
    model = sources.resolve(backbone.model)
    processor = sources.resolve(backbone.processor) if backbone.processor else None
    with sources.hub_access(model, *([processor] if processor else [])):
        if backbone.open_clip_arch:
            return load_open_clip_embedder(
                backbone.open_clip_arch, model, device, dtype, field_name=FIELD, name=spec
            )
        return load_hf_clip_embedder(model, device, dtype, processor_spec=processor, name=spec)
