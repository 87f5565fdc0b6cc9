"""``tdpo train``: build a config from presets, a YAML file and ``--set`` overrides, then
:func:`tdpo.run.train` (or ``--dry-run``: print the config, schedule and memory estimate)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tdpo.config import (
    PRESETS,
    build_config,
    config_to_yaml,
    fields_help,
    parse_override,
    resolve_schedule,
)
from tdpo.errors import UsageError
from tdpo.run import default_run_dir, num_processes, resume_config, train

TRAIN_EPILOG = """\
Configuration is layered: defaults <- --preset <- --config FILE.yaml <- --model/--reward/
--output-dir <- --set key=value (repeatable). Values of --set are YAML (numbers, true/false,
lists like [a, b]).

Presets (repeatable, applied in order): {presets}
  tdpo, tdpo-r, ddpo-2, ddpo-100, grpo, alignprop choose the method; sd14-aesthetic, sd14-pickscore,
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


def add_train_parser(sub) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train",
        help="fine-tune a diffusion pipeline (TDPO, TDPO-R, DDPO, GRPO, AlignProp)",
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
    train.set_defaults(func=run_train)
    return train


def config_from_args(args: argparse.Namespace):
    """(config, run directory) from the command line; a resume keeps the run's own config."""
    overrides = dict(parse_override(text) for text in args.overrides)
    for flag, key in (
        ("model", "model.pretrained"),
        ("reward", "reward.name"),
        ("output_dir", "output_dir"),
    ):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.resume:
        if args.preset or args.config:
            raise UsageError(
                "--resume",
                args.resume,
                "a resumed run keeps its own config; drop --preset/--config",
            )
        return resume_config(args.resume, overrides), Path(args.resume)
    config = build_config(args.preset, args.config, overrides)
    return config, default_run_dir(config, "-".join(args.preset) if args.preset else None)


def run_train(args: argparse.Namespace) -> int:
    config, run_dir = config_from_args(args)
    if args.dry_run:
        return dry_run(config, run_dir)
    return train(config, run_dir, resume=bool(args.resume), quiet=True)


def dry_run(config, run_dir: Path) -> int:
    from tdpo.estimate import estimate_memory  # deferred: imports torch

    sch = resolve_schedule(config, num_processes())
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
    for line in estimate_memory(config, sch.samples_per_process, on_gpu=_cuda_available()):
        print(line)
    return 0


def _cuda_available() -> bool:
    import torch  # deferred: --help and bad arguments stay fast

    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x")) and torch.cuda.is_available()
