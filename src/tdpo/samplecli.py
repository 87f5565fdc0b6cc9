"""``tdpo sample``: images from a pipeline plus an optional LoRA, one per (prompt, seed).

Shared with ``tdpo eval`` (one place): the sampler arguments, reading a run, and the runtime
set-up. Given a run (``--lora runs/<name>``, or its ``final/`` or ``best/``), the model, the
sampler (steps, guidance, and DDIM's eta) and the runtime (``cpu_threads``, ``mixed_precision``)
come from the run's ``config.yaml`` unless given on the command line, and the output goes into
the run folder unless ``--out`` is given. The image size is the model's own (as in training).

Images come from the pipeline's own ``__call__``: DDIM for SD 1.x/2.x and SDXL (the sampler of
training), the flow-matching Euler ODE for SD3 (training samples with Flow-GRPO's SDE at
``sample.noise_level``; its held-out evaluation too, for the KL: the ODE is that SDE at noise
level 0, without the noise), which has no eta. ``tdpo sample`` never overwrites a file:
``--out`` is a new or empty folder, and without it each call writes a new folder.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from tdpo.errors import UsageError
from tdpo.fileio import check_output_folder
from tdpo.paths import check_pipeline_path
from tdpo.prompts import check_prompt, load_prompts
from tdpo.results import LORA_FILE, check_saved_weights, load_weights
from tdpo.rundir import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    SAMPLES_DIR,
    is_our_run,
)

MAX_STEPS = 1000  # a DDIM (or flow-matching) schedule cannot have more steps than the model's training timesteps
MAX_CPU_THREADS = 1024  # as config.cpu_threads
EVAL_DIR = "eval"  # tdpo eval's summaries inside a run folder
# Without a run: the paper's sampler (algorithm.md) and the runtime of config.py's defaults.
DEFAULTS = {
    "steps": 50,
    "guidance": 5.0,
    "eta": 1.0,
    "cpu_threads": 1,
    "mixed_precision": "fp32",
}
SAMPLER_HELP = (
    "Images come from the pipeline's own sampler: DDIM for SD 1.x/2.x and SDXL (as in "
    "training), the flow-matching Euler ODE for SD3 (no eta; training and its held-out "
    "evaluation use the SDE of sample.noise_level, whose noise-free limit this is)."
)
MODEL_HELP = (
    "the pipeline: a Hub id, a folder saved with save_pretrained, or shapes-world (the shipped "
    "shapes-world pipeline); default: the run's model.pretrained when --lora is a run"
)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """What to sample and how: the arguments ``tdpo sample`` and ``tdpo eval`` share."""
    parser.add_argument("--model", metavar="ID_OR_PATH", help=MODEL_HELP)
    parser.add_argument(
        "--lora",
        metavar="RUN_OR_DIR",
        help="a run folder (runs/<name>: its final/), its final/ or best/, or a folder holding "
        f"{LORA_FILE}",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts", metavar="SET_OR_FILE", help="a prompt set name or .txt file (one a line)"
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated distinct seeds, one image each (0,1,2)"
    )
    run_or = "default: the run's {}, else {}"
    parser.add_argument(
        "--steps",
        type=int,
        help="sampling steps (DDIM, or SD3's flow-matching Euler); "
        + run_or.format("sample.num_steps", DEFAULTS["steps"]),
    )
    parser.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance; "
        + run_or.format("sample.guidance_scale", DEFAULTS["guidance"]),
    )
    parser.add_argument(
        "--eta",
        type=float,
        help="DDIM eta (SD 1.x/2.x, SDXL; SD3's ODE has none); "
        + run_or.format("sample.eta", DEFAULTS["eta"]),
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="torch CPU threads (0 = torch's default); "
        + run_or.format("cpu_threads", DEFAULTS["cpu_threads"]),
    )


@dataclass
class RunSource:
    """The run a ``--lora`` belongs to: its folder, the weights folder and its config."""

    run_dir: Path
    weights: Path
    config: object  # tdpo.config.Config


def find_run(lora: str | None) -> RunSource | None:
    """The run of ``--lora``: a run folder (its final/), or a folder inside one (final/, best/);
    None for a LoRA folder outside a run. UsageError for a run without the weights asked for."""
    if not lora:
        return None
    path = Path(lora).expanduser()
    if is_our_run(path):
        run_dir, weights = path, path / FINAL_DIR
        if not weights.is_dir():
            best = f" or its {BEST_DIR}/" if (path / BEST_DIR).is_dir() else ""
            raise UsageError(
                "--lora",
                lora,
                f"this run has no {FINAL_DIR}/ yet (it has not finished); finish it with tdpo "
                f"train --resume {lora}, or give{best or ' a finished run'}",
            )
    elif path.is_dir() and is_our_run(path.parent) and path.name != CHECKPOINTS_DIR:
        run_dir, weights = path.parent, path
    else:
        return None
    check_saved_weights(weights, "--lora", lora)
    from tdpo.config import build_config, load_yaml  # deferred: the checks above are cheap

    try:
        config = build_config(base=load_yaml(run_dir / CONFIG_FILE, "--lora"))
    except UsageError as exc:
        if exc.field == "--lora":
            raise
        raise UsageError("--lora", str(run_dir), f"its {CONFIG_FILE}: {exc}") from None
    return RunSource(run_dir, weights, config)


def apply_run_defaults(args: argparse.Namespace) -> RunSource | None:
    """Fill the sampler arguments left unset from the run of ``--lora`` (or the defaults without
    one): ``args.model``, ``steps``, ``guidance``, ``eta``, ``cpu_threads``, and
    ``args.mixed_precision``; ``args.lora`` becomes the weights folder. Returns the run."""
    args.eta_given = getattr(args, "eta", None) is not None
    run = find_run(args.lora)
    if run is None and args.lora:
        check_lora_folder(args.lora)
    if run is not None:
        args.lora = str(run.weights)
        c = run.config
        values = {
            "model": c.model.pretrained,
            "revision": c.model.revision,
            "steps": c.sample.num_steps,
            "guidance": c.sample.guidance_scale,
            "eta": c.sample.eta,
            "cpu_threads": c.cpu_threads,
            "mixed_precision": c.mixed_precision,
        }
        if args.model is not None and args.model != c.model.pretrained:
            values["revision"] = None  # the run's revision belongs to the run's model
    else:
        values = {"revision": None, **DEFAULTS}
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        raise UsageError(
            "--model",
            None,
            "give the pipeline (a Hub id, a folder, or shapes-world for the shipped shapes "
            "world), or --lora a run folder to use the run's model",
        )
    return run


def check_sampler_arguments(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """(prompts, seeds) from the shared sampler arguments, after :func:`apply_run_defaults`
    (``args.run`` is the run or None); UsageError on a bad one."""
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
    if args.batch_size < 1:
        raise UsageError("--batch-size", args.batch_size, "must be >= 1")
    args.run = apply_run_defaults(args)
    if not 1 <= args.steps <= MAX_STEPS:
        raise UsageError("--steps", args.steps, f"must be in [1, {MAX_STEPS}]")
    if not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        raise UsageError("--guidance", args.guidance, "must be a number >= 1.0 (1 = no guidance)")
    if not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        raise UsageError("--eta", args.eta, "must be in [0, 1] (1 = DDPM-like, 0 = deterministic)")
    if not 0 <= args.cpu_threads <= MAX_CPU_THREADS:
        raise UsageError(
            "--cpu-threads", args.cpu_threads, f"must be in [0, {MAX_CPU_THREADS}] (0 = torch's)"
        )
    check_pipeline_path(args.model, "--model")
    return prompts, seeds


def default_output(run: RunSource | None, kind: str, fallback: str, suffix: str = "") -> Path:
    """Where a command writes without ``--out``: a new name, never an existing one, inside the
    run folder (``samples/sample-final-<time>/``, ``eval/final-<time>.json``), or without a run
    in the folder ``fallback`` (``samples/sample-<time>/``, ``./eval-<time>.json``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if run is None:
        folder, stem = Path(fallback), f"{kind}-{stamp}"
    else:
        folder = run.run_dir / (SAMPLES_DIR if kind == "sample" else EVAL_DIR)
        weights = run.weights.name
        stem = f"sample-{weights}-{stamp}" if kind == "sample" else f"{weights}-{stamp}"
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def check_lora_folder(path: str) -> None:
    """A folder holding a LoRA in diffusers format (a run's final/ or best/), checked before the
    pipeline loads."""
    lora = Path(path)
    if lora.is_file():
        raise UsageError(
            "--lora", path, f"is a file; give the folder that holds {LORA_FILE} (a run's final/)"
        )
    if not lora.is_dir():
        raise UsageError("--lora", path, "no such folder; give a run folder or its final/")
    if lora.name == "checkpoints" or lora.parent.name == "checkpoints":
        raise UsageError(
            "--lora",
            path,
            "checkpoints/ hold training state, not a LoRA; give the run's final/ or best/ folder",
        )
    if not (lora / LORA_FILE).is_file():
        raise UsageError(
            "--lora",
            path,
            f"no {LORA_FILE} in this folder; give a run folder, or its final/ or best/ folder",
        )


def check_device(text: str | None):
    """The torch device of ``--device`` (default: cuda if present), checked before loading."""
    import torch  # deferred: the cheap checks come first

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError("--device", text, "not a torch device; e.g. cpu, cuda, cuda:1") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise UsageError(
            "--device", text, f"{device.type} is not available here; e.g. --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            "--device", text, f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def setup_runtime(args: argparse.Namespace):
    """The runtime ``tdpo train`` sets up (:class:`tdpo.trainers.loop.Trainer`), for ``sample``
    and ``eval``: torch CPU threads (``cpu_threads``; 0 = torch's default), the device (cuda if
    present), and the weights' dtype (``mixed_precision``'s on CUDA, float32 elsewhere).
    Returns (device, dtype)."""
    import torch  # deferred: the cheap checks come first

    device = check_device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    dtype = torch.float32
    if device.type == "cuda" and args.mixed_precision != "fp32":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    return device, dtype


def resolve_sampler(args: argparse.Namespace) -> None:
    """The sampler of ``--model``'s pipeline class (read from its ``model_index.json``, before
    the weights load): ``args.eta`` stays for a pipeline that takes DDIM's eta and becomes None
    for one that does not (SD3: the flow-matching Euler ODE); an ``--eta`` given for such a
    pipeline is a UsageError."""
    from tdpo.backbones.sources import check_pipeline_available  # deferred: huggingface_hub
    from tdpo.paths import resolve_alias

    check_pipeline_available(resolve_alias(args.model), getattr(args, "revision", None), "--model")
    import diffusers  # deferred: seconds to import

    from tdpo.policy import pipeline_class
    from tdpo.sampling import takes_eta

    try:
        name = pipeline_class(args.model, getattr(args, "revision", None))
    except UsageError as exc:
        if exc.field != "model.pretrained":
            raise
        raise UsageError("--model", args.model, exc.fix) from None
    args.pipeline_class = name
    if not takes_eta(getattr(diffusers, name)):
        if getattr(args, "eta_given", False):
            raise UsageError(
                "--eta",
                args.eta,
                f"{args.model} is a {name}, whose sampler (the flow-matching Euler ODE) has no "
                "eta; drop --eta",
            )
        args.eta = None


def sampler_description(args: argparse.Namespace) -> str:
    """The sampler in words: ``DDIM 20 steps, guidance 4, eta 1``, or for SD3 (no eta)
    ``flow-matching Euler ODE 28 steps, guidance 4.5``."""
    if args.eta is None:
        return f"flow-matching Euler ODE {args.steps} steps, guidance {args.guidance:g}"
    return f"DDIM {args.steps} steps, guidance {args.guidance:g}, eta {args.eta:g}"


def load_sampler_pipeline(args: argparse.Namespace, device, dtype):
    """The pipeline of ``--model`` (its training scheduler: DDIM, or SD3's flow-matching Euler)
    with the weights of ``--lora`` (:func:`tdpo.results.load_weights`), on ``device``."""
    from tdpo.policy import load_pipeline  # deferred: diffusers

    pipe = load_pipeline(args.model, getattr(args, "revision", None), dtype)
    if args.lora:
        load_weights(pipe, args.lora, "--lora", args.lora)
    return pipe.to(device)


def describe(args: argparse.Namespace, device, dtype) -> str:
    """One line: what is sampled, from where, how."""
    run = f" (run {args.run.run_dir})" if getattr(args, "run", None) is not None else ""
    lora = f" + {args.lora}{run}" if args.lora else ""
    return (
        f"sampling {args.model}{lora}: {sampler_description(args)}; "
        f"{device}, {str(dtype).replace('torch.', '')}, "
        f"{args.cpu_threads or 'default'} CPU thread{'s' if args.cpu_threads != 1 else ''}"
    )


def add_sample_parser(sub) -> argparse.ArgumentParser:
    sample = sub.add_parser(
        "sample",
        help="generate images from a run (or a pipeline plus an optional LoRA)",
        description="Images from a pipeline plus an optional LoRA, one per (prompt, seed). "
        "With --lora a run folder (or its final/ or best/), the model, sampler and runtime "
        "come from the run's config.yaml, e.g.: tdpo sample --lora runs/<name> --prompt "
        '"a red circle". Without a run: --model ID_OR_PATH (shapes-world: the shipped '
        "shapes-world pipeline). " + SAMPLER_HELP,
    )
    add_sampler_arguments(sample)
    sample.add_argument(
        "--out",
        metavar="DIR",
        help="output folder, new or empty (an existing file is never overwritten): "
        "p<prompt>_s<seed>.png and grid.png; default: a new samples/sample-<weights>-<time>/ "
        "in the run, else a new ./samples/sample-<time>/",
    )
    sample.set_defaults(func=run_sample, loads_models=True)
    return sample


def check_new_output_folder(path: Path, field: str = "--out") -> None:
    """A folder ``tdpo sample`` may write its images into: new, or existing and empty (it never
    overwrites a file); UsageError naming ``field``, the folder and the fix."""
    check_output_folder(path, field)
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(
            field,
            str(path),
            "this folder is not empty and tdpo sample never overwrites a file; give a new or "
            "empty folder (or leave out --out for a new one)",
        )


def run_sample(args: argparse.Namespace) -> int:
    prompts, seeds = check_sampler_arguments(args)
    out = Path(args.out).expanduser() if args.out else default_output(args.run, "sample", "samples")
    check_new_output_folder(out)
    resolve_sampler(args)
    device, dtype = setup_runtime(args)
    # deferred: torch and diffusers load only once the arguments are known to be good
    import torch

    from tdpo.images import save_grid, to_pil
    from tdpo.sampling import iter_pipeline_images

    print(describe(args, device, dtype), flush=True)
    start = time.time()
    pipe = load_sampler_pipeline(args, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    batches = iter_pipeline_images(
        pipe, prompts, seeds, args.steps, args.guidance, args.eta, args.batch_size
    )
    for chunk, batch in batches:
        for (p_index, seed), image in zip(chunk, batch):
            images.append(image)
            captions.append(f"{prompts[p_index]} (seed {seed})")
            with open(out / f"p{p_index:03d}_s{seed}.png", "xb") as file:  # never overwrite
                to_pil(image).save(file, format="PNG")
    grid = save_grid(torch.stack(images), captions, out / "grid.png")
    print(f"wrote {len(images)} images and {grid} in {time.time() - start:.1f} s")
    return 0
