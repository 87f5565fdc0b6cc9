"""ImageReward-v1.0 run as transformers BLIP modules, without the ``image-reward`` package.

The package pins ``timm==0.6.13`` and imports helpers that transformers 5 removed, so it does not
install beside this project. Its model is BLIP's ViT (``vit.py``) feeding BLIP's BERT with
cross-attention (``med.py``), whose ``[CLS]`` state goes through an MLP and the published
standardization. Those two towers are architecturally transformers' ``BlipVisionModel`` and
``BlipTextModel``, so ``ImageReward.pt`` converts key by key:

- ``blip.visual_encoder.*`` -> ``BlipVisionModel`` (timm-style names renamed, as transformers'
  own BLIP conversion script does; LayerNorm eps 1e-6 as in BLIP's ViT);
- ``blip.text_encoder.*`` -> ``BlipTextModel`` (same BERT names; cross-attention in every layer);
- ``mlp.layers.*`` -> the same five-Linear head as the LAION aesthetic MLP.

``tests/component/test_reward_parity.py`` checks the conversion against an independent transcript
of BLIP's ``vit.py``/``med.py`` forward on a tiny random checkpoint with the original key names.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image
from torch import nn

from tdpo.backbones.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tdpo.errors import UsageError
from tdpo.images import to_uint8_arrays

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean
IMAGEREWARD_STD = 1.0333394966054072  # ImageReward.py: self.std
MAX_PROMPT_TOKENS = 35  # ImageReward.score: tokenizer(..., max_length=35)
HEAD_DIM = 64  # BLIP ViT-B/L and BERT-base all use 64-wide attention heads

VISION_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."

# BLIP (timm) ViT names -> transformers BlipVisionModel names.
_VISION_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def vision_key(key: str) -> str:
    """One BLIP ViT parameter name (without the ``blip.visual_encoder.`` prefix) in transformers."""
    for pattern, replacement in _VISION_RULES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise KeyError(key)


def _count_layers(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def blip_configs(state: dict[str, torch.Tensor]):
    """``(BlipVisionConfig, BlipTextConfig)`` read off an ImageReward state dict's shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig  # deferred: slow to import

    v = lambda k: state[VISION_PREFIX + k]  # noqa: E731
    t = lambda k: state[TEXT_PREFIX + k]  # noqa: E731
    width = v("cls_token").shape[-1]
    patch = v("patch_embed.proj.weight").shape[-1]
    grid = math.isqrt(v("pos_embed").shape[1] - 1)
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=v("blocks.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=_count_layers(state, r"^blip\.visual_encoder\.blocks\.(\d+)\."),
        num_attention_heads=max(1, width // HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_dropout=0.0,
    )
    vocab, hidden = t("embeddings.word_embeddings.weight").shape
    text = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        encoder_hidden_size=t("encoder.layer.0.crossattention.self.key.weight").shape[1],
        intermediate_size=t("encoder.layer.0.intermediate.dense.weight").shape[0],
        num_hidden_layers=_count_layers(state, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\."),
        num_attention_heads=max(1, hidden // HEAD_DIM),
        max_position_embeddings=t("embeddings.position_embeddings.weight").shape[0],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        is_decoder=True,  # transformers builds the cross-attention layers only for decoders;
    )  # the encoder (bidirectional) mask is chosen per call, as BlipForImageTextRetrieval does.
    return vision, text


class MLPHead(nn.Module):
    """ImageReward's ``MLP`` (and LAION's aesthetic MLP): five Linears, no nonlinearity."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class ImageRewardModel(nn.Module):
    """``(mlp(text_encoder(prompt | vision(image))[CLS]) - mean) / std``, as ``ImageReward.score``."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel  # deferred: slow to import

        self.vision = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = MLPHead(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state
        image_atts = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        raw = self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt names -> :class:`ImageRewardModel` names (unused BLIP parts dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith(VISION_PREFIX):
            out["vision." + vision_key(key[len(VISION_PREFIX) :])] = value
        elif key.startswith(TEXT_PREFIX):
            rest = key[len(TEXT_PREFIX) :]
            if rest != "embeddings.position_ids":  # a buffer in med.py, recomputed here
                out["text_encoder." + rest] = value
        elif key.startswith(MLP_PREFIX):
            out[key] = value
    return out


def load_imagereward_model(path: str, device, dtype, field: str) -> ImageRewardModel:
    """An :class:`ImageRewardModel` from an ``ImageReward.pt`` state dict, frozen, on ``device``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            field,
            path,
            f"cannot read the ImageReward checkpoint with torch.load("
            f"weights_only=True) ({type(exc).__name__})",
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model = ImageRewardModel(*blip_configs(state))
        missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            field,
            path,
            f"not an ImageReward checkpoint ({reason}); give THUDM/ImageReward's ImageReward.pt",
        ) from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UsageError(
            field,
            path,
            f"not an ImageReward checkpoint ({len(missing)} missing, "
            f"{len(unexpected)} unexpected weights, e.g. {(missing + unexpected)[0]})",
        )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def imagereward_pil_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """ImageReward's own preprocessing on uint8 PIL images: torchvision ``Resize(size, BICUBIC)``
    (PIL's bicubic), ``CenterCrop(size)`` (rounded offsets), ``ToTensor``, OpenAI mean/std."""
    out = []
    for array in to_uint8_arrays(images):
        image = Image.fromarray(array)
        w, h = image.size
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        crop = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size] / 255
        out.append(torch.from_numpy(crop.copy()).permute(2, 0, 1))
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std
