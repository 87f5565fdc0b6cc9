"""Memory estimate for ``tdpo train --dry-run``: loads no model.

Parameter counts come from the safetensors headers of a local pipeline folder (only the JSON
header of each file is read), or from a table of known Hub models. The estimate covers what is
resident for the whole run: frozen weights in their dtype, trainable weights and AdamW moments in
fp32, and the epoch's stored trajectories (latents) and critic state embeddings. Activations of
the forward/backward passes are not included (they depend on attention kernels and resolution);
``docs/performance.md`` lists measured peaks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tdpo.methods import get_method
from tdpo.paths import resolve_alias
from tdpo.rewards.combine import parse_reward_spec

# Parameter counts (millions) of common Hub pipelines: UNet, VAE, text encoder(s).
KNOWN_PIPELINES = {
    "stabilityai/stable-diffusion-xl-base-1.0": (2567.5, 83.7, 817.7),
    "CompVis/stable-diffusion-v1-4": (859.5, 83.7, 123.1),
    "runwayml/stable-diffusion-v1-5": (859.5, 83.7, 123.1),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (859.5, 83.7, 123.1),
    "stabilityai/stable-diffusion-2-1": (865.9, 83.7, 340.4),
    "stabilityai/stable-diffusion-2-1-base": (865.9, 83.7, 340.4),
}
# Vision towers (millions) of the critic backbones.
KNOWN_BACKBONES = {
    "openai/clip-vit-large-patch14": 303.5,
    "clip": 303.5,
    "clip-vit-l-14": 303.5,
    "pickscore": 632.1,
    "yuvalkirstain/PickScore_v1": 632.1,
    "hpsv2": 632.1,
}
# Reward models (millions of parameters resident while training): the paper's models; the shapes
# world's are tiny. Counted from the models' configs.
KNOWN_REWARDS = {
    "aesthetic": 304.9,  # CLIP ViT-L/14 vision tower + projection + MLP
    "pickscore": 986.1,  # CLIP ViT-H/14
    "hpsv2": 986.1,  # open_clip ViT-H/14
    "imagereward": 446.2,  # BLIP ViT-L + BERT with cross-attention + MLP
    "clipscore": 427.6,  # CLIP ViT-L/14
}
# Stable Diffusion 3.5 (StableDiffusion3Pipeline): transformer (with its positional-embedding
# table), VAE, CLIP-L, CLIP-G, T5-XXL encoder, in millions: counted by building each component
# from the Hub configs on PyTorch's meta device (no weights; benchmarks/gpu_check.py holds the
# medium configs). A folder saved without T5 is counted from its files instead.
SD35_TEXT = (123.7, 694.7, 4762.3)
KNOWN_PIPELINES.update(
    {
        "stabilityai/stable-diffusion-3.5-medium": (2469.7, 83.8, *SD35_TEXT),
        "stabilityai/stable-diffusion-3.5-large": (8146.3, 83.8, *SD35_TEXT),
        "stabilityai/stable-diffusion-3.5-large-turbo": (8146.3, 83.8, *SD35_TEXT),
    }
)
# LoRA parameters per unit of rank on to_q, to_k, to_v, to_out.0 of every attention: 8 * width
# per attention (four width x width projections, r * (in + out) each); SD3.5 medium has 24 joint
# attentions and 13 dual ones of width 1536, large 38 of width 2432 (flow_lora_per_rank).
KNOWN_LORA_PER_RANK = {
    "stabilityai/stable-diffusion-3.5-medium": 8 * 1536 * (24 + 13),
    "stabilityai/stable-diffusion-3.5-large": 8 * 2432 * 38,
    "stabilityai/stable-diffusion-3.5-large-turbo": 8 * 2432 * 38,
}
SD3_TEXT_TOKENS = (77 + 256, 4096)  # CLIP tokens + T5 tokens (zeros without T5), joint width

SD_LATENT = (4, 64, 64)  # latents of 512x512 images
KNOWN_LATENTS = {
    "stabilityai/stable-diffusion-xl-base-1.0": (4, 128, 128),  # 1024x1024 images
    **{name: (16, 128, 128) for name in KNOWN_LORA_PER_RANK},  # SD3.5 at 1024x1024
}


def safetensors_numel(folder: Path) -> int:
    """Total elements in every ``*.safetensors`` file under ``folder`` (headers only)."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def _millions(
    spec: str, table: dict[str, object], subfolders: tuple[str, ...]
) -> list[float] | None:
    path = Path(resolve_alias(spec)).expanduser()
    if path.is_dir():
        if subfolders:
            return [
                safetensors_numel(path / sub) / 1e6 if (path / sub).is_dir() else 0.0
                for sub in subfolders
            ]
        return [safetensors_numel(path) / 1e6]
    value = table.get(spec)
    if value is None:
        return None
    return list(value) if isinstance(value, tuple) else [float(value)]


def estimate_memory(config, samples_per_process: int, on_gpu: bool) -> list[str]:
    """Lines describing the resident memory of a run (weights, optimizer, stored epoch)."""
    lines = []
    weight_bytes = 2 if on_gpu and config.mixed_precision != "fp32" else 4
    spec = config.model.pretrained
    flow = _flow_config(spec)
    if flow is not None:  # a Stable Diffusion 3 folder: transformer and up to three encoders
        subfolders = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    else:
        subfolders = ("unet", "vae", "text_encoder", "text_encoder_2")
    pipe = _millions(spec, KNOWN_PIPELINES, subfolders)
    if pipe is None:
        lines.append(
            f"# memory: unknown parameter count for {spec!r} "
            "(not a local folder nor a known Hub id)"
        )
        return lines
    unet_m, vae_m, *text = pipe
    is_flow = flow is not None or spec in KNOWN_LORA_PER_RANK
    text_m = sum(text)
    frozen_m = unet_m + vae_m + text_m
    if config.model.finetune == "lora" and is_flow:
        per_rank = flow_lora_per_rank(flow) if flow is not None else KNOWN_LORA_PER_RANK[spec]
        trainable_m = per_rank * config.model.lora_rank / 1e6
    elif config.model.finetune == "lora":
        # LoRA on attention projections: about 0.8 M parameters per rank-4 on SD 1.x.
        trainable_m = unet_m * 0.00093 * config.model.lora_rank
    else:
        trainable_m = unet_m
    uses_critic = get_method(config.train.algorithm).uses_critic
    embeds_images = uses_critic and config.critic.input in ("image", "x0")
    backbone_m = 0.0
    if embeds_images:
        found = _millions(config.critic.backbone, KNOWN_BACKBONES, ())
        backbone_m = found[0] if found else float("nan")
    head_m = 1.3 if uses_critic else 0.0
    rewards_m = reward_millions(config)
    mib = 1024**2
    weights = (frozen_m + backbone_m + rewards_m) * 1e6 * weight_bytes / mib
    trainable = (trainable_m + head_m) * 1e6 * 4 * 3 / mib  # weights + 2 AdamW moments, fp32
    latent = _latent_shape(spec, unet_m)
    latents = samples_per_process * (config.sample.num_steps + 1)
    for d in latent:
        latents *= d
    stored = latents * 4 / mib
    text_width = 768  # about SD's text width
    if is_flow:  # SD3's prompt embeddings (and the negative ones with CFG) are stored per sample
        tokens, text_width = SD3_TEXT_TOKENS
        if flow is not None:
            text_width = int(flow.get("joint_attention_dim", text_width))
        copies = 2 if config.sample.guidance_scale > 1 else 1
        stored += samples_per_process * copies * tokens * text_width * 4 / mib
    if uses_critic:
        dim = 768 if embeds_images else latent[0] * 64 + 1
        dim += text_width if config.critic.prompt_input else 0
        stored += samples_per_process * config.sample.num_steps * dim * 4 / mib
    total = weights + trainable + stored
    lines.append(
        f"# parameters: {'transformer' if is_flow else 'UNet'} {unet_m:.1f} M, VAE {vae_m:.1f} M, "
        f"text encoder {text_m:.1f} M"
        + (f", critic backbone {backbone_m:.1f} M" if backbone_m else "")
        + (f", rewards {rewards_m:.1f} M" if rewards_m else "")
        + f"; trainable {trainable_m + head_m:.2f} M"
    )
    precision = "bf16/fp16" if weight_bytes == 2 else "fp32"
    lines.append(
        f"# memory per process (excluding activations): frozen weights {weights:.0f} MiB "
        f"({precision}), trainable + AdamW {trainable:.0f} MiB, stored epoch {stored:.0f} MiB; "
        f"total ~{total / 1024:.2f} GiB"
    )
    if weight_bytes == 4 and config.mixed_precision != "fp32":
        # No GPU here: the frozen weights are counted in fp32 (what this machine would run).
        # On a GPU, mixed_precision halves them; the README's table gives that figure.
        half = weights / 2 + trainable + stored
        lines.append(
            f"# no GPU here, so the weights are counted in fp32; on a GPU with "
            f"mixed_precision={config.mixed_precision} they take {weights / 2:.0f} MiB: "
            f"total ~{half / 1024:.2f} GiB"
        )
    return lines


def _flow_config(spec: str) -> dict | None:
    """A local Stable Diffusion 3 folder's ``transformer/config.json`` (None otherwise)."""
    path = Path(resolve_alias(spec)).expanduser() / "transformer" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def flow_lora_per_rank(transformer: dict) -> int:
    """LoRA parameters per unit of rank on to_q, to_k, to_v and to_out.0 of an SD3 transformer
    (its config.json): every joint block has one attention, the dual-attention blocks a second;
    each has four width x width projections, r * (width + width) parameters apiece."""
    width = int(transformer.get("num_attention_heads", 18)) * int(
        transformer.get("attention_head_dim", 64)
    )
    attentions = int(transformer.get("num_layers", 18)) + len(
        transformer.get("dual_attention_layers") or ()
    )
    return 8 * width * attentions


def _latent_shape(spec: str, unet_m: float) -> tuple[int, int, int]:
    """The denoiser's latent shape: from a local folder's unet/ (or SD3's transformer/)
    config.json, else known Hub ids, else Stable Diffusion 1.x's 4x64x64."""
    folder = Path(resolve_alias(spec)).expanduser()
    config_path = folder / "unet" / "config.json"
    if not config_path.is_file():
        config_path = folder / "transformer" / "config.json"
    if config_path.is_file():
        unet = json.loads(config_path.read_text())
        size = unet.get("sample_size", 64)
        size = size[0] if isinstance(size, list) else size
        return (int(unet.get("in_channels", 4)), int(size), int(size))
    return KNOWN_LATENTS.get(spec, SD_LATENT if unet_m > 100 else (4, 8, 8))


def reward_millions(config) -> float:
    """Parameters of the training reward and the panel that stay loaded (known models only)."""
    names = {name for name, _ in parse_reward_spec(config.reward.name, "reward.name")}
    names |= set(config.reward.panel) | set(config.eval.rewards)
    return sum(KNOWN_REWARDS.get(name, 0.0) for name in names)
