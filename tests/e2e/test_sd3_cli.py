"""Issue 12's done-when check for Stable Diffusion 3, in-process through ``tdpo train``: on a tiny
``StableDiffusion3Pipeline`` folder built from configs (no T5), GRPO and TDPO-R with the latent
critic finish and write ``final/pytorch_lora_weights.safetensors``, which
``StableDiffusion3Pipeline.load_lora_weights`` loads and which changes the pipeline's images."""

from __future__ import annotations

import pytest
import torch

from tdpo.cli import main
from tests.fixtures.factories import SD3_ISSUE_SETTINGS, as_set_args, diffusers_sd3_pipeline

# exactly the issue's command: 8 samples give 2 prompts x 4 (sample.prompts_per_epoch unset)
DONE_WHEN = [
    "--reward",
    "jpeg_compressibility",
    *as_set_args({**SD3_ISSUE_SETTINGS, "eval.every": 0, "train.epochs": 2}),
]


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
def test_train_on_sd3_exports_a_lora_the_pipeline_loads(
    tiny_sd3_dir, tmp_path, preset_args, capsys
):
    args = ["train", *preset_args, "--model", str(tiny_sd3_dir), *DONE_WHEN]
    assert main([*args, "--output-dir", str(tmp_path), "--set", "run_name=run"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = diffusers_sd3_pipeline(tiny_sd3_dir)
    base = _images(pipe)
    pipe.load_lora_weights(str(final))
    # reproducible to ~1e-6 on the same noise; two epochs at the default learning rate move
    # the images by about 1e-3
    assert (_images(pipe) - base).abs().max() > 1e-4, "the LoRA did not change the images"
