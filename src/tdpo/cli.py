"""The ``tdpo`` command: ``tdpo train | sample | world | eval | report | sweep``.

``main(argv) -> int`` never raises for a user mistake: it prints one line naming the field, the
value and the fix, and returns 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from tdpo.errors import TrainingError, UsageError

TRAIN_EPILOG = """\
Configuration is layered: defaults <- --preset <- --config FILE.yaml <- --model/--reward/
--output-dir <- --set key=value (repeatable). Values of --set are YAML (numbers, true/false,
lists like [a, b]).

Presets (repeatable, applied in order): {presets}
  tdpo, tdpo-r, ddpo-2, ddpo-100, alignprop choose the method; sd14-aesthetic, sd14-pickscore,
  sd14-hpsv2 set up the paper's runs on Stable Diffusion 1.4 (TDPO-R unless another method
  preset follows, e.g. --preset sd14-aesthetic --preset ddpo-2).

Examples:
  tdpo train --model ./tiny-sd --reward jpeg_compressibility --preset tdpo-r
  tdpo train --preset ddpo-2 --set train.epochs=10 --set sample.num_steps=20
  accelerate launch --num_processes 2 -m tdpo.cli train --preset tdpo-r
  tdpo train --resume runs/tdpo-r-20261128-101500

Every configuration field:
{fields}
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from tdpo.config import PRESETS, fields_help

    parser = _Parser(
        prog="tdpo",
        description="Fine-tune text-to-image diffusion models against "
        "reward models with TDPO, TDPO-R or DDPO.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="fine-tune a diffusion pipeline (TDPO, TDPO-R, DDPO)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG.format(presets=", ".join(PRESETS), fields=fields_help()),
    )
    train.add_argument(
        "--preset",
        action="append",
        choices=list(PRESETS),
        metavar="NAME",
        help="named set of overrides, repeatable and applied in order (see below)",
    )
    train.add_argument("--config", metavar="FILE.yaml", help="YAML file of config sections")
    train.add_argument("--model", metavar="ID_OR_PATH", help="= --set model.pretrained=...")
    train.add_argument("--reward", metavar="NAME", help="= --set reward.name=...")
    train.add_argument("--output-dir", metavar="DIR", help="= --set output_dir=...")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field (repeatable), e.g. --set train.epochs=10",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and per-process schedule, load nothing",
    )

    sample = sub.add_parser("sample", help="generate images from a pipeline plus an optional LoRA")
    sample.add_argument(
        "--model", required=True, metavar="ID_OR_PATH", help="pipeline id or folder"
    )
    sample.add_argument("--lora", metavar="DIR", help="LoRA folder (a run's final/)")
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    sample.add_argument("--prompts", metavar="SET_OR_FILE", help="a prompt set name or .txt file")
    sample.add_argument(
        "--seeds", default="0", help="comma-separated seeds, one image each (0,1,2)"
    )
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps")
    sample.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    sample.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    sample.add_argument("--out", default="samples", metavar="DIR", help="output folder")

    try:
        from tdpo.world.cli import add_world_parser
    except ImportError:
        pass
    else:
        add_world_parser(sub)

    from tdpo.evalcli import add_eval_parser
    from tdpo.report import add_report_parser
    from tdpo.sweep import add_sweep_parser

    add_eval_parser(sub)
    add_report_parser(sub)
    add_sweep_parser(sub)
    from tdpo.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


# --------------------------------------------------------------------------------------------


def resolve_train_config(args: argparse.Namespace):
    from tdpo.config import (
        RESUME_MUTABLE_PREFIXES,
        build_config,
        load_yaml,
        parse_override,
    )

    overrides = dict(parse_override(text) for text in args.overrides)
    for flag, key in (
        ("model", "model.pretrained"),
        ("reward", "reward.name"),
        ("output_dir", "output_dir"),
    ):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError("--resume", args.resume, "not a run directory (no config.yaml)")
        if args.preset or args.config:
            raise UsageError(
                "--resume",
                args.resume,
                "a resumed run keeps its own config; drop --preset/--config",
            )
        for key in overrides:
            if not key.startswith(RESUME_MUTABLE_PREFIXES):
                raise UsageError(
                    key,
                    overrides[key],
                    "cannot change on resume (only train.epochs, "
                    "log.* and checkpoint.*); start a new run instead",
                )
        config = build_config(
            base=load_yaml(run_dir / "config.yaml", "--resume"), overrides=overrides
        )
        return config, run_dir
    config = build_config(args.preset, args.config, overrides)
    label = "-".join(args.preset) if args.preset else config.train.algorithm
    name = config.run_name or f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, Path(config.output_dir) / name


def check_run_dir(run_dir: Path) -> None:
    """A new run must not reuse a folder holding another run; the folder must be creatable and
    writable (checked without writing anything)."""
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        raise UsageError(
            "run_name",
            run_dir.name,
            f"{run_dir} already holds a run; resume it "
            "with --resume, or choose another --set run_name=...",
        )
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # e.g. output_dir=/etc/hostname/x: a regular file in the path
        raise UsageError(
            "output_dir",
            str(run_dir.parent),
            f"{parent} is a file, not a folder; choose another --output-dir",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            "output_dir", str(run_dir.parent), "not writable; choose another --output-dir"
        )


def _check_plugin_module(spec: str, field: str) -> None:
    """A ``package.module:factory`` reward whose module cannot be found (nothing is imported)."""
    import importlib.util

    for term in spec.split(","):
        name = term.strip().rsplit(":", 1)[0] if term.count(":") > 1 else term.strip()
        if ":" not in name or "." not in name.split(":", 1)[0]:
            continue
        module = name.split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UsageError(
                field, spec, f"cannot find the module {module}; check the package.module:callable"
            )


def run_config_hash(config) -> str:
    """The hash a run's checkpoints carry: the config minus what a resume may change
    (the same formula as ``Trainer.config_hash``)."""
    from tdpo.checkpoint import config_hash
    from tdpo.config import RESUME_MUTABLE_PREFIXES, flatten, to_dict

    return config_hash(
        {
            key: value
            for key, value in flatten(to_dict(config)).items()
            if not key.startswith(RESUME_MUTABLE_PREFIXES)
        }
    )


def precheck_train(config, run_dir: Path, resume: bool, num_processes: int) -> None:
    """Every check that needs no model, cheapest first: nothing here imports torch except the
    last step (reward names come from the registry, which imports torch)."""
    from tdpo.config import resolve_schedule
    from tdpo.prompts import load_prompts

    resolve_schedule(config, num_processes)
    if resume:
        from tdpo.checkpoint import check_resume

        check_resume(run_dir, run_config_hash(config), num_processes)
    else:
        check_run_dir(run_dir)
    from tdpo.paths import check_pipeline_path

    check_pipeline_path(config.model.pretrained)
    load_prompts(config.prompts.train)
    names = [("reward.name", config.reward.name)]
    names += [(f"reward.panel[{i}]", n) for i, n in enumerate(config.reward.panel)]
    names += [(f"eval.rewards[{i}]", n) for i, n in enumerate(config.eval.rewards)]
    for field, name in names:
        if isinstance(name, str):
            _check_plugin_module(name, field)
    from tdpo.rewards import check_reward_name

    for field, name in names:
        check_reward_name(name, field=field)


def cmd_train(args: argparse.Namespace) -> int:
    config, run_dir = resolve_train_config(args)
    if args.dry_run:
        return dry_run(config, run_dir)
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    precheck_train(config, run_dir, bool(args.resume), num_processes)
    resume = bool(args.resume)
    if resume:
        from tdpo.checkpoint import CHECKPOINTS_DIR, list_checkpoints

        has_any = (run_dir / CHECKPOINTS_DIR).is_dir() and any(
            p.name.startswith("epoch_") for p in (run_dir / CHECKPOINTS_DIR).iterdir()
        )
        if not list_checkpoints(run_dir) and not has_any:
            # Killed before its first checkpoint: nothing to restore, so start it over.
            from tdpo.tracking import truncate_metrics

            if int(os.environ.get("RANK", "0")) == 0:
                truncate_metrics(run_dir, 0)
                print(f"no checkpoint in {run_dir} yet; starting it from epoch 0", flush=True)
            resume = False
    fresh = not resume and int(os.environ.get("RANK", "0")) == 0
    if fresh:
        from tdpo.config import write_run_config

        # Before the models load: a run killed while loading can be resumed (from epoch 0).
        write_run_config(config, run_dir)
    quiet_libraries(load=True)
    from tdpo.trainers.loop import Trainer

    try:
        trainer = Trainer(config, run_dir, resume=resume, log=_log_main)
    except UsageError:
        if fresh:  # e.g. a Hub id that cannot load: leave no half-made run behind
            (run_dir / "config.yaml").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    if trainer.is_main:
        print(f"run directory: {run_dir}", flush=True)
    code = trainer.train()
    if trainer.is_main and code == 0:
        print(
            f"done: {run_dir} (LoRA in {run_dir / 'final'}, metrics in "
            f"{run_dir / 'metrics.jsonl'})",
            flush=True,
        )
    return code


def _log_main(message: str) -> None:
    print(message, flush=True)


def dry_run(config, run_dir: Path) -> int:
    from tdpo.config import config_to_yaml, resolve_schedule

    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    sch = resolve_schedule(config, num_processes)
    print(config_to_yaml(config), end="")
    print(f"# run directory: {run_dir}")
    print(
        f"# processes: {sch.num_processes}; samples per process per epoch: "
        f"{sch.samples_per_process} ({sch.sample_batches} batches of {config.sample.batch_size})"
    )
    print(
        f"# training minibatches per process: {sch.minibatches} of {config.train.batch_size}; "
        f"updates per epoch: {sch.updates_per_epoch}; gradient accumulation: "
        f"{sch.accumulation} minibatch passes"
    )
    from tdpo.estimate import estimate_memory

    on_gpu = bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x")) and _cuda_available()
    for line in estimate_memory(config, sch.samples_per_process, on_gpu):
        print(line)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from tdpo.images import save_grid
    from tdpo.policy import load_pipeline
    from tdpo.prompts import load_prompts

    prompts = list(args.prompt) + (load_prompts(args.prompts, "--prompts") if args.prompts else [])
    if not prompts:
        raise UsageError("--prompt", None, "give at least one --prompt TEXT or --prompts SET")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError("--seeds", args.seeds, "comma-separated integers, e.g. 0,1,2") from None
    if args.steps < 1:
        raise UsageError("--steps", args.steps, "must be >= 1")
    if args.lora and not Path(args.lora).is_dir():
        raise UsageError("--lora", args.lora, "no such folder; give a run's final/ folder")
    pipe = load_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            image = pipe(
                prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                eta=args.eta,
                generator=generator,
                output_type="pt",
            ).images[0]
            images.append(image.float().cpu())
            captions.append(f"{prompt} (seed {seed})")
            from tdpo.images import to_pil

            to_pil(image.float().cpu()).save(out / f"p{p_index:03d}_s{seed}.png")
    grid = save_grid(torch.stack(images), captions, out / "grid.png")
    print(f"wrote {len(images)} images and {grid}")
    return 0


def quiet_libraries(load: bool = False) -> None:
    """Keep the terminal for our own progress: silence library chatter and loading bars.

    Without ``load`` only environment variables and warning filters are set (cheap: a bad
    argument is reported before torch or diffusers is imported); with it, the libraries'
    loggers too (call it right before a command loads models)."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    if not load:
        return
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        for log in (dlog, tlog):
            log.set_verbosity_error()
            log.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command != "train":
            quiet_libraries(load=True)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command in ("eval", "report", "sweep"):
            if args.command == "eval":
                from tdpo.evalcli import run_eval

                return run_eval(args)
            if args.command == "report":
                from tdpo.report import run_report

                return run_report(args)
            from tdpo.sweep import run_sweep

            return run_sweep(args)
        if args.command == "bench":
            from tdpo.bench import run_bench

            return run_bench(args)
        if args.command == "world":
            from tdpo.world.cli import run_world

            return run_world(args)
        parser.print_help()
        return 2
    except UsageError as exc:
        print(f"tdpo: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"tdpo: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("tdpo: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    code = main(sys.argv[1:])
    if code in (130, 143):
        # Stopped by a signal and the checkpoint is safe: a further Ctrl-C during interpreter
        # shutdown exits at once instead of printing a traceback from an exit hook.
        signal.signal(signal.SIGINT, lambda *_: _exit_now(code))
    sys.exit(code)


def _exit_now(code: int) -> None:
    os.write(sys.stderr.fileno(), b"tdpo: interrupted\n")
    os._exit(code)


if __name__ == "__main__":
    console_main()
