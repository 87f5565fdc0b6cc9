"""``tdpo sample``: images from a pipeline plus an optional LoRA, one per (prompt, seed)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tdpo.errors import UsageError
from tdpo.fileio import check_output_folder
from tdpo.prompts import check_prompt, load_prompts

MAX_STEPS = 1000  # a DDIM schedule cannot have more steps than the model's training timesteps
LORA_FILE = "pytorch_lora_weights.safetensors"  # what a run's final/ and best/ hold


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """What to sample and how: the arguments ``tdpo sample`` and ``tdpo eval`` share."""
    parser.add_argument(
        "--model", required=True, metavar="ID_OR_PATH", help="pipeline id or folder"
    )
    parser.add_argument("--lora", metavar="DIR", help="LoRA folder (a run's final/ or best/)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts", metavar="SET_OR_FILE", help="a prompt set name or .txt file (one a line)"
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated distinct seeds, one image each (0,1,2)"
    )
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")


def check_sampler_arguments(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """(prompts, seeds) from the shared sampler arguments; UsageError on a bad one."""
    for prompt in args.prompt:
        check_prompt(prompt, "--prompt")
    prompts = list(args.prompt) + (load_prompts(args.prompts, "--prompts") if args.prompts else [])
    if getattr(args, "max_prompts", 0):
        prompts = prompts[: args.max_prompts]
    if not prompts:
        raise UsageError("--prompts", None, "give a prompt set or file (--prompts) or --prompt")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError("--seeds", args.seeds, "comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError("--seeds", args.seeds, "give distinct integers, e.g. 0,1,2")
    if not 1 <= args.steps <= MAX_STEPS:
        raise UsageError("--steps", args.steps, f"must be in [1, {MAX_STEPS}]")
    if not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        raise UsageError("--guidance", args.guidance, "must be a number >= 1.0 (1 = no guidance)")
    if not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        raise UsageError("--eta", args.eta, "must be in [0, 1] (1 = DDPM-like, 0 = deterministic)")
    if args.batch_size < 1:
        raise UsageError("--batch-size", args.batch_size, "must be >= 1")
    if args.lora:
        check_lora_folder(args.lora)
    return prompts, seeds


def check_lora_folder(path: str) -> None:
    """A folder holding a LoRA in diffusers format (a run's final/ or best/), checked before the
    pipeline loads."""
    lora = Path(path)
    if lora.is_file():
        raise UsageError(
            "--lora", path, f"is a file; give the folder that holds {LORA_FILE} (a run's final/)"
        )
    if not lora.is_dir():
        raise UsageError("--lora", path, "no such folder; give a run's final/ folder")
    if lora.name == "checkpoints" or lora.parent.name == "checkpoints":
        raise UsageError(
            "--lora",
            path,
            "checkpoints/ hold training state, not a LoRA; give the run's final/ or best/ folder",
        )
    if not (lora / LORA_FILE).is_file():
        raise UsageError(
            "--lora", path, f"no {LORA_FILE} in this folder; give a run's final/ or best/ folder"
        )


def load_lora(pipe, path: str) -> None:
    """Load the LoRA of :func:`check_lora_folder` into ``pipe``; UsageError if it cannot."""
    try:
        pipe.load_lora_weights(path)
    except Exception as exc:  # a damaged or foreign file: safetensors, peft and diffusers errors
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError("--lora", path, f"cannot load LoRA weights ({first})") from None


def add_sample_parser(sub) -> argparse.ArgumentParser:
    sample = sub.add_parser("sample", help="generate images from a pipeline plus an optional LoRA")
    add_sampler_arguments(sample)
    sample.add_argument("--out", default="samples", metavar="DIR", help="output folder")
    sample.set_defaults(func=run_sample, loads_models=True)
    return sample


def run_sample(args: argparse.Namespace) -> int:
    prompts, seeds = check_sampler_arguments(args)
    check_output_folder(args.out, "--out")
    # deferred: torch and diffusers load only once the arguments are known to be good
    import torch

    from tdpo.images import save_grid, to_pil
    from tdpo.policy import load_pipeline
    from tdpo.sampling import iter_pipeline_images

    pipe = load_pipeline(args.model)
    if args.lora:
        load_lora(pipe, args.lora)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    batches = iter_pipeline_images(
        pipe, prompts, seeds, args.steps, args.guidance, args.eta, args.batch_size
    )
    for chunk, batch in batches:
        for (p_index, seed), image in zip(chunk, batch):
            images.append(image)
            captions.append(f"{prompts[p_index]} (seed {seed})")
            to_pil(image).save(out / f"p{p_index:03d}_s{seed}.png")
    grid = save_grid(torch.stack(images), captions, out / "grid.png")
    print(f"wrote {len(images)} images and {grid}")
    return 0
