"""GRPO: one class in tdpo.methods.ppo and one registry line; group-relative advantages, a KL loss
to the base model, no critic."""

from __future__ import annotations

import torch

from tdpo.config import build_config, method_label
from tdpo.methods import REGISTRY, get_method
from tdpo.methods.ppo import GRPO, EpochBatch

GRPO_TINY = {"sample.prompts_per_epoch": 2}


def test_grpo_is_registered_and_labelled():
    assert REGISTRY["grpo"] == "tdpo.methods.ppo:GRPO" and get_method("grpo") is GRPO
    assert method_label(build_config("grpo")) == "GRPO"
    config = build_config("grpo")
    assert config.train.normalization == "group" and config.kl.loss_coef == 0.04


def test_grpo_epoch_trains_the_policy_with_a_kl_loss(make_trainer):
    tr = make_trainer("grpo", **GRPO_TINY)
    assert isinstance(tr.method, GRPO) and tr.method.critic is None
    before = {n: p.detach().clone() for n, p in tr.unet.named_parameters() if p.requires_grad}
    metrics = tr.epoch_step(0)
    assert metrics["kl_loss"] >= 0.0 and "critic_loss" not in metrics
    after = dict(tr.unet.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())


def test_kl_to_base_is_zero_at_the_base_weights_and_grows_after_an_update(make_trainer):
    tr = make_trainer("grpo", **GRPO_TINY)
    traj, _ = tr.method.sample(0)
    batch = EpochBatch.from_trajectory(traj, advantages=torch.zeros_like(traj.log_probs))
    rows, k = torch.arange(4), torch.zeros(4, dtype=torch.long)
    t = batch.timesteps[rows, k]
    use_cfg = batch.negative_embeds is not None

    def kl():
        log_prob = tr.policy.step_log_prob(
            tr.unet,
            batch.latents[rows, k],
            batch.latents[rows, k + 1],
            t,
            batch.prompt_embeds[rows],
            batch.negative_embeds[rows] if use_cfg else None,
        )
        return float(tr.method.kl_to_base(tr.unet, batch, rows, k, use_cfg, log_prob).detach())

    assert abs(kl()) < 1e-6  # LoRA starts as the identity (B = 0): the policy is the base
    with torch.no_grad():
        for name, p in tr.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    assert kl() > 1e-6
