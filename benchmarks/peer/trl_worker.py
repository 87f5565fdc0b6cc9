"""TRL's DDPOTrainer (trl 0.23.1) on the shapes-world pipeline at the matched settings: runs
``--warmup`` + ``--epochs`` epochs (``trainer.step``) and prints per-epoch seconds (whole step,
sampling, training), UNet passes and peak RSS. Run with benchmarks/peer/.venv's python (the
driver, compare.py, does)."""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402
import torch  # noqa: E402


def jpeg_reward():
    """tdpo's ``jpeg_compressibility`` (negative JPEG size in kB), imported from src/."""
    from tdpo.rewards.builtin import jpeg_compressibility

    return jpeg_compressibility()


def grouped_prompt_fn(prompts: list[str], per_prompt: int, seed: int):
    """TRL calls ``prompt_fn()`` once per sample, in order: each drawn prompt is returned
    ``per_prompt`` times in a row (the same 8 prompts x 4 samples grouping as tdpo)."""
    rng = random.Random(seed)
    state = {"left": 0, "prompt": ""}

    def prompt_fn():
        if state["left"] == 0:
            state["prompt"], state["left"] = rng.choice(prompts), per_prompt
        state["left"] -= 1
        return state["prompt"], {}

    return prompt_fn


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import diffusers
    import peft
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    c.shapes_prompts()  # puts src/ on sys.path
    from tdpo.world import PIPELINE_DIR

    minibatches = c.SAMPLES // c.TRAIN_BATCH
    accumulation = minibatches // c.UPDATES  # minibatches per optimizer step (x 20 timesteps)
    logdir = tempfile.mkdtemp(prefix="trl-ddpo-")
    config = DDPOConfig(
        num_epochs=args.warmup + args.epochs,
        seed=c.SEED,
        mixed_precision="no",
        log_with=None,
        logdir=logdir,
        project_kwargs={"project_dir": logdir},
        save_freq=10**9,  # no checkpoints (tdpo's side writes none either)
        sample_num_steps=c.STEPS,
        sample_eta=c.ETA,
        sample_guidance_scale=c.GUIDANCE,
        sample_batch_size=c.SAMPLE_BATCH,
        sample_num_batches_per_epoch=c.SAMPLES // c.SAMPLE_BATCH,
        train_batch_size=c.TRAIN_BATCH,
        train_gradient_accumulation_steps=accumulation,
        train_learning_rate=c.LEARNING_RATE,
        train_adam_beta1=0.9,
        train_adam_beta2=0.999,
        train_adam_weight_decay=1e-4,
        train_adam_epsilon=1e-8,
        train_max_grad_norm=c.MAX_GRAD_NORM,
        train_num_inner_epochs=1,
        train_cfg=True,
        train_clip_range=c.CLIP_RANGE,
        train_timestep_fraction=1.0,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=c.NORM_BUFFER,
        per_prompt_stat_tracking_min_count=c.NORM_MIN_COUNT,
        async_reward_computation=False,
        train_use_8bit_adam=False,
    )
    from accelerate import PartialState

    PartialState()  # DDPOTrainer logs (no image hook) before it makes its Accelerator
    pipeline = DefaultDDPOStableDiffusionPipeline(str(PIPELINE_DIR), use_lora=True)
    pipeline.sd_pipeline.set_progress_bar_config(disable=True)
    trainer = DDPOTrainer(
        config,
        jpeg_reward(),
        grouped_prompt_fn(c.shapes_prompts(), c.SAMPLES // c.PROMPTS_PER_EPOCH, c.SEED),
        pipeline,
    )
    counter = c.PassCounter(c.find_unet(pipeline.unet))
    phases: dict[str, float] = {}

    def timed_method(name: str):
        inner = getattr(trainer, name)

        def wrapper(*a, **k):
            seconds, out = c.timed(lambda: inner(*a, **k))
            phases[name] = phases.get(name, 0.0) + seconds
            return out

        setattr(trainer, name, wrapper)

    timed_method("_generate_samples")
    timed_method("_train_batched_samples")
    epochs, global_step = [], 0
    for epoch in range(args.warmup + args.epochs):
        phases.clear()
        counter.take()
        seconds, global_step = c.timed(lambda: trainer.step(epoch, global_step))  # noqa: B023
        row = {
            "seconds": seconds,
            "seconds_sample": phases["_generate_samples"],
            "seconds_train": phases["_train_batched_samples"],
            **counter.take(),
            "updates": global_step,
        }
        if epoch >= args.warmup:
            epochs.append(row)
    lora = sum(p.numel() for p in pipeline.unet.parameters() if p.requires_grad)
    c.report(
        "trl",
        epochs,
        {
            "peak_rss_mib": c.peak_rss_mib(),
            "lora_parameters": lora,
            "versions": {
                "trl": trl.__version__,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "peft": peft.__version__,
            },
            "threads": torch.get_num_threads(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
