"""Builders for the shapes world's models: tokenizer, VAE, UNet, text encoder, tiny CLIP.

Configurations are plain dicts so the sizes are visible in one place (the noise schedule is
Stable Diffusion 1.x's: :func:`tdpo.tiny.sd_ddim_scheduler`). Heavy imports happen inside the
functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tdpo.world.generator import WORDS

MAX_LENGTH = 16  # tokens, incl. <|startoftext|> and <|endoftext|>
EMBED_DIM = 64

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "mid_block_add_attention": False,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": EMBED_DIM,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": MAX_LENGTH,
    "projection_dim": EMBED_DIM,
}

VISION_CONFIG: dict[str, Any] = {
    "hidden_size": EMBED_DIM,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
    "projection_dim": EMBED_DIM,
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte -> printable unicode table (as in CLIP's simple_tokenizer.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case ASCII word (ends with </w>)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write a CLIP BPE vocabulary (vocab.json, merges.txt) in which every world word is a
    single token; other text falls back to byte-level pieces, as in CLIP."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    # Chain each word's pieces left to right; a later word's merges can pre-empt an earlier
    # chain (e.g. "r e" from "red" inside "green"), so re-tokenize and append merges of the
    # pieces actually produced until every world word is one token.
    for _ in range(10):
        ranks = {pair: i for i, pair in enumerate(merges)}
        done = True
        for word in WORDS:
            parts = _bpe(word, ranks)
            while len(parts) > 1:
                done = False
                pair = (parts[0], parts[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                merged = parts[0] + parts[1]
                if merged not in vocab_list:
                    vocab_list.append(merged)
                parts = [merged] + parts[2:]
        if done:
            break
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(directory: str | Path):
    """A ``CLIPTokenizer`` over the world's words (files written to ``directory``)."""
    from transformers import CLIPTokenizer  # deferred: transformers takes seconds to import

    directory = write_tokenizer_files(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def _text_config(tokenizer) -> dict[str, Any]:
    """:data:`TEXT_CONFIG` with the vocabulary size and special token ids of ``tokenizer``."""
    return dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel  # deferred: seconds to import

    return CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))


def build_vae():
    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel  # deferred: diffusers takes seconds to import

    return UNet2DConditionModel(**UNET_CONFIG)


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel  # deferred: seconds to import

    cfg = CLIPConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(VISION_CONFIG),
        projection_dim=EMBED_DIM,
    )
    return CLIPModel(cfg)


def build_image_processor():
    from transformers import CLIPImageProcessor  # deferred: seconds to import

    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_resize=True,
        do_center_crop=True,
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
