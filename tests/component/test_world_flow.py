"""The flow shapes world: the pre-training's repeated-context attention, a toy-size run of
``tdpo world pretrain --family flow``, and the shipped StableDiffusion3Pipeline (alias
``shapes-flow``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tdpo.world import (  # noqa: E402
    DEFAULT_FLOW_GUIDANCE,
    DEFAULT_FLOW_STEPS,
    FLOW_PIPELINE_DIR,
    PIPELINE_DIR,
    WEIGHTS_DIR,
)
from tests.fixtures.factories import diffusers_sd3_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the pre-training sets its own count


def _perturbed_transformer():
    from tdpo.world.flow_pretrain import build_transformer

    torch.manual_seed(0)
    model = build_transformer()
    with torch.no_grad():  # diffusers zero-initializes the output layers; make every path count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_one_token_with_log_repeat_bias_equals_the_pipelines_256_zero_t5_tokens():
    from tdpo.world.flow_pretrain import T5_TOKENS, set_repeated_context

    model = _perturbed_transformer()
    x = torch.randn(3, 4, 8, 8)
    clip, pooled = torch.randn(3, 16, 128), torch.randn(3, 128)
    t = torch.tensor([10.0, 500.0, 990.0])
    full = torch.cat([clip, torch.zeros(3, T5_TOKENS, 128)], 1)  # what the pipeline feeds
    one = torch.cat([clip, torch.zeros(3, 1, 128)], 1)

    def run(context):
        with torch.no_grad():
            return model(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=context,
                pooled_projections=pooled,
            ).sample

    reference = run(full)
    set_repeated_context(model, T5_TOKENS)
    collapsed = run(one)
    set_repeated_context(model, 1)  # one zero token counted once: a different model
    wrong = run(one)
    set_repeated_context(model, None)
    assert torch.allclose(run(full), reference)  # back to diffusers' processor
    assert (collapsed - reference).abs().max() < 1e-5
    assert (wrong - reference).abs().max() > 1e-2


def test_flow_world_pretrain_tiny_end_to_end(tmp_path, capsys):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from tdpo.cli import main

    out = tmp_path / "flow"
    argv = ["world", "pretrain", "--family", "flow", "--out", str(out), "--steps-scale", "0.005"]
    assert main([*argv, "--quiet"]) == 0
    for stage in ("latents", "transformer", "report"):
        assert (out / f"{stage}.done.json").is_file()
    assert not (out / "transformer.ckpt.pt").exists()
    report = json.loads((out / "flow_report.json").read_text())
    assert {"gold", "gold_sde", "rewards", "sizes_bytes", "pretraining"} <= set(report)
    assert set(report["gold"]) == {"base_seen", "base_unseen", "clean"}
    assert set(report["gold_sde"]) == {"base_seen", "base_unseen"}
    assert report["pretraining"]["transformer"]["steps"] == 10
    for figures in (*report["gold"].values(), *report["gold_sde"].values()):
        assert 0.0 <= figures["gold"] <= figures["alignment"] <= 1.0
    # the SD world's VAE, weights unchanged, with SD3's shift factor added
    vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae")
    shipped = AutoencoderKL.from_pretrained(PIPELINE_DIR / "vae")
    assert vae.config.shift_factor == report["pretraining"]["latents"]["shift_factor"]
    for (name, a), b in zip(vae.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a, b), name
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None]
    pipe = diffusers_sd3_pipeline(out / "pipeline")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # a second run skips every finished stage, and prints the figures
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done, skipped") == 3 and "gold_sde base_unseen" in printed


def test_shapes_flow_alias_and_shipped_pipeline_samples():
    from tdpo.paths import resolve_alias

    assert resolve_alias("shapes-flow") == str(FLOW_PIPELINE_DIR)
    assert resolve_alias("shapes-world") == str(PIPELINE_DIR)
    index = json.loads((FLOW_PIPELINE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    report = json.loads((WEIGHTS_DIR / "flow_report.json").read_text())
    assert report["pretraining"]["transformer"]["steps"] >= 1000  # the full run, not a toy one
    pipe = diffusers_sd3_pipeline(FLOW_PIPELINE_DIR)
    prompt = "a large red circle on a white background"
    assert len(pipe.tokenizer_2(prompt).input_ids) == len(prompt.split()) + 2
    images = pipe(
        [prompt] * 2,
        num_inference_steps=DEFAULT_FLOW_STEPS,
        guidance_scale=DEFAULT_FLOW_GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_evaluate_flow_without_a_pipeline_folder_is_exit_2(tmp_path, capsys):
    from tdpo.cli import main

    assert main(["world", "evaluate", "--family", "flow", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
