"""Pre-training of the shapes world, stage by stage, into an output directory.

Stages (each skipped when ``OUT/<stage>.done.json`` exists, so an interrupted run resumes):

1. ``data``    render the training images (seen prompts) and the CLIP images (all prompts);
2. ``vae``     train the ``AutoencoderKL`` (32x32 -> 8x8x4), set ``scaling_factor`` = 1 / latent std;
3. ``unet``    train the ``UNet2DConditionModel`` and the ``CLIPTextModel`` jointly on the latents
               (10 % caption dropout for classifier-free guidance); save the
               ``StableDiffusionPipeline`` to ``OUT/pipeline``;
4. ``clip``    train the tiny ``CLIPModel`` contrastively; save it to ``OUT/clip``;
5. ``rewards`` sample the base model, label with noisy gold, train the four learned rewards
               into ``OUT/rewards``;
6. ``report``  measure everything into ``OUT/world_report.json``.

Long stages write atomic checkpoints (model, optimizer, step) every ``CKPT_EVERY`` steps and
resume from them. ``steps_scale`` multiplies every step and sample count (0.01 runs the whole
pipeline in seconds, for tests).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tdpo.fileio import atomic_write
from tdpo.images import to_float, to_uint8
from tdpo.policy import tokenize
from tdpo.tiny import assemble_pipeline, sd_ddim_scheduler
from tdpo.world import generator as gen
from tdpo.world import gold, models
from tdpo.world.evaluate import (
    clip_retrieval,
    eval_draws,
    evaluate_world,
    load_pipeline,
    prompt_draw,
    sample,
)
from tdpo.world.rewards import ClipFeatures, train_learned_rewards
from tdpo.world.rewards import pooled as _pooled

STAGES = ("data", "vae", "unet", "clip", "rewards", "report")
CKPT_EVERY = 100

# Full-scale sizes (multiplied by steps_scale).
N_TRAIN_IMAGES = 20000
N_CLIP_IMAGES = 10000
VAE_STEPS, VAE_BATCH, VAE_LR = 800, 64, 1e-3
# An L1 term sharpens reconstructions (measured: 1,500 steps with weight 0.5 reached MSE 0.0061
# vs 0.0104 for 800 steps without); 0 reproduces the shipped weights.
VAE_L1_WEIGHT = 0.0
UNET_STEPS, UNET_BATCH, UNET_LR = 1600, 128, 1e-3
CLIP_STEPS, CLIP_BATCH, CLIP_LR = 1200, 128, 1e-3
CAPTION_DROPOUT = 0.1
N_POOL, N_EVAL, N_CLEAN = 1536, 256, 512  # base samples for labels, for evaluation; clean images


def _scaled(n: int, scale: float, minimum: int = 2) -> int:
    return max(minimum, int(round(n * scale)))


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True)))


def _progress(total: int, initial: int, desc: str, quiet: bool):
    return tqdm(total=total, initial=initial, desc=desc, disable=quiet, mininterval=5.0)


def _train_loop(
    name: str,
    out: Path,
    params_owner: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    steps: int,
    step_fn: Callable[[int], dict[str, float]],
    quiet: bool,
    lr: float,
) -> dict[str, float]:
    """Generic resumable loop: cosine LR with warmup, checkpoints, tqdm, EMA of the loss."""
    ckpt = out / f"{name}.ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, m in params_owner.items():
            m.load_state_dict(state["models"][k])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
    warmup = max(1, min(100, steps // 10))
    ema: dict[str, float] = {}
    bar = _progress(steps, start, name, quiet)
    for step in range(start, steps):
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        logs = step_fn(step)
        for k, v in logs.items():
            ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
        bar.update(1)
        if (step + 1) % 20 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in ema.items()})
        if (step + 1) % CKPT_EVERY == 0 and step + 1 < steps:
            _atomic_save(
                {
                    "models": {k: m.state_dict() for k, m in params_owner.items()},
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "py_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt,
            )
    bar.close()
    if ckpt.exists():
        ckpt.unlink()
    return ema


# ----------------------------------------------------------------------------- stages


def stage_data(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    n = _scaled(N_TRAIN_IMAGES, scale, 64)
    images, prompts, _ = gen.generate(n, seed=seed)
    nc = _scaled(N_CLIP_IMAGES, scale, 64)
    cimages, cprompts, _ = gen.generate(nc, seed=seed + 1, combos=gen.all_combos())
    _atomic_save({"images": to_uint8(images), "prompts": prompts}, out / "data_train.pt")
    _atomic_save({"images": to_uint8(cimages), "prompts": cprompts}, out / "data_clip.pt")
    return {"train_images": n, "clip_images": nc}


def _load_images(out: Path, name: str) -> tuple[torch.Tensor, list[str]]:
    d = torch.load(out / name, weights_only=True)
    return to_float(d["images"]), d["prompts"]


def stage_vae(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    images, _ = _load_images(out, "data_train.pt")
    x_all = images * 2 - 1
    torch.manual_seed(seed)
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    steps = _scaled(VAE_STEPS, scale)
    gen_ = torch.Generator().manual_seed(seed)

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(0, len(x_all), (VAE_BATCH,), generator=gen_)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (3 * 32 * 32)
        loss = mse + 1e-4 * kl
        if VAE_L1_WEIGHT:
            loss = loss + VAE_L1_WEIGHT * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"mse": mse.item()}

    logs = _train_loop("vae", out, {"vae": vae}, opt, steps, step_fn, quiet, VAE_LR)
    vae.eval()
    with torch.no_grad():
        x = x_all[:512]
        lat = vae.encode(x).latent_dist.mean
        std = lat.std().item()
        mse = F.mse_loss(vae.decode(lat).sample, x).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {"steps": steps, "mse": mse, "latent_std": std, "scaling_factor": 1.0 / std, **logs}


def _encode_latents(
    vae, images: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            d = vae.encode(images[i : i + batch] * 2 - 1).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _copy_bpe_files(src: Path, dst: Path) -> None:
    """transformers 5 saves only tokenizer.json; also ship the generated vocab.json and
    merges.txt (what a slow CLIPTokenizer and older transformers read)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)


def stage_unet(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    images, prompts = _load_images(out, "data_train.pt")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    sf = vae.config.scaling_factor
    lat_mean, lat_std = _encode_latents(vae, images)
    tokenizer = models.build_tokenizer(out / "tokenizer_src")
    ids = tokenize(tokenizer, prompts)
    empty = tokenize(tokenizer, [""])[0]
    torch.manual_seed(seed)
    unet = models.build_unet()
    text_encoder = models.build_text_encoder(tokenizer)
    sched = sd_ddim_scheduler()
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=1e-2)
    steps = _scaled(UNET_STEPS, scale)
    g = torch.Generator().manual_seed(seed + 7)

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(0, len(lat_mean), (UNET_BATCH,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        tok = ids[idx].clone()
        drop = torch.rand(UNET_BATCH, generator=g) < CAPTION_DROPOUT
        tok[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (UNET_BATCH,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        emb = text_encoder(tok)[0]
        pred = unet(zt, t, emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item()}

    logs = _train_loop(
        "unet",
        out,
        {"unet": unet, "text_encoder": text_encoder},
        opt,
        steps,
        step_fn,
        quiet,
        UNET_LR,
    )
    pipe = assemble_pipeline(unet.eval(), vae, text_encoder.eval(), tokenizer)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    _copy_bpe_files(out / "tokenizer_src", out / "pipeline" / "tokenizer")
    return {
        "steps": steps,
        "unet_params": models.n_params(unet),
        "text_encoder_params": models.n_params(text_encoder),
        "vae_params": models.n_params(vae),
        **logs,
    }


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Half the batch blurred and noised a little, so the tiny CLIP also embeds imperfect
    (diffusion-like) images sensibly."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    w = torch.rand(b, 1, 1, 1, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) < 0.5)
    x = (1 - w) * x + w * blur
    noise = torch.randn(x.shape, generator=g) * 0.05 * torch.rand(b, 1, 1, 1, generator=g)
    keep = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    return (x + keep * noise).clamp(0, 1)


def stage_clip(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    images, prompts = _load_images(out, "data_clip.pt")
    tokenizer = models.build_tokenizer(out / "tokenizer_src")
    all_p = gen.all_prompts()
    index = {p: i for i, p in enumerate(all_p)}
    labels = torch.tensor([index[p] for p in prompts])
    all_ids = tokenize(tokenizer, all_p)
    torch.manual_seed(seed + 11)
    clip = models.build_clip(tokenizer)
    feats = ClipFeatures(clip, tokenizer)
    clip.train().requires_grad_(True)
    opt = torch.optim.AdamW(clip.parameters(), lr=CLIP_LR, weight_decay=1e-2)
    steps = _scaled(CLIP_STEPS, scale)
    g = torch.Generator().manual_seed(seed + 13)

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(0, len(images), (CLIP_BATCH,), generator=g)
        x = _augment(images[idx], g)
        img = F.normalize(
            _pooled(clip.get_image_features(pixel_values=feats.preprocess(x))), dim=-1
        )
        txt = F.normalize(_pooled(clip.get_text_features(input_ids=all_ids)), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, 120]
        y = labels[idx]
        loss_i = F.cross_entropy(logits, y)
        # caption -> image over the batch, every image of that caption a positive
        present = torch.unique(y)
        pos = (y[None, :] == present[:, None]).float()
        lt = logits.T[present]  # [P, B]
        loss_t = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(lt, 1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        return {"loss": loss.item(), "acc": acc}

    logs = _train_loop("clip", out, {"clip": clip}, opt, steps, step_fn, quiet, CLIP_LR)
    clip.eval().requires_grad_(False)
    clip.save_pretrained(out / "clip", safe_serialization=True)
    tokenizer.save_pretrained(out / "clip")
    _copy_bpe_files(out / "tokenizer_src", out / "clip")
    models.build_image_processor().save_pretrained(out / "clip")
    retrieval = clip_retrieval(ClipFeatures(clip, tokenizer), n=_scaled(1200, scale, 120))
    return {"steps": steps, "params": models.n_params(clip), "retrieval": retrieval, **logs}


def _base_samples(out: Path, scale: float, seed: int, quiet: bool) -> dict[str, Any]:
    """Base-model samples for labels and evaluation (cached in OUT/samples.pt)."""
    path = out / "samples.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    pipe = load_pipeline(out / "pipeline")
    n_pool = _scaled(N_POOL, scale, 32)
    draws = [
        ("pool", prompt_draw(gen.seen_prompts(), n_pool, seed + 101), seed + 101),
        *eval_draws(_scaled(N_EVAL, scale, 16), seed),
    ]
    data: dict[str, Any] = {}
    for name, prompts, s in draws:
        t0 = time.time()
        images = sample(pipe, prompts, seed=s)
        data[name] = {"images": to_uint8(images), "prompts": prompts}
        if not quiet:
            print(
                f"[world] sampled {len(prompts)} base images ({name}) in {time.time() - t0:.1f} s",
                flush=True,
            )
    imgs, prompts, _ = gen.generate(_scaled(N_CLEAN, scale, 16), seed=seed + 404)
    data["clean"] = {"images": to_uint8(imgs), "prompts": prompts}
    _atomic_save(data, path)
    return data


def stage_rewards(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    data = _base_samples(out, scale, seed, quiet)
    images = {k: to_float(v["images"]) for k, v in data.items()}
    prompts = {k: v["prompts"] for k, v in data.items()}
    feats = ClipFeatures.from_pretrained(out / "clip")
    info = train_learned_rewards(
        out / "rewards", feats, images, prompts, gold, scale=scale, seed=seed, quiet=quiet
    )
    return info


def stage_report(out: Path, scale: float, seed: int, quiet: bool) -> dict:
    report = evaluate_world(
        out,
        samples=_base_samples(out, scale, seed, quiet),
        retrieval_images=_scaled(1200, scale, 120),
        hack_images=_scaled(64, scale, 4),
        hack_steps=_scaled(100, scale, 2),
    )
    report.update(pretraining_record(out, STAGES[:-1]))
    _write_json(out / "world_report.json", report)
    return {"report": str(out / "world_report.json")}


STAGE_FNS: dict[str, Callable[[Path, float, int, bool], dict]] = {
    "data": stage_data,
    "vae": stage_vae,
    "unet": stage_unet,
    "clip": stage_clip,
    "rewards": stage_rewards,
    "report": stage_report,
}


def pretraining_record(out: Path, stages: Sequence[str]) -> dict[str, Any]:
    """For a report: the info of each of ``stages`` done in ``out`` (``pretraining``) and their
    total seconds (``pretraining_seconds``)."""
    done = {}
    for stage in stages:
        path = out / f"{stage}.done.json"
        if path.exists():
            done[stage] = json.loads(path.read_text())
    return {
        "pretraining": done,
        "pretraining_seconds": round(sum(v.get("seconds", 0) for v in done.values()), 1),
    }


def run_stages(
    out: Path, stages: Sequence[str], run_stage: Callable[[str], dict], quiet: bool, label: str
) -> dict[str, dict]:
    """``run_stage(stage)`` for each of ``stages`` that is not done in ``out`` yet; a stage's
    info, with the seconds it took, is written to ``OUT/<stage>.done.json`` (and read from it
    when done). ``label`` names the stages in progress lines ("stage", "flow stage"). Returns
    {stage: info}."""
    results: dict[str, dict] = {}
    for stage in stages:
        done = out / f"{stage}.done.json"
        if done.exists():
            results[stage] = json.loads(done.read_text())
            if not quiet:
                print(f"[world] {label} {stage}: already done, skipped")
            continue
        t0 = time.time()
        if not quiet:
            print(f"[world] {label} {stage} ...", flush=True)
        info = run_stage(stage)
        info["seconds"] = round(time.time() - t0, 1)
        _write_json(done, info)
        results[stage] = info
        if not quiet:
            print(
                f"[world] {label} {stage} done in {info['seconds']:.1f} s: "
                + json.dumps({k: v for k, v in info.items() if not isinstance(v, (dict, list))}),
                flush=True,
            )
    return results


def run_pretrain(
    out: str | Path,
    steps_scale: float = 1.0,
    seed: int = 0,
    stages: list[str] | None = None,
    quiet: bool = False,
    num_threads: int = 1,
) -> dict:
    """Run (or resume) the stages into ``out``; returns {stage: info}."""
    torch.set_num_threads(num_threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def run_stage(stage: str) -> dict:
        return STAGE_FNS[stage](out, steps_scale, seed, quiet)

    return run_stages(out, stages or STAGES, run_stage, quiet, "stage")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="shapes_world")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    t = time.time()
    stages = a.stages.split(",") if a.stages else None
    run_pretrain(a.out, a.steps_scale, a.seed, stages, num_threads=a.threads)
    print(f"[world] total {time.time() - t:.1f} s")
