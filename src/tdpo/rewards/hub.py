"""The paper's reward models, loaded from the Hugging Face Hub or local copies.

Registered names: ``aesthetic``, ``pickscore``, ``hpsv2``, ``imagereward``, ``clipscore``.
Each factory is ``factory(device=None, dtype=None, **overrides)`` and returns a
:class:`HubReward`: ``reward(images, prompts, metadata) -> (rewards [B] float32, info)``.

- Preprocessing is done in torch (see ``tdpo.backbones.preprocess_images``); when the images
  require grad and grad mode is on, the reward is differentiable w.r.t. the images (AlignProp);
  otherwise it runs under ``torch.no_grad``. Both paths compute the same values.
- ``reward.reference(images, prompts)`` scores through the model's own image processor
  (uint8 PIL images), for parity checks.
- Model locations: keyword overrides, else environment variables, else Hub ids
  (``tdpo.backbones.sources``); see ``docs/rewards.md``.
- ``dtype`` defaults to float16 on CUDA and float32 elsewhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdpo.backbones import (
    PreprocessConfig,
    load_clip_preprocess,
    load_hf_clip_embedder,
    preprocess_config_from_processor,
    preprocess_images,
)
from tdpo.backbones.open_clip_hf import load_open_clip_as_hf
from tdpo.backbones.sources import (
    cache_only_unless_reachable,
    check_available,
    hub_error_fix,
    is_local,
    resolve,
    resolve_file,
)
from tdpo.errors import UsageError
from tdpo.images import to_uint8_arrays
from tdpo.rewards.imagereward_hf import (
    MAX_PROMPT_TOKENS,
    MLPHead,
    imagereward_pil_transform,
    load_imagereward_model,
)
from tdpo.rewards.registry import register_reward
from tdpo.rewards.spec import is_dotted_path, is_weighted, parse_reward_spec

FIELD = "reward.name"

# The models each Hub reward loads (tdpo.backbones.sources), checked before anything loads.
REWARD_SOURCES: dict[str, tuple[str, ...]] = {
    "aesthetic": ("clip_l14", "aesthetic_mlp"),
    "pickscore": ("pickscore_model", "pickscore_processor"),
    "hpsv2": ("hpsv2_checkpoint", "hpsv2_tokenizer"),
    "imagereward": ("imagereward_checkpoint", "imagereward_tokenizer"),
    "clipscore": ("clipscore_model",),
}


def check_reward_sources(spec: str, field: str = FIELD) -> None:
    """Before anything loads: every Hub model a reward spec needs is a local path that exists,
    reachable on the Hub, or in the local cache; else one UsageError naming ``field``, the
    user's value, the missing file and the variable to set (no download, no retries)."""
    if not isinstance(spec, str) or is_dotted_path(spec):
        return
    names = [n for n, _ in parse_reward_spec(spec, field)] if is_weighted(spec, field) else [spec]
    for name in names:
        for source in REWARD_SOURCES.get(name, ()):
            check_available(source, field, name if name == spec else spec)


def _hub_factory(name: str) -> Callable[[Callable], Callable]:
    """Register a Hub reward whose loads use the local cache only when the Hub cannot be reached
    (a missing file fails at once) and whose load errors name the reward (``reward.name=
    'aesthetic': ...``), not only the model id."""

    def decorator(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def build(*args, **kwargs):
            try:
                with cache_only_unless_reachable():
                    return factory(*args, **kwargs)
            except UsageError as exc:
                if exc.field != FIELD or exc.value == name:
                    raise
                raise UsageError(FIELD, name, f"loading {exc.value}: {exc.fix}") from None

        return register_reward(name)(build)

    return decorator


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


class HubReward(nn.Module):
    """Base: a frozen scorer. Subclasses implement ``score(images, prompts) -> [B]`` (torch path)
    and optionally ``reference(images, prompts)`` (the model's own processor)."""

    name = "hub"
    differentiable = True

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> tuple[torch.Tensor, dict]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        grad = torch.is_grad_enabled() and images.requires_grad
        with torch.set_grad_enabled(grad):
            scores = self.score(images, list(prompts)).float()
        return scores, {f"{self.name}_mean": scores.detach().mean().item()}

    def train(self, mode: bool = True) -> HubReward:  # noqa: ARG002 - always frozen
        return super().train(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- CLIP-based rewards


class CLIPScorer(nn.Module):
    """A transformers ``CLIPModel`` with a tokenizer and a torch image preprocessing."""

    def __init__(self, model, tokenizer, preprocess, image_processor=None, max_length=77):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess
        self.image_processor = image_processor
        self.max_length = max_length

    @property
    def device(self):
        return self.model.logit_scale.device

    @property
    def dtype(self):
        return self.model.logit_scale.dtype

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images.to(self.device), self.preprocess_config)

    def processor_pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_processor is None:
            raise RuntimeError("no image processor to compare with")
        out = self.image_processor(images=to_uint8_arrays(images), return_tensors="pt")
        return out["pixel_values"].to(self.device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixel_values.to(self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tokens = {
            k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")
        }
        pooled = self.model.text_model(**tokens).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def cosine(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(pixel_values) * self.text_features(prompts)).sum(-1)


def _load_clip_model(spec: str, device, dtype, field: str):
    # deferred: transformers takes seconds to import; names are checked without it
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    if is_local(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise UsageError(
            field, spec, "the path does not exist; give a CLIP model folder or a Hub id"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = CLIPModel.from_pretrained(os.path.expanduser(spec), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(field, spec, hub_error_fix(spec, exc)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval().requires_grad_(False)


def _load_tokenizer(spec: str, field: str):
    from transformers import AutoTokenizer  # deferred: slow to import

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(spec))
    except (OSError, ValueError) as exc:
        raise UsageError(field, spec, hub_error_fix(spec, exc)) from None


def _load_image_processor(spec: str):
    # deferred: transformers takes seconds to import; names are checked without it
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return CLIPImageProcessor.from_pretrained(os.path.expanduser(spec))
    except (OSError, ValueError):
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_hf_clip_scorer(
    model_spec: str, processor_spec: str | None, device, dtype, field: str = FIELD
) -> CLIPScorer:
    model = _load_clip_model(model_spec, device, dtype, field)
    tokenizer = None
    for spec in [processor_spec, model_spec] if processor_spec else [model_spec]:
        try:
            tokenizer = _load_tokenizer(spec, field)
            break
        except UsageError as exc:
            error = exc
    if tokenizer is None:
        raise error
    processor = None
    for spec in [processor_spec, model_spec] if processor_spec else [model_spec]:
        processor = _load_image_processor(spec)
        if processor is not None:
            break
    preprocess = (
        preprocess_config_from_processor(processor)
        if processor is not None
        else load_clip_preprocess(model_spec, None, model.config.vision_config.image_size)
    )
    return CLIPScorer(model, tokenizer, preprocess, processor)


class CLIPReward(HubReward):
    """``scale * cos(image, text)`` (PickScore: scale = exp(logit_scale); HPSv2: 1) or CLIPScore
    ``100 * max(cos, 0)``."""

    def __init__(self, scorer: CLIPScorer, name: str, kind: str):
        super().__init__()
        self.scorer, self.name, self.kind = scorer, name, kind

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        if self.kind == "logit":
            return self.scorer.model.logit_scale.exp().float() * cosine
        if self.kind == "clipscore":
            return 100.0 * cosine.clamp(min=0)
        return cosine

    def score(self, images, prompts):
        return self._from_cosine(self.scorer.cosine(self.scorer.pixels(images), prompts))

    @torch.no_grad()
    def reference(self, images, prompts):
        return self._from_cosine(self.scorer.cosine(self.scorer.processor_pixels(images), prompts))


@_hub_factory("pickscore")
def pickscore(device=None, dtype=None, model: str | None = None, processor: str | None = None):
    """PickScore_v1: exp(logit_scale) * cos(image, text) (about 18-24 on SD images)."""
    device, dtype = _device_dtype(device, dtype)
    scorer = load_hf_clip_scorer(
        resolve("pickscore_model", model), resolve("pickscore_processor", processor), device, dtype
    )
    return CLIPReward(scorer, "pickscore", "logit")


@_hub_factory("clipscore")
def clipscore(device=None, dtype=None, model: str | None = None):
    """CLIPScore: 100 * max(cos(image, text), 0) with CLIP ViT-L/14 by default."""
    device, dtype = _device_dtype(device, dtype)
    spec = resolve("clipscore_model", model)
    return CLIPReward(load_hf_clip_scorer(spec, None, device, dtype), "clipscore", "clipscore")


@_hub_factory("hpsv2")
def hpsv2(
    device=None,
    dtype=None,
    checkpoint: str | None = None,
    tokenizer: str | None = None,
    arch: str = "ViT-H-14",
):
    """HPS v2.1: cos(image, text) of the HPSv2-fine-tuned open_clip ViT-H-14 (about 0.2-0.35)."""
    device, dtype = _device_dtype(device, dtype)
    path = resolve_file("hpsv2_checkpoint", checkpoint, FIELD)
    model, preprocess = load_open_clip_as_hf(arch, path, device, dtype, FIELD)
    scorer = CLIPScorer(
        model,
        _load_tokenizer(resolve("hpsv2_tokenizer", tokenizer), FIELD),
        preprocess,
        image_processor=None,
    )
    return CLIPReward(scorer, "hpsv2", "cosine")


# ----------------------------------------------------------------------------- aesthetic


AestheticMLP = (
    MLPHead  # the LAION improved aesthetic predictor head (no nonlinearity, as published)
)


def load_aesthetic_mlp(path: str, device, field: str = FIELD) -> AestheticMLP:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            field,
            path,
            f"cannot read the aesthetic MLP with torch.load("
            f"weights_only=True) ({type(exc).__name__})",
        ) from None
    state = state.get("state_dict", state)
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(
            field, path, f"not the LAION aesthetic MLP ({str(exc).splitlines()[0]})"
        ) from None
    return mlp.to(device).eval().requires_grad_(False)


class AestheticReward(HubReward):
    name = "aesthetic"

    def __init__(self, embedder, mlp: AestheticMLP, image_processor=None):
        super().__init__()
        self.embedder, self.mlp, self.image_processor = embedder, mlp, image_processor

    def _head(self, embeddings):
        return self.mlp(embeddings.to(next(self.mlp.parameters()).dtype)).squeeze(-1).float()

    def score(self, images, prompts):
        return self._head(self.embedder(images))

    @torch.no_grad()
    def reference(self, images, prompts):
        pixels = self.image_processor(images=to_uint8_arrays(images), return_tensors="pt")[
            "pixel_values"
        ]
        features = self.embedder.encode_pixels(pixels.to(self.embedder.device, self.embedder.dtype))
        return self._head(F.normalize(features.float(), dim=-1))


@_hub_factory("aesthetic")
def aesthetic(device=None, dtype=None, clip: str | None = None, mlp: str | None = None):
    """LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14
    L2-normalized image embeddings: about 1-10, SD 1.4 images score about 5-6."""
    device, dtype = _device_dtype(device, dtype)
    clip_spec = resolve("clip_l14", clip)
    embedder = load_hf_clip_embedder(clip_spec, device, dtype, field_name=FIELD, name="aesthetic")
    head = load_aesthetic_mlp(resolve_file("aesthetic_mlp", mlp, FIELD), device)
    return AestheticReward(embedder, head.to(dtype), _load_image_processor(clip_spec))


# ----------------------------------------------------------------------------- ImageReward


@_hub_factory("imagereward")
def imagereward(
    device=None, dtype=None, checkpoint: str | None = None, tokenizer: str | None = None
):
    """ImageReward-v1.0 (BLIP ViT-L + BERT with cross-attention + MLP) run as transformers BLIP
    modules, standardized with its published mean/std (mostly -2..2)."""
    device, dtype = _device_dtype(device, dtype)
    path = resolve_file("imagereward_checkpoint", checkpoint, FIELD)
    model = load_imagereward_model(path, device, dtype, FIELD)
    return ImageRewardReward(
        model, _load_tokenizer(resolve("imagereward_tokenizer", tokenizer), FIELD)
    )


class ImageRewardReward(HubReward):
    """ImageReward's score with a torch preprocessing equal to its own PIL/torchvision one
    (``Resize(224, bicubic)``, ``CenterCrop(224)`` with rounded offsets, OpenAI mean/std)."""

    name = "imagereward"

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        size = model.image_size
        self.preprocess_config = PreprocessConfig(
            resize=("shortest_edge", size), crop=(size, size), crop_rounding="round"
        )

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        text = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        return self.model(
            pixels.to(device), text["input_ids"].to(device), text["attention_mask"].to(device)
        )

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self.preprocess_config)

    def score(self, images, prompts):
        return self._score_pixels(self.pixels(images), prompts)

    @torch.no_grad()
    def reference(self, images, prompts):
        return self._score_pixels(imagereward_pil_transform(images, self.model.image_size), prompts)
