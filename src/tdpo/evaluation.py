"""Held-out evaluation: fixed prompts and fixed initial noise, a panel of rewards, the KL to the
base model, and diversity. Used during training (every ``eval.every`` epochs) and by ``tdpo eval``.

Metrics are keyed ``eval/<label>/<reward>``, ``eval/<label>/kl`` and ``eval/<label>/diversity``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn

from tdpo.errors import UsageError
from tdpo.policy import DiffusionPolicy, Trajectory
from tdpo.prompts import load_prompts, prompt_set_specs
from tdpo.sampling import sample_noise, score_images
from tdpo.verdict import gold_metric


def parse_prompt_sets(
    specs: list[str], per_set: int = 0, field: str = "eval.prompt_sets"
) -> dict[str, list[str]]:
    """``["seen=shapes", "unseen=shapes_unseen"]`` -> {label: prompts}: ``per_set`` prompts
    spread evenly over each set (a sorted set's first prompts would share attributes), or all."""
    out: dict[str, list[str]] = {}
    for label, source in prompt_set_specs(specs):
        if label in out:  # config.validate refuses it first
            raise UsageError(field, specs, f"the label {label!r} is used twice")
        prompts = load_prompts(source, field)
        out[label] = spread(prompts, per_set) if per_set else prompts
    return out


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items at evenly spaced positions (first included), or all if fewer."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def eval_noise_seed(base_seed: int, label: str, prompt_index: int, seed_index: int) -> int:
    """The fixed seed of one evaluation sample (same noise at every evaluation)."""
    return (
        base_seed * 1_000_003 + zlib.crc32(label.encode()) * 7919 + prompt_index * 101 + seed_index
    ) % (2**63)


def diversity(embeddings: torch.Tensor, groups: list[int]) -> float:
    """Mean pairwise cosine distance among samples of the same prompt (embeddings normalized)."""
    distances = []
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        if len(rows) < 2:
            continue
        e = embeddings[rows]
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = e @ e.T
        upper = torch.triu_indices(len(rows), len(rows), offset=1)
        distances.append((1 - sim[upper[0], upper[1]]).mean())
    return float(torch.stack(distances).mean()) if distances else float("nan")


@torch.no_grad()
def evaluate_policy(
    policy: DiffusionPolicy,
    unet: nn.Module,
    prompt_sets: dict[str, list[str]],
    rewards: dict[str, Callable],
    seeds_per_prompt: int,
    base_seed: int,
    batch_size: int,
    embedder: nn.Module | None = None,
    with_kl: bool = True,
    fields: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, list[str]]]]:
    """Sample every (prompt, seed) of every set with fixed noise and score it.

    Returns (metrics, {label: (images, captions)}). ``eval/<label>/kl`` is the mean over samples
    and steps of ``log pi_theta - log pi_base`` on the sampled steps (a Monte-Carlo estimate of
    the per-step KL to the base model, per latent dimension); diversity uses ``embedder`` if given,
    else flattened pixels.
    """
    metrics: dict[str, float] = {}
    grids: dict[str, tuple[torch.Tensor, list[str]]] = {}
    shape = policy.noise_shape
    was_training = unet.training
    unet.eval()
    for label, prompts in prompt_sets.items():
        items = [(p_i, s_i) for p_i in range(len(prompts)) for s_i in range(seeds_per_prompt)]
        trajs: list[Trajectory] = []
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            noise = sample_noise([eval_noise_seed(base_seed, label, p, s) for p, s in chunk], shape)
            trajs.append(
                policy.sample(unet, [prompts[p] for p, _ in chunk], noise, with_reference=with_kl)
            )
        traj = Trajectory.cat(trajs)
        scores = score_images(rewards, traj.images, traj.prompts, fields)
        for name, values in scores.items():
            metrics[f"eval/{label}/{name}"] = float(values.double().mean())
        if with_kl and traj.ref_log_probs is not None:
            metrics[f"eval/{label}/kl"] = float((traj.log_probs - traj.ref_log_probs).mean())
        feats = embedder(traj.images).float() if embedder is not None else traj.images.flatten(1)
        metrics[f"eval/{label}/diversity"] = diversity(feats.cpu(), [p for p, _ in items])
        # Captions: the prompt, the first reward (the training reward in training) and gold.
        shown = [n for n in (next(iter(scores), None), gold_metric(scores)) if n is not None]
        captions = [
            "\n".join([prompt] + [f"{n} = {scores[n][i]:.3f}" for n in dict.fromkeys(shown)])
            for i, prompt in enumerate(traj.prompts)
        ]
        grids[label] = (traj.images.cpu(), captions)
    unet.train(was_training)
    return metrics, grids
