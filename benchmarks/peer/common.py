"""What both workers of the peer benchmark share: the matched settings, the UNet pass counter
and the report line; and the start of the one-process measurements (pass_profile.py,
speedups.py). Imports only torch and the standard library at import time (it runs in both
venvs); tdpo only inside the functions that need it, from src/."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The matched settings (README.md in this folder says what each maps to on each side).
STEPS = 20
ETA = 1.0
GUIDANCE = 4.0
SAMPLES = 32
SAMPLE_BATCH = 8
TRAIN_BATCH = 4
UPDATES = 2  # optimizer steps per epoch: 8 minibatches x 20 steps = 160 passes, 80 per step
PROMPTS_PER_EPOCH = 8  # 8 prompts x 4 samples (tdpo's default grouping at 32 samples)
LORA_RANK = 4
LEARNING_RATE = 1e-3
CLIP_RANGE = 1e-2
MAX_GRAD_NORM = 1.0
NORM_BUFFER = 32
NORM_MIN_COUNT = 16
SEED = 0


class PassCounter:
    """Counts the UNet's forward calls (a forward pre-hook on the UNet2DConditionModel) and the
    rows they carry, split into sampling (no grad) and training (grad) passes."""

    def __init__(self, unet):
        self.counts = {"sample": 0, "train": 0}
        self.rows = {"sample": 0, "train": 0}
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        kind = "train" if torch.is_grad_enabled() else "sample"
        sample = args[0] if args else kwargs["sample"]
        self.counts[kind] += 1
        self.rows[kind] += int(sample.shape[0])

    def take(self) -> dict:
        out = {
            "passes_sample": self.counts["sample"],
            "passes_train": self.counts["train"],
            "rows_sample": self.rows["sample"],
            "rows_train": self.rows["train"],
        }
        self.counts = {"sample": 0, "train": 0}
        self.rows = {"sample": 0, "train": 0}
        return out


def find_unet(module):
    """The UNet2DConditionModel inside a (LoRA-, accelerate-) wrapped module."""
    for sub in module.modules():
        if type(sub).__name__ == "UNet2DConditionModel":
            return sub
    raise RuntimeError("no UNet2DConditionModel found")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shapes_prompts() -> list[str]:
    """The shapes world's seen prompts (tdpo's ``prompts.train=shapes``)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from tdpo.world.generator import seen_prompts

    return seen_prompts()


def rounds_parser(doc: str, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """The command line of a one-process measurement: ``--rounds`` (alternating rounds, 5) and
    ``--repeats`` (``repeats_help``, ``repeats`` by default); described by ``doc``'s first
    paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    return parser


def shapes_policy(**sample):
    """tdpo's policy on the shapes world's pipeline (fp32, with tdpo's LoRA on its UNet) at the
    matched steps, eta and guidance (``sample``: other SampleConfig fields), with torch on one
    thread and warnings off. Returns (pipeline, policy)."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    shapes_prompts()  # puts src/ on sys.path
    from tdpo.config import ModelConfig, SampleConfig
    from tdpo.policy import load_pipeline, make_policy
    from tdpo.world import PIPELINE_DIR

    pipe = load_pipeline(str(PIPELINE_DIR), dtype=torch.float32)
    sample_cfg = SampleConfig(num_steps=STEPS, eta=ETA, guidance_scale=GUIDANCE, **sample)
    return pipe, make_policy(pipe, ModelConfig(pretrained=str(PIPELINE_DIR)), sample_cfg)


def perturb_lora(unet, seed: int = 0) -> None:
    """Give every trainable (LoRA) factor N(0, 0.02) weights: B starts at 0, and with B = 0 the
    gradients of A vanish, so a gradient comparison would not be general."""
    import torch

    torch.manual_seed(seed)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def report(side: str, epochs: list[dict], extra: dict) -> None:
    """The worker's result: one JSON line on stdout, prefixed so the driver can find it."""
    print("PEER-RESULT " + json.dumps({"side": side, "epochs": epochs, **extra}), flush=True)
