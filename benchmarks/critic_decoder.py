"""The critic's cheap decoder on the shapes world: train a tiny AutoencoderTiny decoder, then
measure valuing with it against the VAE, side by side in one run.

1. **Train** (``--train-steps``, 600): an ``AutoencoderTiny`` (TAESD's architecture at shapes size:
   16 channels, one block per level, 4x upsampling as the world's VAE) whose decoder is distilled
   from the shapes world's VAE decoder: inputs are the pipeline's latents (the VAE's encoding of
   generator images times its scaling factor, and the same mixed with Gaussian noise at a random
   DDPM level, so noisy states decode too), targets the VAE's decoded images. Held-out error
   against the VAE's images is printed (PSNR, images in [0, 1]). Saved to ``--decoder-dir``.
2. **Decode cost**: one batch of ``critic.embed_batch_size`` (64) latents decoded by each,
   alternating, ``--rounds`` rounds; median seconds and ratio.
3. **Training runs** (``--epochs``, default 4): ``tdpo train`` on the shapes world (its
   default TDPO-R with the x0 critic), ``eval.every=0``, one thread, once with
   ``critic.decoder=vae`` and once with ``critic.decoder=tiny``, one after the other (the order
   alternates with ``--runs 2``); per epoch ``seconds_value`` (decode + embed + critic
   statistics), ``seconds``, ``critic_ev`` and ``reward_mean`` from metrics.jsonl.

Run from the repository root with the project's venv (one torch thread; a few minutes)::

    OMP_NUM_THREADS=1 python benchmarks/critic_decoder.py --out critic_decoder.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TINY_SHAPES_AE = {  # TAESD's layout at the shapes world's size (32x32 images, 4x8x8 latents)
    "latent_channels": 4,
    "encoder_block_out_channels": (16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16),
    "num_encoder_blocks": (1, 1, 1),
    "num_decoder_blocks": (1, 1, 1),
    "scaling_factor": 1.0,  # as TAESD: it decodes the pipeline's (scaled) latents directly
}


def vae_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's images in [0, 1] of pipeline latents (as ``DiffusionPolicy.decode``)."""
    with torch.no_grad():
        out = vae.decode(latents / vae.config.scaling_factor).sample
    return (out / 2 + 0.5).clamp(0, 1)


def training_latents(vae, scheduler, n: int, seed: int) -> torch.Tensor:
    """Pipeline latents of ``n`` generator images, half of them mixed with noise at a random
    DDPM level (the states an image critic sees)."""
    from tdpo.world.generator import generate

    images, _, _ = generate(n, seed=seed)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    noisy = alpha.sqrt() * z + (1 - alpha).sqrt() * torch.randn(z.shape, generator=g)
    half = n // 2
    return torch.cat([z[:half], noisy[half:]])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def train_tiny_decoder(pipeline_dir: str, out_dir: Path, steps: int, log=print) -> dict:
    """Distil an AutoencoderTiny decoder from the pipeline's VAE; save it to ``out_dir``."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler

    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
    start = time.perf_counter()
    latents = training_latents(vae, scheduler, 4096, seed=0)
    held = training_latents(vae, scheduler, 512, seed=1)
    targets = torch.cat([vae_images(vae, c) for c in latents.split(256)])
    held_targets = vae_images(vae, held)
    torch.manual_seed(0)
    tiny = AutoencoderTiny(**TINY_SHAPES_AE)
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(2)

    def decode(z):
        return (tiny.decode(z / tiny.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    for step in range(steps):
        idx = torch.randint(0, len(latents), (64,), generator=g)
        loss = torch.nn.functional.mse_loss(decode(latents[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  tiny decoder step {step + 1}/{steps}: mse {loss.item():.5f}")
    with torch.no_grad():
        pred = decode(held)
    half = len(held) // 2
    report = {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "psnr_clean": psnr(pred[:half], held_targets[:half]),
        "psnr_noisy": psnr(pred[half:], held_targets[half:]),
        "decoder_parameters": sum(p.numel() for p in tiny.decoder.parameters()),
        "vae_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters())
        + sum(p.numel() for p in vae.post_quant_conv.parameters()),
    }
    tiny.save_pretrained(out_dir)
    return report


def decode_cost(pipeline_dir: str, decoder_dir: Path, batch: int, rounds: int) -> dict:
    """Median seconds of one batch decoded by the VAE and by the tiny decoder, alternating."""
    from diffusers import AutoencoderKL

    from tdpo.critic import load_tiny_decoder

    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae").eval()
    tiny = load_tiny_decoder(str(decoder_dir), vae.config.latent_channels, "cpu")
    z = torch.randn(batch, vae.config.latent_channels, 8, 8)
    fns = {"vae": lambda: vae_images(vae, z), "tiny": lambda: tiny(z)}
    times: dict[str, list[float]] = {"vae": [], "tiny": []}
    with torch.no_grad():
        for name in fns:  # warm-up
            fns[name]()
        for r in range(rounds):
            for name in ("vae", "tiny") if r % 2 == 0 else ("tiny", "vae"):
                t0 = time.perf_counter()
                for _ in range(5):
                    fns[name]()
                times[name].append((time.perf_counter() - t0) / 5)
    ratios = sorted(t / v for t, v in zip(times["tiny"], times["vae"]))
    return {
        "batch": batch,
        "vae_s": statistics.median(times["vae"]),
        "tiny_s": statistics.median(times["tiny"]),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [ratios[0], ratios[-1]],
    }


def train_run(decoder: str, decoder_dir: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    """One ``tdpo train`` run on the shapes world; per-epoch figures from its metrics.jsonl."""
    name = f"decoder-{decoder}"
    args = [
        sys.executable,
        "-m",
        "tdpo.cli",
        "train",
        "--output-dir",
        str(out),
        "--set",
        f"run_name={name}",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "eval.every=0",
        "--set",
        "cpu_threads=1",
        "--set",
        "log.tensorboard=false",
        "--set",
        "log.progress=false",
        "--set",
        f"critic.decoder={decoder}",
        "--set",
        f"critic.tiny_decoder={decoder_dir}",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tdpo train ({decoder}) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("epoch", 0) >= 1 and "seconds_value" in r]
    keys = ("seconds", "seconds_sample", "seconds_value", "seconds_train", "critic_ev")
    return {
        "wall_s": wall,
        "epochs": [{k: r.get(k) for k in ("epoch", *keys, "reward_mean")} for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="pipeline folder (the shapes world)")
    parser.add_argument("--decoder-dir", default=None, help="where the tiny decoder is saved")
    parser.add_argument("--train-steps", type=int, default=600, help="0: reuse --decoder-dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="pairs of training runs")
    parser.add_argument("--rounds", type=int, default=7, help="decode-cost rounds")
    parser.add_argument("--set", action="append", default=[], help="extra tdpo train --set")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from tdpo.world import PIPELINE_DIR

    pipeline_dir = args.pipeline or str(PIPELINE_DIR)
    work = Path(tempfile.mkdtemp(prefix="critic-decoder-"))
    decoder_dir = Path(args.decoder_dir or work / "taesd-shapes")
    result: dict = {"settings": vars(args) | {"pipeline": pipeline_dir}}
    if args.train_steps > 0:
        print(f"training a tiny decoder ({args.train_steps} steps) -> {decoder_dir}", flush=True)
        result["tiny_decoder"] = train_tiny_decoder(pipeline_dir, decoder_dir, args.train_steps)
        t = result["tiny_decoder"]
        print(
            f"tiny decoder: {t['decoder_parameters']} parameters (VAE decoder "
            f"{t['vae_decoder_parameters']}), held-out PSNR vs the VAE's images: clean "
            f"{t['psnr_clean']:.1f} dB, noisy states {t['psnr_noisy']:.1f} dB, "
            f"{t['seconds']:.0f} s",
            flush=True,
        )
    cost = decode_cost(pipeline_dir, decoder_dir, 64, args.rounds)
    result["decode_cost"] = cost
    print(
        f"decode 64 latents: vae {cost['vae_s'] * 1e3:.1f} ms, tiny {cost['tiny_s'] * 1e3:.1f} ms, "
        f"tiny/vae {cost['ratio_median']:.3f} ({cost['ratio_range'][0]:.3f}-"
        f"{cost['ratio_range'][1]:.3f}, {args.rounds} rounds)",
        flush=True,
    )
    extra = [x for kv in args.set for x in ("--set", kv)]
    runs: dict[str, list[dict]] = {"vae": [], "tiny": []}
    for r in range(args.runs):
        for decoder in ("vae", "tiny") if r % 2 == 0 else ("tiny", "vae"):
            print(f"tdpo train, critic.decoder={decoder}, {args.epochs} epochs", flush=True)
            runs[decoder].append(
                train_run(decoder, decoder_dir, work / f"r{r}", args.epochs, extra)
            )
    result["runs"] = runs
    print(format_runs(runs))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


def format_runs(runs: dict[str, list[dict]]) -> str:
    lines = [
        f"{'decoder':<8} {'run':>3} {'epoch':>5} {'seconds':>8} {'sample':>7} {'value':>7} "
        f"{'train':>7} {'critic_ev':>9} {'reward':>7}"
    ]
    for decoder, items in runs.items():
        for i, run in enumerate(items):
            for e in run["epochs"]:
                lines.append(
                    f"{decoder:<8} {i:>3} {e['epoch']:>5} {e['seconds']:8.2f} "
                    f"{e['seconds_sample']:7.2f} {e['seconds_value']:7.2f} "
                    f"{e['seconds_train']:7.2f} {e['critic_ev']:9.3f} {e['reward_mean']:7.3f}"
                )
    medians = {
        d: statistics.median(e["seconds_value"] for run in items for e in run["epochs"])
        for d, items in runs.items()
        if items
    }
    if len(medians) == 2:
        lines.append(
            f"median seconds_value: vae {medians['vae']:.2f}, tiny {medians['tiny']:.2f}, "
            f"tiny/vae {medians['tiny'] / medians['vae']:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
