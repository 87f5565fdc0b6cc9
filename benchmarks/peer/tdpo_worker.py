"""tdpo's DDPO-2 (``--preset ddpo-2``) on the shapes world at the matched settings: builds the
Trainer as ``tdpo train`` does and runs ``--warmup`` + ``--epochs`` epochs
(``Trainer.epoch_step``, what ``tdpo train`` runs per epoch, without its checkpoint and grid
writes), printing per-epoch seconds (whole epoch, sampling, training), UNet passes and peak RSS.
Run with the main venv's python (the driver, compare.py, does); ``--set key=value`` adds
overrides."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


def overrides(extra: list[str]) -> dict:
    out = {
        "model.pretrained": "shapes-world",
        "reward.name": "jpeg_compressibility",
        "reward.panel": [],
        "prompts.train": "shapes",
        "seed": c.SEED,
        "cpu_threads": 1,
        "mixed_precision": "fp32",
        "model.lora_rank": c.LORA_RANK,
        "model.lora_alpha": float(c.LORA_RANK),
        "sample.num_steps": c.STEPS,
        "sample.eta": c.ETA,
        "sample.guidance_scale": c.GUIDANCE,
        "sample.samples_per_epoch": c.SAMPLES,
        "sample.batch_size": c.SAMPLE_BATCH,
        "sample.prompts_per_epoch": c.PROMPTS_PER_EPOCH,
        "train.batch_size": c.TRAIN_BATCH,
        "train.updates_per_epoch": c.UPDATES,
        "train.inner_epochs": 1,
        "train.learning_rate": c.LEARNING_RATE,
        "train.clip_range": c.CLIP_RANGE,
        "train.max_grad_norm": c.MAX_GRAD_NORM,
        "train.cfg": True,
        "train.normalization": "per_prompt",
        "train.norm_buffer_size": c.NORM_BUFFER,
        "train.norm_min_count": c.NORM_MIN_COUNT,
        "eval.every": 0,
        "log.tensorboard": False,
        "log.progress": False,
        "log.grid_every": 0,
    }
    for item in extra:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)  # as tdpo train --set parses it
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    c.shapes_prompts()  # puts src/ on sys.path
    import diffusers
    import peft

    from tdpo.config import build_config
    from tdpo.trainers.loop import Trainer

    config = build_config(
        "ddpo-2", None, overrides([*args.set, f"train.epochs={args.warmup + args.epochs}"])
    )
    run_dir = Path(tempfile.mkdtemp(prefix="tdpo-ddpo2-")) / "run"
    trainer = Trainer(config, run_dir, log=lambda _m: None)
    counter = c.PassCounter(c.find_unet(trainer.unet))
    epochs = []
    for epoch in range(args.warmup + args.epochs):
        counter.take()
        seconds, metrics = c.timed(lambda: trainer.epoch_step(epoch))  # noqa: B023
        row = {
            "seconds": seconds,
            "seconds_sample": metrics["seconds_sample"],
            "seconds_train": metrics["seconds_train"],
            **counter.take(),
            "updates": trainer.schedule.updates_per_epoch,
        }
        if epoch >= args.warmup:
            epochs.append(row)
    lora = sum(p.numel() for p in trainer.unet.parameters() if p.requires_grad)
    c.report(
        "tdpo",
        epochs,
        {
            "peak_rss_mib": c.peak_rss_mib(),
            "lora_parameters": lora,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "peft": peft.__version__,
            },
            "threads": torch.get_num_threads(),
            "overrides": args.set,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
