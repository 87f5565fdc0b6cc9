"""``tdpo train --dry-run`` for Stable Diffusion 3.5: parameter counts from the architecture
configs (checked on PyTorch's meta device: no weights), the LoRA size formula against peft."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_check import SD35M_TRANSFORMER as SD35_MEDIUM
from tdpo.cli import main
from tdpo.estimate import KNOWN_LORA_PER_RANK, KNOWN_PIPELINES, flow_lora_per_rank

# SD35_MEDIUM: stabilityai/stable-diffusion-3.5-medium's transformer config, as the GPU check
# builds it; the tests hold tdpo's figures for that model to the architecture it builds.
MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def _count(module) -> float:
    params = sum(p.numel() for p in module.parameters())
    return (params + sum(b.numel() for b in module.buffers())) / 1e6


def test_sd35_medium_counts_match_the_architecture():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
    assert _count(transformer) == pytest.approx(KNOWN_PIPELINES[MEDIUM][0], abs=0.05)
    projections = [
        m
        for name, m in transformer.named_modules()
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    per_rank = sum(m.in_features + m.out_features for m in projections)
    assert per_rank == KNOWN_LORA_PER_RANK[MEDIUM] == flow_lora_per_rank(SD35_MEDIUM)


def test_lora_formula_matches_peft_on_a_small_dual_attention_transformer():
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    config = {**SD35_MEDIUM, "num_layers": 3, "dual_attention_layers": (0, 1)}
    config.update(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16)
    config.update(joint_attention_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    transformer = SD3Transformer2DModel(**{**config, "sample_size": 8})
    transformer.add_adapter(
        LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    lora = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
    assert lora == 3 * flow_lora_per_rank(config)


@pytest.mark.parametrize(
    "model, transformer, trainable",
    [(MEDIUM, "2469.7", "1.82"), ("stabilityai/stable-diffusion-3.5-large", "8146.3", "2.96")],
)
def test_dry_run_estimates_sd35(model, transformer, trainable, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the same figures with or without a GPU
    args = ["train", "--model", model, "--preset", "grpo", "--set", "sample.num_steps=10"]
    args += ["--set", "sample.guidance_scale=4.5", "--set", "mixed_precision=bf16"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"transformer {transformer} M, VAE 83.8 M, text encoder 5580.7 M" in out
    assert f"trainable {trainable} M" in out
    assert "on a GPU with mixed_precision=bf16" in out
