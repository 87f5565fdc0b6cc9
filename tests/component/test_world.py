"""Shapes world: shipped models through the public loaders, rewards, tiny pre-training run."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tdpo.world import (  # noqa: E402
    CLIP_DIR,
    DEFAULT_ETA,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    PIPELINE_DIR,
)
from tdpo.world import generator as gen  # noqa: E402

LEARNED = ["shapes_aesthetic", "shapes_pickscore", "shapes_hps", "shapes_imagereward"]
GOLD = ["shapes_gold_alignment", "shapes_gold_aesthetic", "shapes_gold"]

shipped = pytest.mark.skipif(
    not (PIPELINE_DIR / "model_index.json").exists(), reason="shapes world weights not shipped"
)
pytestmark = pytest.mark.usefixtures("one_thread")  # the pre-training sets its own count


def test_prompt_sets_registered():
    from tdpo.prompts import available_prompt_sets, load_prompts

    assert {"shapes", "shapes_unseen"} <= set(available_prompt_sets())
    assert load_prompts("shapes") == gen.seen_prompts()
    assert load_prompts("shapes_unseen") == gen.unseen_prompts()


def test_tokenizer_one_token_per_word(tmp_path):
    from tdpo.world.models import build_tokenizer

    tok = build_tokenizer(tmp_path)
    for p in gen.all_prompts():
        assert len(tok(p).input_ids) == len(p.split()) + 2


@shipped
def test_pipeline_loads_and_samples():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.safety_checker is None and pipe.unet.config.sample_size == 8
    prompt = "a large red circle on a white background"
    ids = pipe.tokenizer(prompt).input_ids
    assert len(ids) == len(prompt.split()) + 2
    out = pipe(
        [prompt] * 2,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=DEFAULT_GUIDANCE,
        eta=DEFAULT_ETA,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@shipped
def test_clip_vision_loads():
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(CLIP_DIR)
    proc = CLIPImageProcessor.from_pretrained(CLIP_DIR)
    images, _, _ = gen.generate(2, seed=0)
    pix = proc(images=list(images), return_tensors="pt", do_rescale=False).pixel_values
    assert pix.shape == (2, 3, 32, 32)
    assert model(pixel_values=pix).image_embeds.shape == (2, model.config.projection_dim)


@pytest.mark.parametrize("name", GOLD + LEARNED)
def test_reward_builds_and_is_differentiable(name):
    from tdpo.rewards import available_rewards, build_reward

    assert name in available_rewards()
    if name in LEARNED and not (PIPELINE_DIR.parent / "rewards" / f"{name}.json").exists():
        pytest.skip("learned reward weights not shipped")
    reward = build_reward(name)
    images, prompts, _ = gen.generate(3, seed=1)
    x = (images * 0.9 + 0.05).requires_grad_(True)
    r, info = reward(x, prompts, [{} for _ in prompts])
    assert r.shape == (3,) and r.dtype.is_floating_point and torch.isfinite(r).all()
    assert isinstance(info, dict)
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_world_pretrain_tiny_end_to_end(tmp_path, capsys):
    from tdpo.cli import main

    out = tmp_path / "world"
    argv = ["world", "pretrain", "--out", str(out), "--steps-scale", "0.005", "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "world_report.json").read_text())
    assert {"gold", "clip_retrieval", "rewards", "sizes_bytes"} <= set(report)
    assert set(report["rewards"]) == set(LEARNED)
    assert (out / "pipeline" / "model_index.json").exists()
    for name in LEARNED:
        assert (out / "rewards" / f"{name}.safetensors").exists()
    # finished stages are skipped on a second run
    assert main(argv) == 0
    assert "world_report.json" in capsys.readouterr().out
