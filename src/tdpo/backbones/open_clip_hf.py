"""Run open_clip ViT checkpoints (HPSv2's ViT-H-14) as transformers ``CLIPModel``s.

open_clip needs torchvision, which is not always installable beside a given torch build; the
ViT-based open_clip CLIP is architecturally the transformers CLIP (pre-LayerNorm, class-token
pooling, EOT pooling on a causal text transformer), so its state dict converts key by key.
``tests/component/test_reward_parity.py`` checks the conversion against open_clip's own forward.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import torch

from tdpo.backbones.embedders import FIELD, HFCLIPImageEmbedder
from tdpo.backbones.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig
from tdpo.backbones.sources import hub_file
from tdpo.errors import UsageError

# (vision head width, text heads) of open_clip architectures; others are read from open_clip's
# model_configs/<arch>.json when open_clip is installed.
KNOWN_ARCHS = {
    "ViT-B-32": (64, 8),
    "ViT-B-16": (64, 8),
    "ViT-L-14": (64, 12),
    "ViT-L-14-336": (64, 12),
    "ViT-H-14": (80, 16),
    "ViT-g-14": (88, 16),
    "ViT-bigG-14": (104, 20),
}


def _arch_heads(arch: str) -> tuple[int, int]:
    base = arch.replace("-quickgelu", "")
    if base in KNOWN_ARCHS:
        return KNOWN_ARCHS[base]
    spec = importlib.util.find_spec("open_clip")  # locate the configs without importing open_clip
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, "model_configs", f"{arch}.json")
            if os.path.exists(path):
                with open(path) as handle:
                    cfg = json.load(handle)
                return cfg["vision_cfg"].get("head_width", 64), cfg["text_cfg"].get("heads", 8)
    raise UsageError(
        FIELD, arch, f"unknown open_clip architecture; known: {', '.join(KNOWN_ARCHS)}"
    )


def open_clip_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The model state dict inside an open_clip / HPSv2 checkpoint (``{'state_dict': ...}`` or a
    bare state dict), without a DataParallel ``module.`` prefix."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {
        k[len("module.") :] if k.startswith("module.") else k: v
        for k, v in state.items()
        if torch.is_tensor(v)
    }


def clip_config_from_open_clip(
    state: dict[str, torch.Tensor],
    vision_head_width: int,
    text_heads: int,
    quick_gelu: bool = False,
):
    from transformers import CLIPConfig  # deferred: slow to import

    def layers(prefix):
        pattern = re.compile(rf"^{re.escape(prefix)}resblocks\.(\d+)\.")
        return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))

    act = "quick_gelu" if quick_gelu else "gelu"
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vision = dict(
        hidden_size=width,
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers("visual.transformer."),
        num_attention_heads=width // vision_head_width,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    text_width = state["token_embedding.weight"].shape[1]
    vocab = state["token_embedding.weight"].shape[0]
    text = dict(
        hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers("transformer."),
        num_attention_heads=text_heads,
        vocab_size=vocab,
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act=act,
        layer_norm_eps=1e-5,
        # open_clip pools the text at argmax(token id), the end-of-text token (the last id).
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=0,
    )
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1]
    )


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict to transformers ``CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str) -> None:
        for key, value in state.items():
            if not key.startswith(src + "resblocks."):
                continue
            rest = key[len(src + "resblocks.") :]
            index, name = rest.split(".", 1)
            base = f"{dst}encoder.layers.{index}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}_proj.{kind}"] = chunk
                continue
            for old, new in (
                ("attn.out_proj.", "self_attn.out_proj."),
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ):
                if name.startswith(old):
                    out[base + new + name[len(old) :]] = value
                    break
            else:
                raise ValueError(f"unexpected open_clip key {key}")

    block("visual.transformer.", "vision_model.")
    block("transformer.", "text_model.")
    v, t = "vision_model.", "text_model."
    out[v + "embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out[v + "embeddings.class_embedding"] = state["visual.class_embedding"]
    out[v + "embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for suffix in ("weight", "bias"):
        out[f"{v}pre_layrnorm.{suffix}"] = state[f"visual.ln_pre.{suffix}"]
        out[f"{v}post_layernorm.{suffix}"] = state[f"visual.ln_post.{suffix}"]
        out[f"{t}final_layer_norm.{suffix}"] = state[f"ln_final.{suffix}"]
    out["visual_projection.weight"] = state["visual.proj"].t().contiguous()
    out[t + "embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out[t + "embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["text_projection.weight"] = state["text_projection"].t().contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out


def open_clip_preprocess(image_size: int) -> PreprocessConfig:
    """open_clip's eval transform: torchvision Resize(shortest side, bicubic, antialias) and
    CenterCrop (offsets rounded), OpenAI mean/std."""
    return PreprocessConfig(
        resize=("shortest_edge", image_size),
        crop=(image_size, image_size),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        crop_rounding="round",
    )


def load_open_clip_as_hf(
    arch: str, checkpoint: str, device="cpu", dtype=torch.float32, field_name: str = FIELD
):
    """(transformers CLIPModel, PreprocessConfig) from an open_clip checkpoint file."""
    from transformers import CLIPModel  # deferred: slow to import

    path = os.path.expanduser(checkpoint)
    if not os.path.isfile(path):
        raise UsageError(
            field_name,
            checkpoint,
            "checkpoint file not found; give the path of an "
            "open_clip state dict (e.g. HPS_v2.1_compressed.pt)",
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
        raise UsageError(
            field_name,
            checkpoint,
            f"cannot read the checkpoint with torch.load(weights_only=True) ({type(exc).__name__})",
        ) from None
    state = open_clip_state_dict(raw)
    if "visual.conv1.weight" not in state:
        raise UsageError(
            field_name, checkpoint, "not an open_clip ViT CLIP checkpoint (no visual.conv1.weight)"
        )
    head_width, text_heads = _arch_heads(arch)
    config = clip_config_from_open_clip(state, head_width, text_heads, "quickgelu" in arch)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(convert_open_clip_state_dict(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UsageError(
            field_name,
            checkpoint,
            f"checkpoint does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}",
        )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, open_clip_preprocess(config.vision_config.image_size)


def load_open_clip_embedder(
    arch: str,
    checkpoint: str,
    device="cpu",
    dtype=torch.float32,
    field_name: str = FIELD,
    name: str = "",
) -> HFCLIPImageEmbedder:
    if checkpoint.startswith("hub:"):
        repo_id, filename = checkpoint[len("hub:") :].rsplit("/", 1)
        checkpoint = hub_file(repo_id, filename, field_name, "TDPO_HPSV2_CHECKPOINT")
    model, preprocess = load_open_clip_as_hf(arch, checkpoint, device, dtype, field_name)
    return HFCLIPImageEmbedder(
        model.vision_model,
        model.visual_projection,
        preprocess,
        name=name or f"open_clip:{arch}:{checkpoint}",
    )
