"""Issue 12's done-when check for Stable Diffusion 3, in-process through ``tdpo train``: on a tiny
``StableDiffusion3Pipeline`` folder built from configs (no T5), GRPO and TDPO-R with the latent
critic finish and write ``final/pytorch_lora_weights.safetensors``, which
``StableDiffusion3Pipeline.load_lora_weights`` loads and which changes the pipeline's images."""

from __future__ import annotations

import pytest
import torch

from tdpo.cli import main

DONE_WHEN = [
    "--reward",
    "jpeg_compressibility",
    "--set",
    "prompts.train=simple_animals",
    "--set",
    "reward.panel=[]",
    "--set",
    "eval.every=0",
    "--set",
    "sample.num_steps=4",
    "--set",
    "sample.samples_per_epoch=8",
    "--set",
    "sample.batch_size=4",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.epochs=2",
]  # exactly the command: 8 samples give 2 prompts x 4 (sample.prompts_per_epoch unset)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    build_tiny_sd3_pipeline(path)
    return path


def _images(pipe):
    return pipe(
        ["a cat", "a photo of a dog"],
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images.float()


@pytest.mark.parametrize(
    "preset_args",
    [
        ["--preset", "grpo"],
        ["--preset", "tdpo-r", "--set", "critic.input=latent"],
    ],
    ids=["grpo", "tdpo-r-latent"],
)
def test_train_on_sd3_exports_a_lora_the_pipeline_loads(sd3_dir, tmp_path, preset_args, capsys):
    from diffusers import StableDiffusion3Pipeline

    args = ["train", *preset_args, "--model", str(sd3_dir), *DONE_WHEN]
    assert main([*args, "--output-dir", str(tmp_path), "--set", "run_name=run"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(sd3_dir), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    pipe.load_lora_weights(str(final))
    # reproducible to ~1e-6 on the same noise; two epochs at the default learning rate move
    # the images by about 1e-3
    assert (_images(pipe) - base).abs().max() > 1e-4, "the LoRA did not change the images"
