"""Measurements of the shapes world: base-model samples and their gold figures, tiny-CLIP
retrieval, learned-reward correlations with gold."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tdpo.algos.advantages import pearson
from tdpo.images import to_float
from tdpo.world import DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_STEPS, gold
from tdpo.world import generator as gen
from tdpo.world.rewards import GOLD_FOR, LEARNED, ClipFeatures, load_learned_reward


def load_pipeline(path: str | Path):
    from diffusers import StableDiffusionPipeline  # deferred: diffusers takes seconds to import

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = DEFAULT_ETA,
    batch: int = 256,
) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] from the pipeline, deterministic by seed."""

    def draw(chunk: list[str], g: torch.Generator) -> torch.Tensor:
        return pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            eta=eta,
            generator=g,
            output_type="pt",
        ).images

    return batched_images(prompts, seed, batch, draw)


def batched_images(
    prompts: list[str],
    seed: int,
    batch: int,
    draw: Callable[[list[str], torch.Generator], torch.Tensor],
) -> torch.Tensor:
    """``draw(chunk, generator)`` for ``prompts`` in chunks of ``batch``, each chunk's generator
    seeded by ``seed`` and the chunk's offset; the images as float in [0, 1], concatenated."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        out.append(draw(prompts[i : i + batch], g).float().clamp(0, 1))
    return torch.cat(out)


def prompt_draw(prompts: list[str], n: int, seed: int) -> list[str]:
    """``n`` prompts: every prompt in turn, then a seeded shuffle (balanced over prompts)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        block = list(prompts)
        rng.shuffle(block)
        out += block
    return out[:n]


def eval_draws(n: int, seed: int) -> list[tuple[str, list[str], int]]:
    """The base model's evaluation prompts, ``(name, n prompts, sampling seed)``: ``eval_seen``
    (the training prompts) and ``eval_unseen``."""
    draws = []
    for name, pool, s in (
        ("eval_seen", gen.seen_prompts(), seed + 202),
        ("eval_unseen", gen.unseen_prompts(), seed + 303),
    ):
        draws.append((name, prompt_draw(pool, n, s), s))
    return draws


def gold_summary(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    ev = gold.evaluate(images, prompts)
    return {k: round(float(v.mean()), 4) for k, v in ev.items()}


@torch.no_grad()
def clip_retrieval(features, n: int = 1200, seed: int = 12345) -> dict[str, float]:
    """Image -> caption top-1 accuracy over all the world's prompts, on fresh generator images."""
    prompts = gen.all_prompts()
    images, caps, _ = gen.generate(n, seed=seed, combos=gen.all_combos())
    txt = features.text_embeds(prompts)
    img = torch.cat([features.image_embeds(images[i : i + 256]) for i in range(0, n, 256)])
    pred = (img @ txt.T).argmax(1)
    index = {p: i for i, p in enumerate(prompts)}
    target = torch.tensor([index[c] for c in caps])
    unseen = {gen.make_prompt(*c) for c in gen.UNSEEN_COMBOS}
    mask = torch.tensor([c in unseen for c in caps])
    correct = (pred == target).float()
    return {
        "top1_all": round(float(correct.mean()), 4),
        "top1_unseen_combos": round(float(correct[mask].mean()), 4) if mask.any() else 0.0,
        "n_images": n,
        "n_captions": len(prompts),
    }


@torch.no_grad()
def reward_scores(
    reward, images: torch.Tensor, prompts: list[str], batch: int = 256
) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        r, _ = reward(
            images[i : i + batch], prompts[i : i + batch], [{}] * len(prompts[i : i + batch])
        )
        out.append(r.detach().float().cpu())
    return torch.cat(out)


def reward_correlations(
    rewards: dict[str, Any], sets: dict[str, tuple[torch.Tensor, list[str]]]
) -> dict[str, dict[str, float]]:
    """Pearson correlation of each learned reward with the gold metric it stands for."""
    out: dict[str, dict[str, float]] = {}
    for set_name, (images, prompts) in sets.items():
        ev = gold.evaluate(images, prompts)
        for name, reward in rewards.items():
            scores = reward_scores(reward, images, prompts)
            target = ev[GOLD_FOR[name]]
            out.setdefault(name, {})[f"pearson_{set_name}"] = round(pearson(scores, target), 4)
            out[name][f"pearson_gold_{set_name}"] = round(pearson(scores, ev["gold"]), 4)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def evaluate_world(
    weights_dir: str | Path,
    samples: dict[str, Any] | None = None,
    n: int = 256,
    seed: int = 0,
    quiet: bool = True,
    retrieval_images: int = 1200,
    hack_images: int = 64,
    hack_steps: int = 100,
    pipeline_dir: str | Path | None = None,
) -> dict[str, Any]:
    """All the world's figures for a weights directory (``pipeline/``, ``clip/``, ``rewards/``).

    ``samples`` (as cached by pre-training: ``eval_seen``, ``eval_unseen``, ``clean``, each with
    uint8 ``images`` and ``prompts``) avoids re-sampling; otherwise ``n`` base samples of seen
    and of unseen prompts are drawn with the default sampler settings. ``retrieval_images`` 0
    skips the CLIP retrieval; ``pipeline_dir`` (default ``weights_dir/pipeline``) is the base
    model whose size is reported (the flow world's pipeline lives elsewhere)."""
    root = Path(weights_dir)
    pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else root / "pipeline"
    if samples is None:
        pipe = load_pipeline(root / "pipeline")
        samples = {}
        for name, prompts, s in eval_draws(n, seed):
            samples[name] = {"images": sample(pipe, prompts, seed=s), "prompts": prompts}
        imgs, prompts, _ = gen.generate(n, seed=seed + 404)
        samples["clean"] = {"images": imgs, "prompts": prompts}

    sets = {
        "base_seen": (to_float(samples["eval_seen"]["images"]), samples["eval_seen"]["prompts"]),
        "base_unseen": (
            to_float(samples["eval_unseen"]["images"]),
            samples["eval_unseen"]["prompts"],
        ),
        "clean": (to_float(samples["clean"]["images"]), samples["clean"]["prompts"]),
    }
    report: dict[str, Any] = {
        "sampler": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "eta": DEFAULT_ETA},
        "gold": {k: dict(gold_summary(*v), n=len(v[1])) for k, v in sets.items()},
    }
    feats = ClipFeatures.from_pretrained(root / "clip")
    if retrieval_images:
        report["clip_retrieval"] = clip_retrieval(feats, n=retrieval_images)
    rewards = {}
    for name in LEARNED:
        if (root / "rewards" / f"{name}.safetensors").exists():
            rewards[name] = load_learned_reward(name, root, features=feats)
    corr = reward_correlations(rewards, sets)
    for name, r in rewards.items():
        cfg = {k: v for k, v in r.config.items() if k not in ("head_kwargs",)}
        corr[name] = {**cfg, **corr[name]}
    report["rewards"] = corr
    if hack_images:
        x, p = sets["base_seen"]
        x, p = x[:hack_images], p[:hack_images]
        report["pixel_hack"] = {
            name: pixel_hack(r, x, p, steps=hack_steps) for name, r in rewards.items()
        }
    dirs = {"pipeline": pipeline_dir, "clip": root / "clip", "rewards": root / "rewards"}
    report["sizes_bytes"] = {d: _dir_bytes(p) for d, p in dirs.items() if p.exists()}
    return report


def pixel_hack(
    reward, images: torch.Tensor, prompts: list[str], steps: int = 100, lr: float = 0.05
) -> dict[str, float]:
    """Over-optimization probe: gradient ascent on the pixels themselves (logit
    parameterization, Adam) against ``reward``, starting from ``images``. Returns the reward
    and the gold figures before and after. A learned reward that rises while gold falls is
    hackable off the base distribution, as real reward models are."""
    z = torch.logit(images.float().clamp(0.02, 0.98)).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    meta = [{} for _ in prompts]
    with torch.no_grad():
        r0 = reward(images, prompts, meta)[0].mean().item()
        g0 = gold.evaluate(images, prompts)
    for _ in range(steps):
        r, _ = reward(torch.sigmoid(z), prompts, meta)
        opt.zero_grad(set_to_none=True)
        (-r.mean()).backward()
        opt.step()
    with torch.no_grad():
        x = torch.sigmoid(z)
        r1 = reward(x, prompts, meta)[0].mean().item()
        g1 = gold.evaluate(x, prompts)
    name = getattr(reward, "name", "")
    target = GOLD_FOR.get(name, "gold")
    return {
        "reward_before": round(r0, 4),
        "reward_after": round(r1, 4),
        "target": target,
        "target_before": round(float(g0[target].mean()), 4),
        "target_after": round(float(g1[target].mean()), 4),
        "gold_before": round(float(g0["gold"].mean()), 4),
        "gold_after": round(float(g1["gold"].mean()), 4),
        "steps": steps,
        "images": len(prompts),
    }
