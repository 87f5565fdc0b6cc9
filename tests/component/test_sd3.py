"""Stable Diffusion 3: a tiny ``StableDiffusion3Pipeline`` built from configs (two CLIP text
encoders, no T5, an SD3 transformer, a 16-channel VAE, the flow-matching Euler scheduler) sampled
with the SDE policy, re-evaluated, trained and exported."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.fixtures.factories import (
    diffusers_sd3_pipeline,
    perturb_lora,
    policy_noise,
    tiny_policy,
)
from tests.fixtures.policy_checks import (
    assert_pipeline_reproduces_lora,
    replay_log_prob,
    train_and_export_lora,
    trainable_snapshot,
)

PROMPTS = ["a red cat", "a photo of a dog"]


def _pipe_images(pipe, noise, steps=4, guidance=3.0):
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise[:, 0],
        output_type="pt",
    ).images.float()


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_noise_level_zero_samples_what_the_pipeline_samples(tiny_sd3_dir, guidance):
    """Noise level 0 is the pipeline's Euler ODE: from the same initial latents our loop equals
    ``StableDiffusion3Pipeline.__call__`` (text encoding without T5, CFG on the velocity)."""
    from tdpo.flow import FlowPolicy

    policy = tiny_policy(
        tiny_sd3_dir, 4, guidance, noise_level=0.0
    )  # a config refuses 0: no policy
    assert isinstance(policy, FlowPolicy) and policy.text_encoder_3 is None
    assert policy.use_cfg == (guidance > 1)
    noise = policy_noise(policy, 2, seed=3)
    traj = policy.sample(policy.unet, PROMPTS, noise, keep_x0=True)
    assert traj.prompt_embeds.shape == (2, 16 + 256, 32)  # CLIP states, then T5's zeros
    assert traj.pooled_embeds.shape == (2, 32) and traj.log_probs.abs().max() == 0
    pipe = diffusers_sd3_pipeline(tiny_sd3_dir)
    latents = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance,
        latents=noise[:, 0],
        output_type="latent",
    ).images
    torch.testing.assert_close(traj.latents[:, -1], latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        traj.images, _pipe_images(pipe, noise, guidance=guidance), atol=2e-5, rtol=0
    )
    # the last step's x0 estimate x - s v is (s' = 0) the final latent
    torch.testing.assert_close(traj.x0_preds[:, -1], traj.latents[:, -1], atol=1e-5, rtol=0)


def test_cfg_velocity_is_the_guided_mix(tiny_sd3_dir):
    """v = v_uncond + w (v_cond - v_uncond), the unconditional half from the empty prompt."""
    policy = tiny_policy(tiny_sd3_dir, 4, 5.0)
    embeds, pooled = policy.encode_prompts(PROMPTS)
    negative, negative_pooled = policy.negative_embeds(2)
    x = torch.randn(2, *policy.noise_shape[1:], generator=torch.Generator().manual_seed(0))
    t = policy.schedule()[0][1]
    with torch.no_grad():
        guided = policy.predict_velocity(
            policy.unet, x, t, embeds, negative, 5.0, pooled, negative_pooled
        )
        cond = policy.predict_velocity(policy.unet, x, t, embeds, None, 1.0, pooled)
        uncond = policy.predict_velocity(policy.unet, x, t, negative, None, 1.0, negative_pooled)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4  # the prompt matters: the check could fail


def test_reevaluated_log_prob_has_ratio_one(tiny_sd3_dir):
    policy = tiny_policy(tiny_sd3_dir, 3, 4.0)
    assert policy.noise_level == 0.7
    perturb_lora(policy)
    traj = policy.sample(policy.unet, PROMPTS, policy_noise(policy, 2), with_reference=True)
    assert traj.log_probs.abs().min() > 0
    assert (traj.log_probs - traj.ref_log_probs).abs().max() > 1e-4  # the LoRA moved the policy
    for k in range(3):
        log_prob = replay_log_prob(policy, policy.unet, traj, k)
        torch.testing.assert_close(log_prob, traj.log_probs[:, k], atol=1e-4, rtol=0)
        with torch.no_grad(), policy.reference_mode(policy.unet) as base:
            ref = replay_log_prob(policy, base, traj, k)
        torch.testing.assert_close(ref, traj.ref_log_probs[:, k], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not all in the schedule"):
        policy.step_log_prob(
            policy.unet,
            traj.latents[:, 0],
            traj.latents[:, 1],
            traj.timesteps[:, 0] - 5.0,
            traj.prompt_embeds,
            None,
            traj.pooled_embeds,
        )


def test_tdpo_r_epoch_trains_and_exports_a_loadable_lora(tiny_sd3_dir, make_trainer):
    """TDPO-R with the paper's image critic; the exported LoRA, loaded by
    ``StableDiffusion3Pipeline.load_lora_weights``, reproduces the policy's images."""
    trainer = make_trainer(
        pipeline_dir=tiny_sd3_dir, **{"train.epochs": 1, "train.learning_rate": 1e-2}
    )
    names = list(trainable_snapshot(trainer.unet))
    assert any(".to_q." in n for n in names) and any(".to_out.0." in n for n in names)
    assert not any("add_q_proj" in n for n in names)  # the attention projections asked for
    final = train_and_export_lora(trainer)
    policy = trainer.policy
    policy.sample_cfg = dataclasses.replace(policy.sample_cfg, noise_level=0.0)
    pipe = diffusers_sd3_pipeline(tiny_sd3_dir)
    assert_pipeline_reproduces_lora(policy, trainer.unet, pipe, final, PROMPTS, atol=2e-5)


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("ddpo-2", {}),
        ("grpo", {"sample.prompts_per_epoch": 2}),
        ("tdpo", {"critic.input": "x0", "critic.prompt_input": True}),
    ],
)
def test_methods_run_an_epoch_on_sd3(tiny_sd3_dir, make_trainer, preset, extra):
    trainer = make_trainer(preset, pipeline_dir=tiny_sd3_dir, **{"train.epochs": 1, **extra})
    before = trainable_snapshot(trainer.unet)
    metrics = trainer.epoch_step(0)
    assert torch.isfinite(torch.tensor(metrics["policy_loss"]))
    after = dict(trainer.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    if preset == "grpo":
        assert metrics["kl_loss"] >= 0


def test_alignprop_raises_a_differentiable_reward_on_sd3(tiny_sd3_dir, make_trainer):
    from tdpo.methods.alignprop import sample_with_grad
    from tdpo.sampling import sample_noise

    tr = make_trainer(
        "alignprop",
        pipeline_dir=tiny_sd3_dir,
        **{
            "reward.name": "tests.rewards_for_tests:brightness",
            "sample.samples_per_epoch": 4,
            "train.learning_rate": 3e-3,
            "train.alignprop_steps": 2,
        },
    )
    noise = sample_noise(list(range(4)), tr.policy.noise_shape)
    prompts = ["a red cat", "a blue dog", "a photo of a fish", "a cat"]

    def brightness():
        with torch.no_grad():
            return sample_with_grad(tr.policy, tr.unet, prompts, noise, 1).mean().item()

    before = brightness()
    tr.epoch_step(0)
    assert brightness() > before
