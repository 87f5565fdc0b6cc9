"""AlignProp (Prabhudesai et al., 2023): backpropagate a differentiable reward through the last K
sampling steps into the LoRA weights (truncated backpropagation, gradient checkpointing).

Each sampling batch is one forward (the policy's sampler with the same per-sample noise as the RL methods, no
gradient for the first T-K steps), one decode, the reward, and ``loss = -mean(reward)``; the
optimizer steps every ``schedule.accumulation`` batches.
"""

from __future__ import annotations

import contextlib

import torch

from tdpo.errors import UsageError
from tdpo.methods.base import Method, optimizer_step, unwrap_optimizer
from tdpo.sampling import check_reward_result, derive_seed, sample_noise


def sample_with_grad(
    policy, unet, prompts: list[str], noise: torch.Tensor, grad_steps: int
) -> torch.Tensor:
    """Sampling whose last ``grad_steps`` steps keep the graph; returns images in [0, 1]. The
    policy's own sampler (DDIM, or the flow SDE for SD3) with the same per-sample noise."""
    return policy.sample_with_grad(unet, prompts, noise, grad_steps)


class AlignProp(Method):
    """``samples_per_epoch`` images and ``updates_per_epoch`` optimizer steps per epoch."""

    name = "alignprop"

    @classmethod
    def label(cls, config) -> str:
        return "AlignProp"

    @classmethod
    def plan_updates(cls, config, samples_per_process: int, minibatches: int):
        """One backward pass per sampling batch; inner epochs do not apply."""
        batches = samples_per_process // config.sample.batch_size
        updates = config.train.updates_per_epoch or batches
        if batches % updates:
            raise UsageError(
                "train.updates_per_epoch",
                updates,
                f"alignprop: must divide the {batches} sampling batches per process",
            )
        T = config.sample.num_steps
        if not 1 <= config.train.alignprop_steps <= T:
            raise UsageError(
                "train.alignprop_steps",
                config.train.alignprop_steps,
                f"must be in [1, sample.num_steps={T}]",
            )
        return updates, batches // updates, 1

    def __init__(self, trainer):
        super().__init__(trainer)
        if trainer.config.train.gradient_checkpointing:
            trainer.policy.unet.enable_gradient_checkpointing()

    def run_epoch(self, epoch: int) -> dict[str, float]:
        tr = self.trainer
        cfg, sch, acc = tr.config, tr.schedule, tr.accelerator
        global_prompts = tr.draw_prompts()
        first = tr.first_sample
        shape = tr.policy.noise_shape
        params = [p for p in tr.unet.parameters() if p.requires_grad]
        rewards_all, images_all, norms = [], [], []
        tr.unet.train()
        bs = cfg.sample.batch_size
        with tr.progress(
            sch.sample_batches, f"epoch {epoch + 1}/{cfg.train.epochs} alignprop"
        ) as bar:
            for b in range(sch.sample_batches):
                lo = first + b * bs
                prompts = global_prompts[lo : lo + bs]
                noise = sample_noise(
                    [derive_seed(cfg.seed, 2, epoch, i) for i in range(lo, lo + bs)], shape
                )
                is_update = (b + 1) % sch.accumulation == 0
                sync = contextlib.nullcontext() if is_update else acc.no_sync(tr.unet)
                with sync, acc.autocast():
                    images = sample_with_grad(
                        tr.policy, tr.unet, prompts, noise, cfg.train.alignprop_steps
                    )
                    result = tr.reward_fn(images, prompts, [{} for _ in prompts])
                    check_reward_result(cfg.reward.name, result, len(prompts))  # (rewards, info)
                    raw = result[0]
                    if not raw.requires_grad:
                        raise UsageError(
                            "reward.name",
                            cfg.reward.name,
                            "AlignProp needs a reward "
                            "differentiable in the images; choose another reward or method",
                        )
                    loss = -raw.float().mean()
                    acc.backward(loss / sch.accumulation)
                if is_update:
                    clip = [(params, cfg.train.max_grad_norm)]
                    scaler = getattr(acc, "scaler", None)
                    norms.append(optimizer_step(unwrap_optimizer(tr.optimizer), clip, scaler)[0])
                rewards_all.append(raw.detach().float())
                images_all.append(images.detach())
                bar.update(1)
                tr.check_signal()
        rewards = torch.cat(rewards_all)
        images = torch.cat(images_all)
        prompts_local = global_prompts[first : first + sch.samples_per_process]
        panel = tr.score_panel(images, prompts_local)
        all_rewards = tr.gather(rewards)
        tr.save_grid(epoch + 1, images, prompts_local, rewards)
        return {
            "reward_mean": float(all_rewards.double().mean()),  # float64: no overflow near 1e37
            "reward_std": float(all_rewards.double().std(unbiased=False)),
            **panel,
            "policy_loss": float(-all_rewards.mean()),
            "policy_grad_norm": sum(norms) / max(1, len(norms)),
        }
