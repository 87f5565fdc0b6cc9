"""Shared fixtures: tiny models built from configs once per session (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # robust when the 2 cores are shared (see docs/performance.md)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_clip

    path = tmp_path_factory.mktemp("tiny") / "clip"
    build_tiny_clip(path)
    return path


def tiny_overrides(pipeline_dir, clip_dir, **extra) -> dict:
    """A TDPO config small enough for a CPU test: 8 samples, 4 steps."""
    overrides = {
        "model.pretrained": str(pipeline_dir),
        "critic.backbone": str(clip_dir),
        "reward.name": "jpeg_compressibility",
        "reward.panel": [],
        "prompts.train": "simple_animals",
        "eval.every": 0,
        "sample.num_steps": 4,
        "sample.batch_size": 4,
        "sample.samples_per_epoch": 8,
        "sample.prompts_per_epoch": 0,
        "sample.guidance_scale": 3.0,
        "train.batch_size": 2,
        "train.epochs": 2,
        "train.norm_min_count": 2,
        "train.norm_buffer_size": 4,
        "critic.embed_batch_size": 16,
        "log.tensorboard": False,
        "log.progress": False,
        "reset.stats_batch_size": 32,
    }
    overrides.update(extra)
    return overrides


def as_set_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list):
            value = "[" + ",".join(map(str, value)) + "]"
        args += ["--set", f"{key}={value}"]
    return args
