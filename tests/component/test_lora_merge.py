"""``sample.merge_lora``: sampling passes with LoRA folded into merged copies of the weights give
the unmerged trajectories up to float rounding, and leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from tdpo.config import build_config
from tdpo.policy import DiffusionPolicy
from tdpo.sampling import sample_noise


def _policy(pipeline_dir, **overrides):
    cfg = build_config(
        overrides={"model.pretrained": str(pipeline_dir), "sample.num_steps": 4, **overrides}
    )
    policy = DiffusionPolicy.from_config(cfg.model, cfg.sample)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: move the adapted model away from the base
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy


def _state(policy):
    return {n: t.detach().clone() for n, t in policy.unet.state_dict().items()}


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_merged_sampling_matches_unmerged_and_restores_the_weights(tiny_pipeline_dir, guidance):
    policy = _policy(tiny_pipeline_dir, **{"sample.guidance_scale": guidance})
    prompts = ["a red circle", "a blue square"]
    noise = sample_noise([3, 4], (5, *policy.noise_shape[1:]))
    before = _state(policy)
    trainable = [n for n, p in policy.unet.named_parameters() if p.requires_grad]

    policy.sample_cfg.merge_lora = False
    plain = policy.sample(policy.unet, prompts, noise)
    policy.sample_cfg.merge_lora = True
    merged = policy.sample(policy.unet, prompts, noise)

    # the adapted model's trajectory, up to float32 rounding of W + s B A
    torch.testing.assert_close(merged.latents, plain.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.log_probs, plain.log_probs, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(merged.images, plain.images, atol=1e-4, rtol=1e-4)
    # the LoRA actually changes the samples, so merging was not a no-op that matched by luck
    policy.sample_cfg.merge_lora = False
    with policy.reference_mode(policy.unet) as ref_unet:
        reference = policy.sample(ref_unet, prompts, noise)
    assert (reference.latents - plain.latents).abs().max() > 1e-3

    # every weight is bit-identical afterwards, adapters on, LoRA trainable again
    after = _state(policy)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert [n for n, p in policy.unet.named_parameters() if p.requires_grad] == trainable
    again = policy.sample(policy.unet, prompts, noise)
    assert torch.equal(again.latents, plain.latents)


def test_with_reference_sampling_does_not_merge(tiny_pipeline_dir):
    policy = _policy(tiny_pipeline_dir)
    prompts = ["a red circle", "a blue square"]
    noise = sample_noise([1, 2], (5, *policy.noise_shape[1:]))
    policy.sample_cfg.merge_lora = False
    plain = policy.sample(policy.unet, prompts, noise, with_reference=True)
    policy.sample_cfg.merge_lora = True
    merged = policy.sample(policy.unet, prompts, noise, with_reference=True)
    assert torch.equal(merged.latents, plain.latents)
    assert torch.equal(merged.ref_log_probs, plain.ref_log_probs)
    assert not torch.equal(plain.ref_log_probs, plain.log_probs)


def test_full_fine_tuning_is_untouched(tiny_pipeline_dir):
    policy = _policy(tiny_pipeline_dir, **{"model.finetune": "full"})
    before = _state(policy)
    with policy.lora_merged(policy.unet):
        inside = _state(policy)
    assert all(torch.equal(inside[n], before[n]) for n in before)
