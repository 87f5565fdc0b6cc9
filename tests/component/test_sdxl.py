"""SDXL: a tiny ``StableDiffusionXLPipeline`` built from configs (two text encoders, pooled
embeddings and time ids as added conditions) sampled, trained with TDPO-R and exported."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tdpo.errors import UsageError
from tdpo.policy import load_pipeline
from tests.fixtures.factories import perturb_lora, policy_noise, tiny_policy
from tests.fixtures.policy_checks import (
    assert_pipeline_reproduces_lora,
    replay_log_prob,
    train_and_export_lora,
)

PROMPTS = ["a red cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny_sdxl") / "pipeline"
    build_tiny_sdxl_pipeline(path)
    return path


def _pipe_images(pipe, noise, steps=4, guidance=3.0):
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=0.0,
        latents=noise[:, 0],
        output_type="pt",
    ).images.float()


def test_sdxl_policy_samples_what_the_pipeline_samples(sdxl_dir):
    policy = tiny_policy(sdxl_dir, 4, 3.0, eta=0.0)  # eta 0: a config refuses it, the test needs it
    assert policy.is_sdxl and type(policy.pipe).__name__ == "StableDiffusionXLPipeline"
    noise = policy_noise(policy, 2, seed=3)
    traj = policy.sample(policy.unet, PROMPTS, noise)
    assert traj.prompt_embeds.shape == (2, 16, 32)  # both encoders' states, concatenated
    assert traj.pooled_embeds.shape == (2, 16) and traj.negative_pooled.abs().sum() == 0
    # Deterministic DDIM from the same x_T: our loop equals StableDiffusionXLPipeline.__call__
    # (same text encoding, zeroed negatives, time ids, guidance); LoRA is still zero here.
    torch.testing.assert_close(
        _pipe_images(load_pipeline(str(sdxl_dir)), noise), traj.images, atol=2e-4, rtol=0
    )
    # The added conditions matter: without the pooled embedding the prediction changes.
    t = policy.scheduler.timesteps[0]
    with torch.no_grad():
        with_pooled, zero_pooled = (
            policy.predict_noise(
                policy.unet, traj.latents[:, 0], t, traj.prompt_embeds, None, 1.0, p
            )
            for p in (traj.pooled_embeds, torch.zeros_like(traj.pooled_embeds))
        )
    assert (with_pooled - zero_pooled).abs().max() > 1e-4


def test_sdxl_reevaluated_log_prob_has_ratio_one(sdxl_dir):
    policy = tiny_policy(sdxl_dir, 3, 4.0)
    perturb_lora(policy)
    traj = policy.sample(policy.unet, PROMPTS, policy_noise(policy, 2))
    for k in range(3):
        log_prob = replay_log_prob(policy, policy.unet, traj, k)
        torch.testing.assert_close(log_prob, traj.log_probs[:, k], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pooled"):
        policy.step_log_prob(
            policy.unet,
            traj.latents[:, 0],
            traj.latents[:, 1],
            traj.timesteps[:, 0],
            traj.prompt_embeds,
            None,
        )


def test_sdxl_tdpo_r_epoch_trains_and_exports_a_loadable_lora(sdxl_dir, make_trainer):
    trainer = make_trainer(
        pipeline_dir=sdxl_dir, **{"train.epochs": 1, "train.learning_rate": 1e-2}
    )
    final = train_and_export_lora(trainer)
    policy = trainer.policy
    policy.sample_cfg = dataclasses.replace(policy.sample_cfg, eta=0.0)
    pipe = load_pipeline(str(sdxl_dir))
    assert_pipeline_reproduces_lora(policy, trainer.unet, pipe, final, PROMPTS, atol=2e-4, eta=0.0)


def test_other_pipeline_classes_are_a_usage_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(UsageError, match="is a KandinskyPipeline; tdpo fine-tunes"):
        load_pipeline(str(tmp_path))
