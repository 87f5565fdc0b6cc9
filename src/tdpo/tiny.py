"""Tiny, randomly initialized models built from configs (no download): for tests and smoke runs.

``build_tiny_pipeline(DIR)`` writes a genuine ``StableDiffusionPipeline`` folder (16x16 images,
8x8x4 latents) that ``from_pretrained(DIR)`` loads like any Hub model; ``build_tiny_sdxl_pipeline``
the same for ``StableDiffusionXLPipeline`` (two text encoders, added conditions);
``build_tiny_clip(DIR)`` writes a tiny CLIP (vision tower + image processor) usable as the
critic's backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "the",
    "cat",
    "dog",
    "horse",
    "bird",
    "fish",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "on",
    "in",
    "with",
    "and",
    "white",
    "black",
    "background",
    "circle",
    "square",
    "triangle",
]


def write_word_tokenizer(directory: Path, words: list[str], max_length: int = 16):
    """A ``CLIPTokenizer`` whose BPE merges turn each of ``words`` into one token."""
    from transformers import CLIPTokenizer  # deferred: seconds to import

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") | set("".join(words)))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: dict[str, None] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges[f"{current} {piece}"] = None
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    raw = directory / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length
    )
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return tokenizer


def sd_ddim_scheduler():
    """DDIM with Stable Diffusion 1.x's (and SDXL's) training noise schedule (the shapes world's
    too)."""
    from diffusers import DDIMScheduler  # deferred: seconds to import

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """A ``StableDiffusionPipeline`` of these components with Stable Diffusion 1.x's DDIM
    schedule and no safety checker."""
    from diffusers import StableDiffusionPipeline  # deferred: seconds to import

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel  # deferred: seconds to import

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def _tiny_vae(latent_channels: int = 4, **extra):
    """A random ``AutoencoderKL`` for 16x16 images (2x downsampling: 8x8 latents)."""
    from diffusers import AutoencoderKL  # deferred: seconds to import

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        **extra,
    )


def _tiny_text_config(tokenizer, hidden_size: int, **extra):
    from transformers import CLIPTextConfig  # deferred: seconds to import

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save(pipe, directory: str | Path):
    pipe.save_pretrained(directory, safe_serialization=True)
    tok_dir = Path(directory) / "_tok"
    if tok_dir.exists():
        tok_dir.rmdir()
    return pipe


def build_tiny_pipeline(directory: str | Path, seed: int = 0, cross_attention_dim: int = 32):
    """Save a tiny random ``StableDiffusionPipeline`` (about 0.5 M parameters) to ``directory``."""
    from transformers import CLIPTextModel  # deferred: seconds to import

    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim)
    vae = _tiny_vae()
    tokenizer = write_word_tokenizer(Path(directory) / "_tok", TINY_WORDS)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, cross_attention_dim))
    return _save(assemble_pipeline(unet, vae, text_encoder, tokenizer), directory)


def build_tiny_sdxl_pipeline(directory: str | Path, seed: int = 0):
    """Save a tiny random ``StableDiffusionXLPipeline`` to ``directory``: SDXL's structure at toy
    size (two text encoders whose penultimate states are concatenated, 16 + 16 = 32 wide; the
    UNet's ``text_time`` added conditions from the pooled projection and six time ids)."""
    # deferred: diffusers and transformers take seconds to import
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width, projection, time_dim = 16, 16, 8
    unet = _tiny_unet(
        2 * width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    tokenizer = write_word_tokenizer(Path(directory) / "_tok", TINY_WORDS)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer, width)),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer, width, projection_dim=projection)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        add_watermarker=False,
    )
    return _save(pipe, directory)


def build_tiny_clip(directory: str | Path, image_size: int = 16, seed: int = 0) -> Path:
    """Save a tiny random CLIP vision tower with projection and its image processor."""
    from transformers import (  # deferred: transformers takes seconds to import
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=4,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return Path(directory)


def build_tiny_sd3_pipeline(directory: str | Path, seed: int = 0):
    """Save a tiny random ``StableDiffusion3Pipeline`` to ``directory``: SD3's structure at toy
    size, without T5 (``text_encoder_3=None``, as a pipeline saved without it): two CLIP text
    encoders with projection (16 + 16 wide: their penultimate states are concatenated and
    zero-padded to the transformer's 32-wide joint attention; pooled 16 + 16 = 32), an
    ``SD3Transformer2DModel`` (2 joint blocks, 8x8x16 latents in 2x2 patches), a 16-channel VAE
    with SD3's scaling and shift factors (16x16 images) and the flow-matching Euler scheduler
    with SD3's shift 3."""
    # deferred: diffusers and transformers take seconds to import
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width, projection = 16, 16
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * width,
        caption_projection_dim=32,
        pooled_projection_dim=2 * projection,
        out_channels=16,
        pos_embed_max_size=16,
    )
    vae = _tiny_vae(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer = write_word_tokenizer(Path(directory) / "_tok", TINY_WORDS)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer, width, projection_dim=projection)
        ),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer, width, projection_dim=projection)
        ),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _save(pipe, directory)
