"""What every sampler of the project shares: per-sample seeds and noise, reward-output checks,
and sampling a diffusers pipeline over prompts x seeds.

Below the trainers, the methods, evaluation, ``tdpo sample`` / ``tdpo eval`` and the benchmarks:
this module imports nothing of theirs.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tdpo.errors import UsageError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, runs and Python versions)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sample noise [B, *shape], each row from its own seed: the same sample gets the same
    noise whatever the batch size or number of processes."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def check_reward_result(name: str, result: Any, batch: int, field: str = "reward.name"):
    """The reward protocol's output ``(rewards [B], info)``: the rewards, checked by
    :func:`check_reward_output`; UsageError naming ``field`` for anything else."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        got = (
            f"a tensor of shape {tuple(result.shape)}"
            if isinstance(result, torch.Tensor)
            else f"a {type(result).__name__}"
            + (f" of {len(result)} items" if isinstance(result, tuple | list) else "")
        )
        raise UsageError(
            field,
            name,
            f"the reward returned {got}; return a pair (rewards, info): rewards a tensor [B], "
            "info a dict (may be empty)",
        )
    return check_reward_output(name, result[0], batch, field)


def check_reward_output(
    name: str, rewards: Any, batch: int, field: str = "reward.name"
) -> torch.Tensor:
    """The reward protocol's first output: a tensor of one value per image, detached, float."""
    if not isinstance(rewards, torch.Tensor):
        raise UsageError(
            field,
            name,
            f"the reward returned {type(rewards).__name__}, "
            "not a tensor; return (rewards [B] tensor, info dict)",
        )
    if rewards.shape != (batch,):
        raise UsageError(
            field,
            name,
            f"the reward returned shape {tuple(rewards.shape)} "
            f"for {batch} images; return one value per image, shape [{batch}]",
        )
    return rewards.detach().float()


@torch.no_grad()
def score_images(
    rewards: dict[str, Callable],
    images: torch.Tensor,
    prompts: list[str],
    fields: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Every reward of ``rewards`` on the same images: {name: values [B]} (checked; an error
    names the reward's config field from ``fields``, ``reward.name`` by default)."""
    meta = [{} for _ in prompts]
    fields = fields or {}
    return {
        name: check_reward_result(
            name, fn(images, prompts, meta), len(prompts), fields.get(name, "reward.name")
        )
        for name, fn in rewards.items()
    }


def takes_eta(pipeline) -> bool:
    """Whether the pipeline's ``__call__`` (a pipeline or its class) takes DDIM's ``eta``: SD
    1.x/2.x and SDXL do; SD3's flow-matching Euler sampler (an ODE) has none."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    return "eta" in inspect.signature(cls.__call__).parameters


def pipeline_sampler_kwargs(pipeline, steps: int, guidance: float, eta: float | None) -> dict:
    """The sampler options as keywords of ``pipeline(...)`` (a pipeline or its class), only
    those its ``__call__`` accepts: ``num_inference_steps``, ``guidance_scale``, and ``eta``
    where the pipeline takes one (:func:`takes_eta`). The one place that decides it, for
    ``tdpo sample``, ``tdpo eval`` and ``tdpo.sampler_settings``."""
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance}
    if eta is not None and takes_eta(pipeline):
        kwargs["eta"] = eta
    return kwargs


def iter_pipeline_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    eta: float | None,
    batch_size: int,
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Sample ``pipe`` (its own ``__call__``: DDIM for SD 1.x/2.x and SDXL, the flow-matching
    Euler ODE for SD3, which takes no ``eta``) at every (prompt, seed): yields batches of
    ``([(prompt_index, seed), ...], images [b, 3, H, W] in [0, 1])``.

    Each image has its own ``torch.Generator().manual_seed(seed)``, so an image depends only on
    (model, LoRA, prompt, seed, sampler options), not on the batch it was drawn in.
    """
    options = pipeline_sampler_kwargs(pipe, steps, guidance, eta)
    items = [(p, s) for p in range(len(prompts)) for s in seeds]
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        with torch.no_grad():
            images = pipe(
                [prompts[p] for p, _ in chunk],
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                output_type="pt",
                **options,
            ).images
        yield chunk, images.float().clamp(0, 1).cpu()
