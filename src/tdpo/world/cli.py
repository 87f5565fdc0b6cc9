"""``tdpo world pretrain | evaluate``: the shapes world's commands.

``tdpo.cli`` calls :func:`add_world_parser` to add the ``world`` subcommand and
:func:`run_world` to run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tdpo.world import WEIGHTS_DIR


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``world`` with ``pretrain`` and ``evaluate`` to an argparse subparsers object."""
    world = subparsers.add_parser(
        "world",
        help="the embedded shapes world: pre-train it, evaluate it",
        description="The embedded shapes world (docs/shapes_world.md).",
    )
    sub = world.add_subparsers(dest="world_command", metavar="{pretrain,evaluate}")
    pre = sub.add_parser(
        "pretrain",
        help="pre-train the base model, tiny CLIP and learned rewards (resumable)",
        description="Run the pre-training stages (data, vae, unet, clip, rewards, report) into "
        "OUT; stages already finished there are skipped, interrupted ones resume from their "
        "last checkpoint. Figures go to OUT/world_report.json. Copy OUT/pipeline, OUT/clip and "
        "OUT/rewards into src/tdpo/world/weights/ to ship them.",
    )
    pre.add_argument(
        "--family",
        choices=("sd", "flow"),
        default="sd",
        help="sd (default): the StableDiffusionPipeline world; flow: a tiny "
        "StableDiffusion3Pipeline (rectified flow) on the shipped SD world's VAE, tokenizer, "
        "data, tiny CLIP and rewards (stages latents, transformer, report; "
        "figures in OUT/flow_report.json; ship OUT/pipeline as src/tdpo/world/weights/flow)",
    )
    pre.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default: ./shapes_world, ./shapes_world_flow for --family flow)",
    )
    pre.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every step and sample count (0.01: a smoke run in seconds)",
    )
    pre.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pre.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 "
        "threads ran several times slower)",
    )
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    ev = sub.add_parser(
        "evaluate",
        help="print the world's figures (base-model gold, reward correlations, CLIP retrieval)",
    )
    ev.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="weights directory with pipeline/, clip/, rewards/ (default: the shipped weights)",
    )
    ev.add_argument(
        "--samples", type=int, default=256, help="base-model samples per prompt set (default 256)"
    )
    ev.add_argument(
        "--family",
        choices=("sd", "flow"),
        default="sd",
        help="flow: evaluate the flow world's StableDiffusion3Pipeline (--model: its folder; "
        "default: the shipped shapes-flow) with the shipped tiny CLIP and rewards",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    ev.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    world.set_defaults(world_parser=world)
    return world


def _print_report(report: dict) -> None:
    print("shapes world figures")
    s = report.get("sampler", {})
    if "ode" in s:  # the flow world
        o, d = s["ode"], s["sde"]
        print(
            f"  sampler: the pipeline's {o['steps']} Euler steps, guidance {o['guidance']} "
            f"(gold); tdpo's SDE, noise level {d['noise_level']} (gold_sde)"
        )
    else:
        print(
            f"  sampler: {s.get('steps')} DDIM steps, guidance {s.get('guidance')}, "
            f"eta {s.get('eta')}"
        )
    golds = [(f"gold {k}", v) for k, v in report.get("gold", {}).items()]
    golds += [(f"gold_sde {k}", v) for k, v in report.get("gold_sde", {}).items()]
    for name, g in golds:
        print(
            f"  {name:16s} n={g.get('n')}: alignment {g['alignment']:.3f} "
            f"(shape {g['shape']:.2f} colour {g['colour']:.2f} size {g['size']:.2f} "
            f"background {g['background']:.2f}), aesthetic {g['aesthetic']:.3f}, "
            f"gold {g['gold']:.3f}"
        )
    r = report.get("clip_retrieval", {})
    if r:
        print(
            f"  tiny CLIP image->caption top-1 over {r['n_captions']} captions: "
            f"{r['top1_all']:.3f} (unseen combinations {r['top1_unseen_combos']:.3f})"
        )
    for name, c in report.get("rewards", {}).items():
        print(
            f"  {name:20s} labels {c.get('labels')}, vs gold {c.get('gold_target')}: "
            f"pearson base seen {c.get('pearson_base_seen'):.3f}, "
            f"unseen {c.get('pearson_base_unseen'):.3f}, clean {c.get('pearson_clean'):.3f}"
        )
    for name, h in report.get("pixel_hack", {}).items():
        target = ""
        if h["target"] != "gold":
            target = f"gold {h['target']} {h['target_before']:.3f} -> {h['target_after']:.3f}, "
        print(
            f"  pixel-space ascent on {name}: reward {h['reward_before']:.3f} -> "
            f"{h['reward_after']:.3f}, {target}gold {h['gold_before']:.3f} -> {h['gold_after']:.3f}"
        )
    sizes = report.get("sizes_bytes", {})
    if sizes:
        print("  sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    if "pretraining_seconds" in report:
        print(f"  pre-training wall time: {report['pretraining_seconds']:.0f} s")


def run_world(args: argparse.Namespace) -> int:
    """Run ``tdpo world ...``; returns the exit code."""
    import torch  # deferred: tdpo.cli imports this module at start-up (add_world_parser)

    cmd = getattr(args, "world_command", None)
    if cmd is None:
        args.world_parser.print_help()
        return 2
    torch.set_num_threads(max(1, args.threads))
    if cmd == "pretrain" and args.family == "flow":
        from tdpo.world.flow_pretrain import run_flow_pretrain  # deferred: imports torch

        out = Path(args.out or "shapes_world_flow")
        t0 = time.time()
        run_flow_pretrain(
            out, args.steps_scale, args.seed, quiet=args.quiet, num_threads=max(1, args.threads)
        )
        report_path = out / "flow_report.json"
        print(
            f"[world] flow pre-training finished in {time.time() - t0:.1f} s; figures in "
            f"{report_path}"
        )
        if report_path.exists() and not args.quiet:
            _print_report(json.loads(report_path.read_text()))
        return 0
    if cmd == "pretrain":
        from tdpo.world.pretrain import run_pretrain  # deferred: imports torch

        args.out = args.out or "shapes_world"
        t0 = time.time()
        run_pretrain(
            args.out,
            args.steps_scale,
            args.seed,
            quiet=args.quiet,
            num_threads=max(1, args.threads),
        )
        print(
            f"[world] pre-training finished in {time.time() - t0:.1f} s; figures in "
            f"{Path(args.out) / 'world_report.json'}"
        )
        report_path = Path(args.out) / "world_report.json"
        if report_path.exists() and not args.quiet:
            _print_report(json.loads(report_path.read_text()))
        return 0
    if cmd == "evaluate":
        from tdpo.world.evaluate import evaluate_world  # deferred: imports torch

        if args.family == "flow":
            from tdpo.world import FLOW_PIPELINE_DIR
            from tdpo.world.flow_pretrain import evaluate_flow_world

            folder = Path(args.model) if args.model else FLOW_PIPELINE_DIR
            if not (folder / "model_index.json").is_file():
                print(
                    f"tdpo world evaluate: --model {folder}: no model_index.json there; give the "
                    "flow world's pipeline folder (OUT/pipeline of --family flow)",
                    file=sys.stderr,
                )
                return 2
            report = evaluate_flow_world(folder, n=args.samples, seed=args.seed)
        else:
            root = Path(args.model) if args.model else WEIGHTS_DIR
            if not (root / "pipeline").is_dir():
                print(f"tdpo world evaluate: no pipeline/ under {root}", file=sys.stderr)
                return 2
            report = evaluate_world(root, n=args.samples, seed=args.seed)
        _print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True))
        return 0
    return 2
