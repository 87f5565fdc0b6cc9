"""``tdpo eval``: score a pipeline plus an optional LoRA on prompts x seeds with one or more
rewards, standalone (no run directory needed).

Each image is sampled by the pipeline's own ``__call__`` (``output_type="pt"``: DDIM for SD
1.x/2.x and SDXL, the flow-matching Euler ODE for SD3, see :mod:`tdpo.samplecli`) with its
own ``torch.Generator().manual_seed(seed)``, so an image depends only on (model, LoRA, prompt,
seed, sampler options), not on the batch it was drawn in or on the other prompts: the same command
gives the same numbers. Writes a JSON summary (per reward: mean, std over all images, and the
mean per prompt; every image's scores) and prints a table. ``tdpo eval`` never overwrites a
file: ``--out`` (and ``--grid``) must name a new file, and without ``--out`` each call writes a
new one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from tdpo.errors import UsageError
from tdpo.fileio import check_output_file
from tdpo.rewards import check_reward_name
from tdpo.samplecli import (
    SAMPLER_HELP,
    add_sampler_arguments,
    check_device,  # noqa: F401 - its home was here
    check_sampler_arguments,
    default_output,
    describe,
    load_sampler_pipeline,
    resolve_sampler,
    setup_runtime,
)


def add_eval_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "eval",
        help="score a pipeline (+ LoRA) on prompts x seeds with one or more rewards",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "'") + " " + SAMPLER_HELP,
    )
    add_sampler_arguments(parser)
    parser.add_argument(
        "--max-prompts", type=int, default=0, help="use the first N prompts (0 = all)"
    )
    parser.add_argument(
        "--reward", action="append", default=[], metavar="NAME", help="a reward (repeatable)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="JSON summary, a new file (an existing file is never overwritten); default: a new "
        "eval/<weights>-<time>.json in the run, else a new ./eval-<time>.json",
    )
    parser.add_argument(
        "--grid", metavar="FILE.png", help="also save a grid of the images (a new file)"
    )
    return parser


def _check(args: argparse.Namespace) -> tuple[list[str], list[int]]:

    if args.max_prompts < 0:
        raise UsageError("--max-prompts", args.max_prompts, "must be >= 0 (0 = all)")
    prompts, seeds = check_sampler_arguments(args)
    if not args.reward:
        raise UsageError("--reward", None, "name at least one reward, e.g. --reward aesthetic")
    for name in args.reward:
        check_reward_name(name, "--reward")
    from tdpo.rewards.hub import check_reward_sources  # deferred: imports torch

    for name in args.reward:
        check_reward_sources(name, "--reward")
    if args.out is None:
        args.out = str(default_output(args.run, "eval", ".", ".json"))
    if not str(args.out).endswith(".json"):
        raise UsageError("--out", args.out, "name a .json file")
    check_new_output_file(args.out, "--out", " (or leave out --out for a new one)")
    if args.grid:
        check_new_output_file(args.grid, "--grid")
    return prompts, seeds


def check_new_output_file(path: str, field: str, also: str = "") -> None:
    """A file ``tdpo eval`` may write: not there yet (it never overwrites a file), its folder
    there or creatable; UsageError naming ``field``, the value and the fix."""
    check_output_file(path, field)
    if Path(path).expanduser().exists():
        raise UsageError(
            field,
            path,
            "this file exists and tdpo eval never overwrites a file; give a new file name" + also,
        )


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if not n:
        return {"mean": None, "std": None, "n": 0, "nonfinite": len(values)}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "nonfinite": len(values) - n}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    # deferred: torch, diffusers and the reward models load only after the arguments check out
    import torch

    from tdpo.rewards import build_reward
    from tdpo.sampling import iter_pipeline_images, score_images

    prompts, seeds = _check(args)
    resolve_sampler(args)
    device, dtype = setup_runtime(args)
    print(describe(args, device, dtype), flush=True)
    start = time.time()
    pipe = load_sampler_pipeline(args, device, dtype)
    rewards = {name: build_reward(name, device, "--reward") for name in args.reward}
    images_all = []
    per_image: list[dict[str, Any]] = []
    batches = iter_pipeline_images(
        pipe, prompts, seeds, args.steps, args.guidance, args.eta, args.batch_size
    )
    for chunk, images in batches:
        batch_prompts = [prompts[p] for p, _ in chunk]
        scores = score_images(
            rewards, images.to(device), batch_prompts, {name: "--reward" for name in rewards}
        )
        for j, (p_index, seed) in enumerate(chunk):
            per_image.append(
                {
                    "prompt_index": p_index,
                    "prompt": prompts[p_index],
                    "seed": seed,
                    "rewards": {name: float(scores[name][j]) for name in rewards},
                }
            )
        if args.grid:
            images_all.append(images)
    summary: dict[str, Any] = {
        "model": args.model,
        "lora": args.lora,
        "run": None if args.run is None else str(args.run.run_dir),
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "seeds": seeds,
        "sampler": {"steps": args.steps, "guidance": args.guidance, "eta": args.eta},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "cpu_threads": args.cpu_threads,
        "rewards": {},
    }
    for name in rewards:
        values = [img["rewards"][name] for img in per_image]
        per_prompt = []
        for p_index, prompt in enumerate(prompts):
            vals = [i["rewards"][name] for i in per_image if i["prompt_index"] == p_index]
            per_prompt.append({"prompt": prompt, **_stats(vals)})
        summary["rewards"][name] = {**_stats(values), "per_prompt": per_prompt}
    summary["images"] = per_image
    summary["seconds"] = round(time.time() - start, 2)
    if args.grid and images_all:
        from tdpo.images import save_grid  # deferred: imports torch

        captions = [
            f"{i['prompt']} (seed {i['seed']}) "
            + " ".join(f"{k}={v:.3g}" for k, v in i["rewards"].items())
            for i in per_image
        ]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(images_all), captions, Path(args.grid))
    return summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def format_table(summary: dict[str, Any]) -> str:
    def num(v):
        return "–" if v is None else f"{v:.4f}"

    lines = [f"{'reward':<28s} {'mean':>10s} {'std':>10s} {'n':>5s}"]
    for name, s in summary["rewards"].items():
        lines.append(f"{name:<28s} {num(s['mean']):>10s} {num(s['std']):>10s} {s['n']:>5d}")
    if summary["num_prompts"] <= 20:
        names = list(summary["rewards"])
        lines.append("")
        lines.append("per prompt (mean over seeds): " + ", ".join(names))
        for p_index in range(summary["num_prompts"]):
            cells = [summary["rewards"][n]["per_prompt"][p_index] for n in names]
            text = cells[0]["prompt"]
            text = text if len(text) <= 50 else text[:47] + "..."
            lines.append(f"  {text:<50s} " + " ".join(f"{num(c['mean']):>10s}" for c in cells))
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    summary = _json_safe(evaluate(args))
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    print(format_table(summary))
    try:
        with open(out, "x", encoding="utf-8") as file:  # never overwrite (checked before, too)
            file.write(text)
    except FileExistsError:
        raise UsageError(
            "--out",
            args.out,
            "this file was created while tdpo eval ran and is left as it was; run again with "
            "a new file name",
        ) from None
    print(f"wrote {out}")
    return 0
