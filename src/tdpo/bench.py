"""``tdpo bench``: how far sampling and training epochs are from their floors.

Every figure is a **ratio of two things timed in the same process**, alternating (the order
rotates every round so neither side always runs first), over ``--repeats`` rounds after one
warm-up round; the median of the per-round ratios is reported with its range. Absolute seconds
are printed too, but on a shared machine only the ratios mean anything.

- ``sample_vs_pipeline``: :meth:`DiffusionPolicy.sample` (trajectory and log-probs) against
  ``StableDiffusionPipeline.__call__`` on the same UNet, steps, batch, guidance and eta.
- ``<method>_vs_floor``: one ``Trainer.epoch_step`` of DDPO-100, TDPO (image critic) and TDPO
  (latent critic) against the floor: the same count of bare UNet forward passes for sampling
  (batch doubled for classifier-free guidance), forward-and-backward passes for training, one
  final VAE decode per sampling batch and the reward.
- ``tdpo_<input>_vs_ddpo100``: the critic's whole cost.
- peak memory per timed call: RSS high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU.
- scaling: epoch seconds against samples per epoch and against steps, with a straight-line fit
  (intercept share, R^2) and the log-log slope (1.0 = linear).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdpo.config import build_config
from tdpo.errors import UsageError
from tdpo.world import CLIP_DIR, PIPELINE_DIR

# Default sizes: the whole default run stays under about 3 minutes on 2 shared CPU cores.
DEFAULTS = {
    "samples": 8,
    "batch": 8,
    "train_batch": 4,
    "steps": 10,
    "repeats": 5,
    "scale_samples": "4,8,16",
    "scale_steps": "5,10,20",
    "scale_repeats": 3,
}
QUICK = {
    "samples": 2,
    "batch": 2,
    "train_batch": 1,
    "steps": 2,
    "repeats": 2,
    "scale_samples": "2,4",
    "scale_steps": "2,4",
    "scale_repeats": 1,
}
TARGETS = {
    "sample_vs_pipeline": 1.05,
    "ddpo100_vs_floor": 1.3,
    "tdpo_latent_vs_floor": 1.3,
    "tdpo_latent_vs_ddpo100": 1.15,
}


# ---------------------------------------------------------------------------------------------
# Measurement helpers


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of the code between :meth:`reset` and :meth:`peak_mib`.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the resident set's high-water mark
    ``VmHWM`` from ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``
    (Linux); where that fails the mark is the process's lifetime peak (``resettable`` False).
    """

    def __init__(self):
        self.kind = "cuda_max_allocated" if _cuda() else "cpu_rss_hwm"
        self.resettable = True

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def peak_mib(self) -> float | None:
        if self.kind == "cuda_max_allocated":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        kib = _proc_status_kib("VmHWM")
        return None if kib is None else kib / 1024

    def current_mib(self) -> float | None:
        if self.kind == "cuda_max_allocated":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        kib = _proc_status_kib("VmRSS")
        return None if kib is None else kib / 1024


def alternate(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    memory: PeakMemory | None = None,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time each function ``repeats`` times, alternating; the order rotates every round.

    Returns ``{name: {"seconds": [...], "peak_mib": max peak, "base_mib": memory before}}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, dict[str, Any]] = {
        n: {"seconds": [], "peak_mib": None, "base_mib": None} for n in names
    }
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if memory is not None:
                synchronize()
                base = memory.current_mib()
                memory.reset()
            synchronize()
            start = time.perf_counter()
            fns[name]()
            synchronize()
            seconds = time.perf_counter() - start
            entry = out[name]
            entry["seconds"].append(seconds)
            if memory is not None:
                peak = memory.peak_mib()
                if peak is not None:
                    entry["peak_mib"] = max(peak, entry["peak_mib"] or 0.0)
                if base is not None:
                    entry["base_mib"] = base if entry["base_mib"] is None else entry["base_mib"]
        if log is not None:
            log(
                f"  round {r + 1}/{repeats}: "
                + ", ".join(f"{n} {out[n]['seconds'][-1]:.3f}s" for n in names)
            )
    return out


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median (and range) of the per-round ratios of two series timed in the same rounds."""
    ratios = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b x``; R^2; the log-log slope; the intercept's share at min x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mlx, mly = sum(lx) / n, sum(ly) / n
    slxx = sum((v - mlx) ** 2 for v in lx)
    slope = sum((u - mlx) * (v - mly) for u, v in zip(lx, ly)) / slxx if slxx else float("nan")
    x0 = min(xs)
    return {
        "intercept_s": a,
        "per_unit_s": b,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "loglog_slope": slope,
        "intercept_share_at_min": a / (a + b * x0) if (a + b * x0) > 0 else float("nan"),
        "ratio_max_over_min": (max(ys) / min(ys)) if min(ys) > 0 else float("nan"),
        "x_ratio": max(xs) / x0,
    }


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------
# Models and trainers


def resolve_model(spec: str | None, backbone: str | None, tmp: Path) -> tuple[str, str, str]:
    """(pipeline folder or id, critic backbone, label). Default: the shapes world pipeline if it
    has been trained and shipped, else a tiny random pipeline built in ``tmp``."""
    if spec in (None, "auto"):
        if (PIPELINE_DIR / "model_index.json").is_file() and CLIP_DIR.is_dir():
            return str(PIPELINE_DIR), backbone or str(CLIP_DIR), "shapes-world"
        spec = "tiny"
    if spec == "tiny":
        # deferred: torch and diffusers (bench is imported for `tdpo --help`)
        from tdpo.tiny import build_tiny_clip, build_tiny_pipeline

        build_tiny_pipeline(tmp / "tiny-sd")
        build_tiny_clip(tmp / "tiny-clip")
        return str(tmp / "tiny-sd"), backbone or str(tmp / "tiny-clip"), "tiny (random)"
    if backbone is None:
        raise UsageError("--backbone", None, "give the critic backbone for --model " + spec)
    return spec, backbone, spec


def make_trainer(
    model: str,
    backbone: str,
    run_dir: Path,
    method: str,
    *,
    samples: int,
    batch: int,
    train_batch: int,
    steps: int,
    guidance: float,
    eta: float,
    mixed_precision: str = "fp32",
    reward: str = "jpeg_compressibility",
):
    """A Trainer for ``method`` in ddpo100 | tdpo_image | tdpo_latent; nothing logged."""
    from tdpo.trainers.loop import Trainer  # deferred: loads torch and diffusers

    overrides: dict[str, Any] = {
        "model.pretrained": model,
        "critic.backbone": backbone,
        "reward.name": reward,
        "reward.panel": [],
        "mixed_precision": mixed_precision,
        "sample.num_steps": steps,
        "sample.batch_size": batch,
        "sample.samples_per_epoch": samples,
        "sample.guidance_scale": guidance,
        "sample.eta": eta,
        "train.batch_size": train_batch,
        "train.norm_min_count": 2,
        "log.tensorboard": False,
        "log.progress": False,
        "log.grid_every": 0,
        "checkpoint.every": 10**6,
    }
    overrides["sample.prompts_per_epoch"] = 0  # any prompt mix: timing only
    preset = "ddpo-100"
    if method.startswith("tdpo"):
        preset = "tdpo"
        overrides["critic.input"] = method.split("_", 1)[1]
    config = build_config(preset, None, overrides)
    return Trainer(config, run_dir, log=lambda _message: None)


SPLIT_KEYS = ("seconds", "seconds_sample", "seconds_value", "seconds_train")


def epoch_fn(trainer) -> Callable[[], Any]:
    """One ``Trainer.epoch_step`` per call (epochs counted up); ``run.metrics`` keeps each."""
    counter = {"epoch": 0}

    def run():
        metrics = trainer.epoch_step(counter["epoch"])
        run.metrics.append({k: metrics[k] for k in SPLIT_KEYS if k in metrics})
        counter["epoch"] += 1

    run.metrics = []
    return run


def floor_fn(trainer) -> Callable[[], Any]:
    """The epoch's floor: its bare UNet passes, one final decode per batch and the reward."""
    import torch

    cfg, sch, policy, acc = trainer.config, trainer.schedule, trainer.policy, trainer.accelerator
    unet = trainer.unet
    T = cfg.sample.num_steps
    base = policy.unet.config
    shape = (base.in_channels, base.sample_size, base.sample_size)
    device = trainer.device
    prompts = (trainer.prompts * cfg.sample.batch_size)[: cfg.sample.batch_size]
    policy.scheduler.set_timesteps(T, device=device)
    timesteps = policy.scheduler.timesteps.clone()
    embeds, _ = policy.encode_prompts(prompts)
    negative, _ = policy.negative_embeds(len(prompts))
    use_cfg = policy.use_cfg
    s_ctx = torch.cat([negative, embeds]) if use_cfg else embeds
    mb = cfg.train.batch_size
    train_cfg = cfg.train.cfg and use_cfg
    t_ctx = torch.cat([negative[:mb], embeds[:mb]]) if train_cfg else embeds[:mb]
    passes = sch.minibatches * T * cfg.train.inner_epochs
    meta = [{} for _ in prompts]
    dtype = next(unet.parameters()).dtype

    def run():
        unet.eval()
        with torch.no_grad(), acc.autocast():
            for _ in range(sch.sample_batches):
                x = torch.randn(len(prompts), *shape, device=device)
                for t in timesteps:
                    xin = torch.cat([x, x]) if use_cfg else x
                    _ = unet(xin.to(dtype), t.expand(len(xin)), s_ctx.to(dtype)).sample
                images = policy.decode(x)
                trainer.reward_fn(images, prompts, meta)
        unet.train()
        x = torch.randn(mb, *shape, device=device)
        xin = torch.cat([x, x]) if train_cfg else x
        tt = timesteps[:1].expand(len(xin))
        for _ in range(passes):
            with acc.autocast():
                out = unet(xin.to(dtype), tt, t_ctx.to(dtype)).sample
                loss = out.float().square().mean()
            acc.backward(loss)
        unet.zero_grad(set_to_none=True)

    return run


# ---------------------------------------------------------------------------------------------
# The parts


def bench_sampling(trainer, repeats: int, memory: PeakMemory, log) -> dict[str, Any]:
    """DiffusionPolicy.sample against the pipeline's own __call__, same UNet and settings."""
    import torch

    from tdpo.sampling import sample_noise  # deferred: imports torch

    cfg, policy = trainer.config, trainer.policy
    pipe = policy.pipe
    batch, T = cfg.sample.batch_size, cfg.sample.num_steps
    prompts = (trainer.prompts * batch)[:batch]
    noise = sample_noise(list(range(batch)), policy.noise_shape).to(trainer.device)

    def ours():
        with trainer.accelerator.autocast():
            policy.sample(trainer.unet, prompts, noise)

    def pipeline():
        with trainer.accelerator.autocast():
            pipe(
                prompt=prompts,
                num_inference_steps=T,
                guidance_scale=cfg.sample.guidance_scale,
                eta=cfg.sample.eta,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            )

    times = alternate({"policy_sample": ours, "pipeline_call": pipeline}, repeats, memory, log=log)
    return {
        "times": times,
        "ratio": paired_ratio(times["policy_sample"]["seconds"], times["pipeline_call"]["seconds"]),
    }


def bench_hotpath(trainer, repeats: int, log) -> dict[str, Any]:
    """Small costs inside the sampling loop, each a ratio to one guided UNet forward pass."""
    import torch

    # deferred: torch (bench is imported for `tdpo --help`)
    from tdpo.algos.ddim import ddim_step_logprob, gaussian_log_prob
    from tdpo.sampling import derive_seed, sample_noise

    cfg, policy = trainer.config, trainer.policy
    batch, T = cfg.sample.batch_size, cfg.sample.num_steps
    base = policy.unet.config
    shape = (base.in_channels, base.sample_size, base.sample_size)
    device = trainer.device
    prompts = (trainer.prompts * batch)[:batch]
    policy.scheduler.set_timesteps(T, device=device)
    t = policy.scheduler.timesteps[T // 2]
    embeds, _ = policy.encode_prompts(prompts)
    negative, _ = policy.negative_embeds(batch)
    x = torch.randn(batch, *shape, device=device)
    eps = torch.randn_like(x)
    nxt = torch.randn_like(x)
    inner = 20  # calls per timed unit, so each unit is long enough to time

    def unet_forward():
        with torch.no_grad():
            for _ in range(inner):
                policy.predict_noise(
                    trainer.unet, x, t, embeds, negative, cfg.sample.guidance_scale
                )

    def unet_forward_inference_mode():
        with torch.inference_mode():
            for _ in range(inner):
                policy.predict_noise(
                    trainer.unet, x, t, embeds, negative, cfg.sample.guidance_scale
                )

    def ddim_step():
        for _ in range(inner):
            ddim_step_logprob(policy.scheduler, eps, t, x, cfg.sample.eta, prev_sample=nxt)

    def log_prob_only():
        step = ddim_step_logprob(policy.scheduler, eps, t, x, cfg.sample.eta, prev_sample=x)
        for _ in range(inner):
            gaussian_log_prob(nxt, step.mean, step.std)

    def noise():
        for i in range(inner):
            sample_noise([derive_seed(0, 2, i, j) for j in range(batch)], (T + 1, *shape))

    fns = {
        "unet_cfg_forward": unet_forward,
        "unet_cfg_forward_inference_mode": unet_forward_inference_mode,
        "ddim_step_logprob": ddim_step,
        "gaussian_log_prob": log_prob_only,
        "sample_noise_batch": noise,
    }
    times = alternate(fns, repeats, log=log)
    ref = times["unet_cfg_forward"]["seconds"]
    out = {
        name: paired_ratio(times[name]["seconds"], ref)
        for name in fns
        if name != "unet_cfg_forward"
    }
    out["unet_cfg_forward_seconds"] = statistics.median(ref) / inner
    # per sampling batch: T UNet passes; the loop makes 2 ddim_step_logprob calls per step and
    # draws the batch's noise once (T+1 slices), so per step the noise costs 1/T of a call.
    out["notes"] = (
        "ratios per call to one guided UNet forward pass at the sampling batch; "
        "DiffusionPolicy.sample makes 2 ddim_step_logprob calls per step and one "
        "sample_noise call per batch (in PolicyGradient.sample)"
    )
    return out


def bench_epochs(trainers: dict[str, Any], repeats: int, memory: PeakMemory, log) -> dict:
    fns = {"floor": floor_fn(trainers["ddpo100"])}
    fns.update({name: epoch_fn(tr) for name, tr in trainers.items()})
    times = alternate(fns, repeats, memory, log=log)
    floor = times["floor"]["seconds"]
    ratios = {f"{name}_vs_floor": paired_ratio(times[name]["seconds"], floor) for name in trainers}
    for name in ("tdpo_image", "tdpo_latent"):
        if name in trainers and "ddpo100" in trainers:
            ratios[f"{name}_vs_ddpo100"] = paired_ratio(
                times[name]["seconds"], times["ddpo100"]["seconds"]
            )
    # the epochs' own split (Trainer metrics), medians over the timed rounds (not a ratio)
    split = {
        name: {k: statistics.median(m[k] for m in fns[name].metrics[-repeats:]) for k in SPLIT_KEYS}
        for name in trainers
    }
    return {"times": times, "ratios": ratios, "split": split}


def bench_scaling(
    make,
    base_samples: int,
    base_steps: int,
    samples: list[int],
    steps: list[int],
    repeats: int,
    log,
) -> dict[str, Any]:
    """Epoch seconds against samples per epoch (at ``base_steps``) and steps (at
    ``base_samples``); all configurations timed alternately in the same rounds."""
    points = {(n, base_steps) for n in samples} | {(base_samples, t) for t in steps}
    trainers = {p: make(*p) for p in sorted(points)}
    fns = {f"samples={n},steps={t}": epoch_fn(tr) for (n, t), tr in trainers.items()}
    times = alternate(fns, repeats, log=log)
    med = {k: statistics.median(v["seconds"]) for k, v in times.items()}
    by_samples = [med[f"samples={n},steps={base_steps}"] for n in samples]
    by_steps = [med[f"samples={base_samples},steps={t}"] for t in steps]
    return {
        "method": "tdpo_image",
        "median_seconds": med,
        "samples": {"x": samples, "seconds": by_samples, "fit": linear_fit(samples, by_samples)},
        "steps": {"x": steps, "seconds": by_steps, "fit": linear_fit(steps, by_steps)},
    }


# ---------------------------------------------------------------------------------------------
# Command


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="time sampling and epochs against their floors (ratios, same process)",
        description="Every figure is a ratio of two things timed alternately in this process "
        "(median over --repeats rounds). Default model: the shapes world pipeline if present, "
        "else a tiny random pipeline.",
    )
    p.add_argument("--model", default="auto", help="auto | tiny | pipeline folder or Hub id")
    p.add_argument("--backbone", help="critic backbone (default: the model's own tiny CLIP)")
    p.add_argument("--samples", type=int, help=f"samples per epoch ({DEFAULTS['samples']})")
    p.add_argument("--batch", type=int, help=f"sampling batch ({DEFAULTS['batch']})")
    p.add_argument("--train-batch", type=int, help=f"training batch ({DEFAULTS['train_batch']})")
    p.add_argument("--steps", type=int, help=f"DDIM steps ({DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (5)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1)")
    p.add_argument("--repeats", type=int, help=f"timed rounds ({DEFAULTS['repeats']})")
    p.add_argument(
        "--scale-samples", help=f"samples per epoch series ({DEFAULTS['scale_samples']})"
    )
    p.add_argument("--scale-steps", help=f"steps series ({DEFAULTS['scale_steps']})")
    p.add_argument("--scale-repeats", type=int, help="timed rounds of the scaling part (3)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling part")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1; 0 = leave torch's default). On a shared 2-core machine "
        "more threads than free cores slows a tiny model down several-fold",
    )
    p.add_argument("--mixed-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests (seconds)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    return p


def _settings(args) -> dict[str, Any]:
    base = QUICK if args.quick else DEFAULTS
    s = {
        k: getattr(args, k, None) if getattr(args, k, None) is not None else v
        for k, v in base.items()
    }
    for key in ("scale_samples", "scale_steps"):
        try:
            s[key] = [int(v) for v in str(s[key]).split(",") if v.strip()]
        except ValueError:
            raise UsageError(
                f"--{key.replace('_', '-')}", s[key], "comma-separated integers"
            ) from None
    for key in ("samples", "batch", "train_batch", "steps", "repeats"):
        if s[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')}", s[key], "must be >= 1")
    if s["samples"] % s["batch"] or s["samples"] % s["train_batch"]:
        raise UsageError(
            "--samples", s["samples"], "must be divisible by --batch and --train-batch"
        )
    return s


def run_bench(args: argparse.Namespace) -> int:
    import torch

    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(message, flush=True)

    memory = PeakMemory()
    results: dict[str, Any] = {"machine": machine_info(), "settings": dict(s)}
    results["settings"].update(guidance=args.guidance, eta=args.eta, threads=args.threads)
    results["settings"]["mixed_precision"] = args.mixed_precision
    with tempfile.TemporaryDirectory(prefix="tdpo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model, backbone, label = resolve_model(args.model, args.backbone, tmp)
        from tdpo.policy import pipeline_class  # deferred: loads torch and diffusers

        if pipeline_class(model) != "StableDiffusionPipeline":  # read before anything loads
            raise UsageError(
                "--model", label, "is an SDXL pipeline; tdpo bench measures SD 1.x/2.x"
            )
        results["model"] = label
        log(
            f"tdpo bench: model {label}; {s['samples']} samples/epoch, batch {s['batch']}, "
            f"train batch {s['train_batch']}, {s['steps']} steps, {s['repeats']} rounds"
        )

        def make(method: str, samples: int, steps: int, batch: int, train_batch: int):
            return make_trainer(
                model,
                backbone,
                tmp / f"run-{method}-{samples}-{steps}",
                method,
                samples=samples,
                batch=batch,
                train_batch=train_batch,
                steps=steps,
                guidance=args.guidance,
                eta=args.eta,
                mixed_precision=args.mixed_precision,
            )

        trainers = {
            m: make(m, s["samples"], s["steps"], s["batch"], s["train_batch"])
            for m in ("ddpo100", "tdpo_image", "tdpo_latent")
        }
        log("sampling: DiffusionPolicy.sample vs StableDiffusionPipeline.__call__")
        results["sampling"] = bench_sampling(trainers["ddpo100"], s["repeats"], memory, log)
        log("hot path: costs inside the sampling loop, per guided UNet pass")
        results["hotpath"] = bench_hotpath(trainers["ddpo100"], s["repeats"], log)
        log("epochs: floor, ddpo100, tdpo_image, tdpo_latent")
        results["epochs"] = bench_epochs(trainers, s["repeats"], memory, log)
        del trainers
        if not args.no_scaling:
            log("scaling: tdpo_image epochs against samples per epoch and steps")
            smallest = min(s["scale_samples"] + [s["samples"]])
            scale_batch = math.gcd(smallest, s["batch"]) or 1
            # DDPO-100/TDPO make 2T updates: each epoch needs an even number of minibatches
            train_batch = math.gcd(max(1, smallest // 2), s["train_batch"]) or 1
            results["scaling"] = bench_scaling(
                lambda n, t: make("tdpo_image", n, t, scale_batch, train_batch),
                s["samples"],
                s["steps"],
                s["scale_samples"],
                s["scale_steps"],
                s["scale_repeats"],
                log,
            )
            results["scaling"]["batch"] = scale_batch
            results["scaling"]["train_batch"] = train_batch
    results["memory_kind"] = memory.kind
    results["memory_resettable"] = memory.resettable
    results["summary"] = summary(results)
    print(format_table(results), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float) + "\n")
        log(f"wrote {out}")
    return 0


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: figure, median ratio, range, target, verdict."""
    rows = []

    def add(name: str, ratio: dict[str, float], target: float | None, what: str):
        rows.append(
            {
                "figure": name,
                "what": what,
                "median": ratio["median"],
                "min": ratio["min"],
                "max": ratio["max"],
                "target": target,
                "ok": None if target is None else ratio["median"] <= target,
            }
        )

    add(
        "sample_vs_pipeline",
        results["sampling"]["ratio"],
        TARGETS["sample_vs_pipeline"],
        "DiffusionPolicy.sample / pipe()",
    )
    ratios = results["epochs"]["ratios"]
    add(
        "ddpo100_vs_floor",
        ratios["ddpo100_vs_floor"],
        TARGETS["ddpo100_vs_floor"],
        "DDPO-100 epoch / floor",
    )
    add(
        "tdpo_latent_vs_floor",
        ratios["tdpo_latent_vs_floor"],
        TARGETS["tdpo_latent_vs_floor"],
        "TDPO latent-critic epoch / floor",
    )
    add(
        "tdpo_image_vs_floor",
        ratios["tdpo_image_vs_floor"],
        None,
        "TDPO image-critic epoch / floor",
    )
    add(
        "tdpo_latent_vs_ddpo100",
        ratios["tdpo_latent_vs_ddpo100"],
        TARGETS["tdpo_latent_vs_ddpo100"],
        "latent critic's whole cost",
    )
    add("tdpo_image_vs_ddpo100", ratios["tdpo_image_vs_ddpo100"], None, "image critic's whole cost")
    return rows


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"model: {results['model']}; machine: {results['machine'].get('cpu_count')} CPUs, "
        f"torch {results['machine']['torch']} ({results['machine']['torch_threads']} threads)"
        + (f", {results['machine']['gpu']}" if "gpu" in results["machine"] else ""),
        "",
        f"{'figure':<26} {'median':>7} {'range':>15} {'target':>7}  verdict",
    ]
    for row in results["summary"]:
        target = f"<={row['target']:.2f}" if row["target"] is not None else "-"
        verdict = "report" if row["ok"] is None else ("ok" if row["ok"] else "OVER")
        lines.append(
            f"{row['figure']:<26} {row['median']:7.3f} "
            f"{row['min']:6.3f}-{row['max']:<7.3f} {target:>7}  {verdict}"
        )
    lines.append("")
    lines.append(f"{'timed call':<26} {'median s':>9} {'peak MiB':>9} {'+MiB':>7}")
    for part in ("sampling", "epochs"):
        for name, entry in results[part]["times"].items():
            peak, base = entry.get("peak_mib"), entry.get("base_mib")
            extra = f"{peak - base:7.0f}" if peak is not None and base is not None else "      -"
            peak_s = f"{peak:9.0f}" if peak is not None else "        -"
            lines.append(f"{name:<26} {statistics.median(entry['seconds']):9.3f} {peak_s} {extra}")
    split = results["epochs"].get("split", {})
    if split:
        lines.append("")
        lines.append(f"{'epoch split (median s)':<26} {'sample':>7} {'value':>7} {'train':>7}")
        for name, m in split.items():
            lines.append(
                f"{name:<26} {m['seconds_sample']:7.3f} {m['seconds_value']:7.3f} "
                f"{m['seconds_train']:7.3f}"
            )
    hot = results.get("hotpath")
    if hot:
        lines.append("")
        lines.append(
            f"hot path (per call, ratio to one guided UNet pass of "
            f"{hot['unet_cfg_forward_seconds'] * 1000:.1f} ms)"
        )
        for name, ratio in hot.items():
            if isinstance(ratio, dict):
                lines.append(f"  {name:<32} {ratio['median']:7.3f}")
    scaling = results.get("scaling")
    if scaling:
        lines.append("")
        lines.append(f"scaling ({scaling['method']}; log-log slope 1.0 = linear)")
        for axis in ("samples", "steps"):
            fit = scaling[axis]["fit"]
            pts = ", ".join(
                f"{x}:{y:.2f}s" for x, y in zip(scaling[axis]["x"], scaling[axis]["seconds"])
            )
            lines.append(
                f"  {axis:<8} {pts}  slope {fit['loglog_slope']:.3f}  R^2 {fit['r2']:.4f}  "
                f"intercept share at min {fit['intercept_share_at_min']:.2f}"
            )
    return "\n".join(lines)
