"""AlignProp baseline (Prabhudesai et al., 2023): backpropagate a differentiable reward through the
last K sampling steps into the LoRA weights (truncated backpropagation, gradient checkpointing).

Each sampling batch is one forward (DDIM with the same per-sample noise as the RL trainers, no
gradient for the first T-K steps), one decode, the reward, and ``loss = -mean(reward)``; the
optimizer steps every ``schedule.accumulation`` batches.
"""

from __future__ import annotations

import time

import torch

from tdpo.algos.ddim import ddim_step_logprob
from tdpo.trainers.update import optimizer_step


def sample_with_grad(
    policy, unet, prompts: list[str], noise: torch.Tensor, grad_steps: int
) -> torch.Tensor:
    """DDIM sampling whose last ``grad_steps`` steps keep the graph; returns images in [0, 1]."""
    cfg = policy.sample_cfg
    policy.scheduler.set_timesteps(cfg.num_steps, device=policy.device)
    timesteps = policy.scheduler.timesteps
    prompt_embeds, pooled = policy.encode_prompts(prompts)
    negative, negative_pooled = (
        policy.negative_embeds(len(prompts)) if policy.use_cfg else (None, None)
    )
    noise = noise.to(policy.device, torch.float32)
    latents = noise[:, 0] * policy.scheduler.init_noise_sigma
    first_grad = len(timesteps) - grad_steps
    for k, t in enumerate(timesteps):
        with torch.set_grad_enabled(k >= first_grad):
            pred = policy.predict_noise(
                unet,
                latents,
                t,
                prompt_embeds,
                negative,
                cfg.guidance_scale,
                pooled,
                negative_pooled,
            )
            step = ddim_step_logprob(
                policy.scheduler, pred, t, latents, cfg.eta, prev_sample=latents.detach()
            )
            latents = step.mean + step.std * noise[:, k + 1]  # differentiable in mu_theta
    return policy.decode(latents)


def alignprop_epoch(trainer, epoch: int) -> dict[str, float]:
    """One AlignProp epoch: ``samples_per_epoch`` images, ``updates_per_epoch`` optimizer steps."""
    from tdpo.trainers.loop import check_reward_output, derive_seed, sample_noise

    cfg, sch, acc = trainer.config, trainer.schedule, trainer.accelerator
    start = time.perf_counter()
    global_prompts = trainer.draw_prompts()
    first = acc.process_index * sch.samples_per_process
    unet_cfg = trainer.policy.unet.config
    shape = (
        cfg.sample.num_steps + 1,
        unet_cfg.in_channels,
        unet_cfg.sample_size,
        unet_cfg.sample_size,
    )
    params = [p for p in trainer.unet.parameters() if p.requires_grad]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    rewards_all, images_all, norms = [], [], []
    trainer.unet.train()
    bs = cfg.sample.batch_size
    with trainer._progress(sch.sample_batches, f"epoch {epoch} alignprop") as bar:
        for b in range(sch.sample_batches):
            lo = first + b * bs
            prompts = global_prompts[lo : lo + bs]
            noise = sample_noise(
                [derive_seed(cfg.seed, 2, epoch, i) for i in range(lo, lo + bs)], shape
            )
            is_update = (b + 1) % sch.accumulation == 0
            sync = acc.no_sync(trainer.unet) if not is_update else _null()
            with sync, acc.autocast():
                images = sample_with_grad(
                    trainer.policy, trainer.unet, prompts, noise, cfg.train.alignprop_steps
                )
                raw, _ = trainer.reward_fn(images, prompts, [{} for _ in prompts])
                if not isinstance(raw, torch.Tensor) or not raw.requires_grad:
                    from tdpo.errors import UsageError

                    raise UsageError(
                        "reward.name",
                        cfg.reward.name,
                        "AlignProp needs a reward "
                        "differentiable in the images; choose another reward or method",
                    )
                check_reward_output(cfg.reward.name, raw, len(prompts))
                loss = -raw.float().mean()
                acc.backward(loss / sch.accumulation)
            if is_update:
                norms.append(
                    optimizer_step(
                        optimizer, [(params, cfg.train.max_grad_norm)], getattr(acc, "scaler", None)
                    )[0]
                )
            rewards_all.append(raw.detach().float())
            images_all.append(images.detach())
            bar.update(1)
            trainer._check_signal()
    rewards = torch.cat(rewards_all)
    images = torch.cat(images_all)
    prompts_local = global_prompts[first : first + sch.samples_per_process]
    panel = {}
    with torch.no_grad():
        for name, fn in trainer.panel.items():
            values = check_reward_output(
                name, fn(images, prompts_local, [{}] * len(images))[0], len(images)
            )
            panel[f"panel/{name}"] = float(trainer._gather(values.to(trainer.device)).mean())
    all_rewards = trainer._gather(rewards)
    trainer.global_step += sch.updates_per_epoch
    trainer.reward_queries += cfg.sample.samples_per_epoch
    if trainer.is_main and cfg.log.grid_every and (epoch + 1) % cfg.log.grid_every == 0:
        from tdpo.policy import Trajectory

        trainer._save_grid(
            epoch + 1, Trajectory(None, None, None, None, None, images, prompts_local), rewards
        )
    return {
        "epoch": epoch + 1,
        "reward_queries": trainer.reward_queries,
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std(unbiased=False)),
        **panel,
        "policy_loss": float(-all_rewards.mean()),
        "policy_grad_norm": sum(norms) / max(1, len(norms)),
        "seconds": time.perf_counter() - start,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
