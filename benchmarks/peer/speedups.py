"""Faster by design? (item 3 of issue 15): channels-last, bf16 autocast and ``torch.compile``
of the shapes-world LoRA UNet against plain fp32, per guided sampling pass (batch 8 doubled for
CFG, no grad) and per training pass (batch 4 doubled, forward + backward), alternating rounds in
one process, one thread; with each variant's largest deviation from fp32 on the same inputs
(noise prediction, and the LoRA gradient relative to its norm).

    python benchmarks/peer/speedups.py --rounds 5 [--compile]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = c.rounds_parser(__doc__, repeats=5, repeats_help="passes per timing")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    args = parser.parse_args(argv)
    _, policy = c.shapes_policy()
    unet = policy.unet
    c.perturb_lora(unet)
    prompts = c.shapes_prompts()[: c.SAMPLE_BATCH]
    pos, _ = policy.encode_prompts(prompts)
    neg, _ = policy.negative_embeds(len(prompts))
    shape = (c.SAMPLE_BATCH, *policy.noise_shape[1:])
    x = torch.randn(shape)
    t = torch.full((2 * c.SAMPLE_BATCH,), 500)
    cond = torch.cat([neg, pos])
    xs = torch.cat([x, x])
    h = c.TRAIN_BATCH
    xt = torch.cat([x[:h], x[:h]])
    tt = t[: 2 * h]
    condt = torch.cat([neg[:h], pos[:h]])
    lora = [p for p in unet.parameters() if p.requires_grad]

    def variant(memory_format=torch.contiguous_format, autocast=False, model=unet):
        def ctx():
            if autocast:
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def sample():
            with torch.no_grad(), ctx():
                return model(xs.to(memory_format=memory_format), t, cond).sample.float()

        def train():
            for p in lora:
                p.grad = None
            with ctx():
                out = model(xt.to(memory_format=memory_format), tt, condt).sample.float()
            (out**2).mean().backward()
            return torch.cat([p.grad.flatten() for p in lora])

        return sample, train

    variants = {
        "fp32": (lambda: None, variant()),
        "channels_last": (
            lambda: unet.to(memory_format=torch.channels_last),
            variant(torch.channels_last),
        ),
        "bf16_autocast": (lambda: None, variant(autocast=True)),
    }
    if args.compile:
        compiled = torch.compile(unet)
        variants["compile"] = (lambda: None, variant(model=compiled))

    ref_sample, ref_grad = None, None
    deviations = {}
    for name, (setup, (sample, train)) in variants.items():
        unet.to(memory_format=torch.contiguous_format)
        setup()
        start = time.perf_counter()
        s, g = sample(), train()  # warm-up (compiles)
        first = time.perf_counter() - start
        if ref_sample is None:
            ref_sample, ref_grad = s, g
        deviations[name] = {
            "sample_max_abs": float((s - ref_sample).abs().max()),
            "grad_rel": float((g - ref_grad).norm() / ref_grad.norm()),
            "first_call_s": first,
        }
    times = {name: {"sample": [], "train": []} for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            setup, (sample, train) = variants[name]
            unet.to(memory_format=torch.contiguous_format)
            setup()
            for phase, fn in (("sample", sample), ("train", train)):
                start = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                times[name][phase].append((time.perf_counter() - start) / args.repeats)
    print(f"per pass, median of {args.rounds} alternating rounds; ratio to fp32 (range):")
    for name in names:
        cells = []
        for phase in ("sample", "train"):
            ratios = [a / b for a, b in zip(times[name][phase], times["fp32"][phase])]
            cells.append(
                f"{phase} {statistics.median(times[name][phase]) * 1e3:6.1f} ms "
                f"x{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )
        d = deviations[name]
        print(
            f"  {name:<14} "
            + " | ".join(cells)
            + f" | max |eps - eps_fp32| {d['sample_max_abs']:.2e}, grad rel. diff "
            f"{d['grad_rel']:.2e}, first call {d['first_call_s']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
