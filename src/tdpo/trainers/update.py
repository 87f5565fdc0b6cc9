"""The inner update loop of TDPO and DDPO (algorithm.md, step 6).

One function serves both: TDPO loops over timestep *slices* (outer) and minibatches (inner) and
trains the critic alongside; DDPO loops over minibatches (outer) and accumulates over all
timesteps (inner). Optimizer steps happen every ``schedule.accumulation`` minibatch passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from tdpo.algos.losses import clipped_value_loss, ppo_clip_loss


@dataclass
class EpochBatch:
    """Everything the update needs from one epoch of local samples (N samples, T steps)."""

    latents: torch.Tensor  # [N, T+1, C, h, w]
    old_log_probs: torch.Tensor  # [N, T]
    timesteps: torch.Tensor  # [N, T]
    prompt_embeds: torch.Tensor  # [N, L, D]
    negative_embeds: torch.Tensor | None  # [N, L, D]
    advantages: torch.Tensor  # [N, T]
    returns: torch.Tensor | None = None  # [N, T] G_k (critic target; tdpo)
    old_values: torch.Tensor | None = None  # [N, T] V_old(k) (tdpo)
    state_embeddings: torch.Tensor | None = None  # [N, T, d] (tdpo)
    pooled_embeds: torch.Tensor | None = None  # [N, P] SDXL's pooled text embeddings
    negative_pooled: torch.Tensor | None = None  # [N, P]


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    clip_groups: list[tuple[list[nn.Parameter], float]],
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """Unscale once, clip each model's gradient norm separately, step, zero.

    One optimizer holds both models (two parameter groups), so under fp16 the gradient scaler
    unscales every gradient exactly once. (The reference code's two optimizers shared one scaler:
    after the first optimizer's step and scaler update, unscaling again divided the critic's
    gradients by the loss scale a second time, and the critic barely learned.)
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norms = [
        float(torch.nn.utils.clip_grad_norm_(params, max_norm)) for params, max_norm in clip_groups
    ]
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient is inf/nan
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def run_updates(
    *,
    accelerator,
    policy,
    unet: nn.Module,
    critic: nn.Module | None,
    optimizer,
    batch: EpochBatch,
    algorithm: str,
    schedule,
    train_cfg,
    critic_cfg,
    generator: torch.Generator,
    use_cfg: bool,
    progress=None,
) -> dict[str, float]:
    """One inner epoch of PPO-clip updates; returns mean losses and statistics."""
    n, T = batch.old_log_probs.shape
    device = batch.latents.device
    mb_size = train_cfg.batch_size
    # Shuffle samples, and timesteps independently per sample.
    sample_perm = torch.randperm(n, generator=generator).to(device)
    time_perm = torch.argsort(torch.rand(n, T, generator=generator), dim=1).to(device)

    def minibatch(j: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sample_perm[m * mb_size : (m + 1) * mb_size]
        return rows, time_perm[rows, j]

    if algorithm == "tdpo":  # slice-major: every update stays inside one timestep slice
        order = [(j, m) for j in range(T) for m in range(schedule.minibatches)]
    else:  # ddpo: sample-major, accumulating over all timesteps
        order = [(j, m) for m in range(schedule.minibatches) for j in range(T)]

    policy_params = [p for p in unet.parameters() if p.requires_grad]
    clip_groups = [(policy_params, train_cfg.max_grad_norm)]
    if critic is not None:
        clip_groups.append((list(critic.parameters()), train_cfg.max_grad_norm))
        critic.train()
    sums: dict[str, torch.Tensor | float] = {}  # on-device sums: no host sync per pass
    count = 0
    for step_index, (j, m) in enumerate(order):
        rows, k = minibatch(j, m)
        is_update = (step_index + 1) % schedule.accumulation == 0
        sync = contextlib.ExitStack()
        if not is_update:
            sync.enter_context(accelerator.no_sync(unet))
            if critic is not None:
                sync.enter_context(accelerator.no_sync(critic))
        with sync, accelerator.autocast():
            t = batch.timesteps[rows, k]
            guided = use_cfg and batch.negative_embeds is not None
            log_prob = policy.step_log_prob(
                unet,
                batch.latents[rows, k],
                batch.latents[rows, k + 1],
                t,
                batch.prompt_embeds[rows],
                batch.negative_embeds[rows] if guided else None,
                _rows(batch.pooled_embeds, rows),
                _rows(batch.negative_pooled, rows) if guided else None,
            )
            # L_pi = mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))), rho = pi_theta / pi_old
            policy_loss, info = ppo_clip_loss(
                log_prob,
                batch.old_log_probs[rows, k],
                batch.advantages[rows, k],
                train_cfg.clip_range,
            )
            loss = policy_loss
            if critic is not None:
                values = critic(batch.state_embeddings[rows, k], t)
                # L_V = 0.5 mean(max((V-G)^2, (clip(V, V_old +- c) - G)^2))
                value_loss = clipped_value_loss(
                    values, batch.old_values[rows, k], batch.returns[rows, k], critic_cfg.value_clip
                )
                loss = loss + critic_cfg.value_coef * value_loss
                sums["critic_loss"] = sums.get("critic_loss", 0.0) + value_loss.detach()
            if loss.requires_grad:  # all-deterministic steps (sigma=0) carry no gradient
                accelerator.backward(loss / schedule.accumulation)
        if is_update:
            norms = optimizer_step(
                getattr(optimizer, "optimizer", optimizer),
                clip_groups,
                getattr(accelerator, "scaler", None),
            )
            sums["policy_grad_norm"] = sums.get("policy_grad_norm", 0.0) + norms[0]
        sums["policy_loss"] = sums.get("policy_loss", 0.0) + policy_loss.detach()
        for key in ("approx_kl", "clipfrac"):
            sums[key] = sums.get(key, 0.0) + info[key].detach()
        count += 1
        if progress is not None:
            progress.update(1)
    out = {key: float(value) / count for key, value in sums.items()}
    out["policy_grad_norm"] = sums.get("policy_grad_norm", 0.0) / max(1, schedule.updates_per_epoch)
    # Statistics are averaged over processes (each process saw its own minibatches).
    keys = sorted(out)
    values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def _rows(tensor: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]
