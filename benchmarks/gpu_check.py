"""One-shot GPU check at Stable Diffusion 1.5 scale, with random weights (no download).

Builds SD 1.5's architecture from configs (UNet, VAE, ViT-L/14 text encoder, a word tokenizer
written locally) and a ViT-L/14 vision tower as the critic backbone, saves them to a temporary
folder, then in bf16 on CUDA times:

1. a plain ``pipe(...)`` call: 8 images, 512x512, 50 steps, guidance 5, eta 1;
2. ``DiffusionPolicy.sample`` at the same settings against ``pipe(...)`` on the same LoRA UNet,
   alternating (the ratio; target <= 1.05);
3. one TDPO-R epoch (8 samples, 50 steps, LoRA, image critic): seconds split sample / value /
   train and peak memory;
3t. the same with the image critic decoding states with a tiny autoencoder
   (``critic.decoder=tiny``: diffusers' ``AutoencoderTiny`` with TAESD's architecture, random
   weights) instead of the VAE;
4. the same with the latent critic;
5. one DDPO-100 epoch; then the image critic's epoch over DDPO-100's, with the VAE and with the
   tiny decoder (``critic_decoder`` in the JSON; target for the tiny decoder <= 1.15).

``--only critic-decoder`` runs parts 3, 3t and 5 only (SD 1.5; a short device check).

``--arch sdxl`` does the same at SDXL base 1.0 scale (UNet 2.6 B with ``text_time`` added
conditions, CLIP ViT-L and OpenCLIP bigG text encoders, VAE; 4 images at 1024x1024), without
the DDPO part.

``--arch sd3`` does it at Stable Diffusion 3.5 medium scale (``SD3Transformer2DModel`` 2.5 B with
dual attention and RMS q/k norm, CLIP-L and CLIP-G text encoders with projection, the 16-channel
VAE, flow-matching Euler scheduler with shift 3; T5 left out, as a pipeline saved with
``text_encoder_3=None``; 4 images at 1024x1024, 28 steps, guidance 4.5): ``FlowPolicy.sample``
(noise level 0.7) against ``pipe(...)``, then one epoch each of TDPO-R (image and latent critic),
GRPO, DDPO-2 and AlignProp (a differentiable brightness reward, :func:`brightness`).

Every part is guarded: one failure still reports the others. Results: a table on stdout and
JSON in ``$OUT/gpu_check.json`` (``./gpu_check.json`` when OUT is unset, or ``--out``).
``--tiny`` runs the same code at toy sizes (2 samples, 4 steps) on CPU, for the tests.

Run from the repository root (it puts ``src`` on ``sys.path``, no install needed)::

    python benchmarks/gpu_check.py            # GPU, SD 1.5 scale
    python benchmarks/gpu_check.py --tiny     # CPU or GPU, toy scale
    python benchmarks/gpu_check.py --arch sdxl [--tiny]
    python benchmarks/gpu_check.py --arch sd3 [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
if str(ROOT) not in sys.path:  # the AlignProp part's reward: benchmarks.gpu_check:brightness
    sys.path.append(str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
VIT_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_2 = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# Stable Diffusion 3.5 medium (stabilityai/stable-diffusion-3.5-medium configs; T5 left out).
SD35M_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
SD3_VAE = dict(
    SD15_VAE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_TEXT_L = dict(SD15_TEXT, projection_dim=768)
SD3_TEXT_G = SDXL_TEXT_2

# The same builders at toy sizes (--tiny): every code path of the full run, in seconds on CPU.
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 32, 64, 64),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_VAE = dict(
    SD15_VAE,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    sample_size=64,
    norm_num_groups=16,
)
TAESD = {}  # AutoencoderTiny's defaults are TAESD's architecture (SD 1.x/2.x latents, 8x)
TINY_TAESD = {  # the same layout at toy width: 8x upsampling as TINY_VAE
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
}
TINY_TEXT = dict(
    SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
TINY_SDXL_UNET = dict(
    SDXL_UNET,
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 32, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    norm_num_groups=16,
)
TINY_SDXL_TEXT_2 = dict(TINY_TEXT, projection_dim=32, hidden_act="gelu")
TINY_SD3_TRANSFORMER = dict(
    SD35M_TRANSFORMER,
    sample_size=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
)
TINY_SD3_TEXT = dict(TINY_TEXT, projection_dim=32)
TINY_VISION = dict(
    VIT_L14_VISION,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def brightness(device=None):
    """A differentiable reward for the AlignProp part (``benchmarks.gpu_check:brightness``, a reward
    factory): the mean pixel value."""

    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)), {}

    return reward


def build_sd3_pipeline(directory: Path, tiny: bool, device: str, save_dtype) -> Path:
    """Save a random Stable Diffusion 3.5 medium-architecture pipeline without T5."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tdpo.tiny import TINY_WORDS, write_word_tokenizer

    tokenizer = write_word_tokenizer(directory / "tok3", list(TINY_WORDS), max_length=77)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(TINY_SD3_TRANSFORMER if tiny else SD35M_TRANSFORMER))
        tiny_vae = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
        vae = AutoencoderKL(**(tiny_vae if tiny else SD3_VAE))
        text_l = CLIPTextModelWithProjection(
            CLIPTextConfig(**ids, **(TINY_SD3_TEXT if tiny else SD3_TEXT_L))
        )
        text_g = CLIPTextModelWithProjection(
            CLIPTextConfig(**ids, **(TINY_SD3_TEXT if tiny else SD3_TEXT_G))
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_l,
        tokenizer=tokenizer,
        text_encoder_2=text_g,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.to(dtype=save_dtype)
    pipe_dir = directory / "sd35m-random"
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    return pipe_dir


def build_models(
    directory: Path, tiny: bool, device: str, sdxl: bool = False, sd3: bool = False
) -> tuple[Path, Path]:
    """Save a random SD 1.5- (SDXL-, SD3.5 medium-) architecture pipeline and a ViT-L/14 CLIP
    vision tower."""
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from tdpo.tiny import TINY_WORDS, assemble_pipeline, write_word_tokenizer

    unet_cfg, vae_cfg, text_cfg, vision_cfg = (
        (TINY_UNET, TINY_VAE, TINY_TEXT, TINY_VISION)
        if tiny
        else (SD15_UNET, SD15_VAE, SD15_TEXT, VIT_L14_VISION)
    )
    if sdxl:
        unet_cfg = TINY_SDXL_UNET if tiny else SDXL_UNET
        vae_cfg = dict(vae_cfg, scaling_factor=0.13025, force_upcast=True)
    if sd3:  # only the vision tower of this function is kept: build the SD parts at toy size
        unet_cfg, vae_cfg, text_cfg = TINY_UNET, TINY_VAE, TINY_TEXT
    torch.manual_seed(0)
    pipe_dir, clip_dir = directory / "sd15-random", directory / "clip-l14-random"
    # Initialize on the device (random init of 1.3 G parameters is slow on the CPU), save bf16.
    save_dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        tokenizer = write_word_tokenizer(directory / "tok", list(TINY_WORDS), max_length=77)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text_cfg,
            )
        )
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg))
        text_encoder_2 = None
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **(TINY_SDXL_TEXT_2 if tiny else SDXL_TEXT_2),
                )
            )
    if sd3:
        del unet, vae, text_encoder
        pipe_dir = build_sd3_pipeline(directory, tiny, device, save_dtype)
    pipe = None if sd3 else assemble_pipeline(unet, vae, text_encoder, tokenizer)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=pipe.scheduler,
            add_watermarker=False,
        )
    if pipe is not None:
        pipe.to(dtype=save_dtype)
        pipe.save_pretrained(pipe_dir, safe_serialization=True)
    vision.to(dtype=save_dtype).save_pretrained(clip_dir, safe_serialization=True)
    size = vision_cfg["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(clip_dir)
    del pipe, text_encoder_2, vision
    return pipe_dir, clip_dir


# ---------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_tiny_autoencoder(directory: Path, tiny: bool, device: str) -> Path:
    """Save an AutoencoderTiny (TAESD's architecture; toy width with ``tiny``), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderTiny(**(TINY_TAESD if tiny else TAESD))
    path = directory / "taesd-random"
    model.to(dtype=torch.float32 if tiny else torch.bfloat16).save_pretrained(path)
    return path


def critic_decoder_ratios(results: dict) -> dict | None:
    """The image critic's epoch over DDPO-100's, with the VAE and with the tiny decoder."""
    ddpo = results.get("5_ddpo100_epoch", {}).get("seconds")
    if not isinstance(ddpo, float):
        return None
    out = {"target_tiny": 1.15}
    for key, part in (("vae", "3_tdpo_r_image_epoch"), ("tiny", "3t_tdpo_r_image_tiny_epoch")):
        seconds = results.get(part, {}).get("seconds")
        if isinstance(seconds, float):
            out[f"image_{key}_vs_ddpo100"] = seconds / ddpo
    return out


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:  # CPU: the process's resident high-water mark
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def run_part(results: dict, name: str, fn, deadline: float) -> None:
    """Run one part; record its result or its error; skip it past the deadline."""
    if time.monotonic() > deadline:
        results[name] = {"skipped": "time budget spent"}
        print(f"[{name}] skipped (time budget)", flush=True)
        return
    reset_peak()
    print(f"[{name}] ...", flush=True)
    try:
        out = fn()
        out["peak_gib"] = peak_gib()
        results[name] = out
        print(f"[{name}] {json.dumps(out, default=str)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report and go on
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        traceback.print_exc()
    finally:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (2 samples, 4 steps)")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_check.json or ./gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip parts after this")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds in part 2")
    parser.add_argument("--train-batch", type=int, help="training minibatch (2; 1 with --tiny)")
    parser.add_argument("--embed-batch", type=int, default=16, help="critic decode batch (16)")
    parser.add_argument(
        "--arch", choices=("sd15", "sdxl", "sd3"), default="sd15", help="architecture"
    )
    parser.add_argument(
        "--only",
        choices=("critic-decoder",),
        help="critic-decoder: parts 3 (image critic, VAE), 3t (tiny decoder), 5 (DDPO-100)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s

    import warnings

    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    if not cuda:  # more threads than free cores slows small models down several-fold
        torch.set_num_threads(1)
    if args.train_batch is None:
        args.train_batch = 1 if args.tiny else 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    mixed = "bf16" if cuda else "fp32"
    sdxl = args.arch == "sdxl"
    sd3 = args.arch == "sd3"
    if args.tiny:
        samples, steps, size_note = 2, 4, f"toy configs ({args.arch})"
    elif sdxl:
        samples, steps, size_note = 4, 50, "SDXL base architecture, random weights, 1024x1024"
    elif sd3:
        samples, steps = 4, 28
        size_note = "SD3.5 medium architecture (sd3, no T5), random weights, 1024x1024"
    else:
        samples, steps, size_note = 8, 50, "SD 1.5 architecture, random weights, 512x512"
    guidance, eta = (4.5, 0.7) if sd3 else (5.0, 1.0)  # eta: the SDE noise level for sd3
    out_path = Path(args.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json")
    results: dict = {
        "settings": {
            "tiny": args.tiny,
            "what": size_note,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "dtype": str(dtype),
            "samples": samples,
            "steps": steps,
            "guidance": guidance,
            "eta": eta,
            "train_batch": args.train_batch,
            "embed_batch": args.embed_batch,
        }
    }
    with contextlib.suppress(Exception):
        import diffusers
        import peft
        import transformers

        results["settings"]["versions"] = {
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        }
    prompts = ["a photo of a red cat on a white background"] * samples
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    state: dict = {}

    def part_build():
        seconds, (pipe_dir, clip_dir) = timed(
            lambda: build_models(tmp, args.tiny, device, sdxl, sd3)
        )
        state["pipe_dir"], state["clip_dir"] = pipe_dir, clip_dir
        if not (sdxl or sd3):  # the image critic's tiny decoder (part 3t)
            state["taesd_dir"] = build_tiny_autoencoder(tmp, args.tiny, device)
        return {"seconds": seconds}

    run_part(results, "0_build", part_build, deadline + 1e9)
    if "pipe_dir" not in state:
        return finish(results, out_path, 1)

    from tdpo.config import ModelConfig, SampleConfig
    from tdpo.policy import load_pipeline, make_policy
    from tdpo.sampling import sample_noise

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()

    def call_pipe(pipe, num_steps=steps):
        sampler = {} if sd3 else {"eta": eta}  # SD3's pipeline samples the ODE
        with autocast():
            return pipe(
                prompt=prompts,
                num_inference_steps=num_steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
                **sampler,
            )

    def part_pipe():
        pipe = load_pipeline(str(state["pipe_dir"]), dtype=dtype).to(device)
        state["pipe"] = pipe
        call_pipe(pipe, 2)  # warm-up
        reset_peak()
        seconds, _ = timed(lambda: call_pipe(pipe))
        return {"seconds": seconds, "images_per_s": samples / seconds}

    def part_sample():
        pipe = state.pop("pipe", None) or load_pipeline(str(state["pipe_dir"]), dtype=dtype).to(
            device
        )
        sampler = {"noise_level": eta} if sd3 else {"eta": eta}
        sample_cfg = SampleConfig(
            num_steps=steps, guidance_scale=guidance, batch_size=samples, **sampler
        )
        policy = make_policy(pipe, ModelConfig(pretrained=str(state["pipe_dir"])), sample_cfg)
        policy.to(device)
        noise = sample_noise(list(range(samples)), policy.noise_shape).to(device)

        def ours():
            with autocast():
                return policy.sample(policy.unet, prompts, noise)

        ours()  # warm-up (LoRA layers)
        times = {"policy_sample": [], "pipeline_call": []}
        for r in range(args.repeats):
            order = [("policy_sample", ours), ("pipeline_call", lambda: call_pipe(pipe))]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(fn)[0])
        ratios = sorted(a / b for a, b in zip(times["policy_sample"], times["pipeline_call"]))
        return {
            "seconds": times,
            "ratio_median": ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios) / 2,
            "ratios": ratios,
            "target": 1.05,
        }

    def part_epoch(method: str, critic_input: str | None, **extra):
        def run():
            from tdpo.config import build_config
            from tdpo.trainers.loop import Trainer

            overrides = {
                "model.pretrained": str(state["pipe_dir"]),
                "critic.backbone": str(state["clip_dir"]),
                "reward.name": "jpeg_compressibility",
                "reward.panel": [],
                "mixed_precision": mixed,
                "sample.num_steps": steps,
                "sample.guidance_scale": guidance,
                ("sample.noise_level" if sd3 else "sample.eta"): eta,
                "sample.batch_size": samples,
                "sample.samples_per_epoch": samples,
                "train.batch_size": min(args.train_batch, samples),
                "train.epochs": 1,
                "train.norm_min_count": 2,
                "critic.embed_batch_size": args.embed_batch,
                "eval.every": 0,
                "log.tensorboard": False,
                "log.progress": False,
                "log.grid_every": 0,
            }
            from dataclasses import fields

            from tdpo.config import SampleConfig

            if "prompts_per_epoch" in {f.name for f in fields(SampleConfig)}:
                overrides["sample.prompts_per_epoch"] = 0
            if critic_input:
                overrides["critic.input"] = critic_input
            overrides.update(extra)
            config = build_config(method, None, overrides)
            trainer = Trainer(config, tmp / f"run-{method}-{critic_input}", log=lambda _m: None)
            reset_peak()
            seconds, metrics = timed(lambda: trainer.epoch_step(0))
            out = {
                "seconds": seconds,
                "updates": trainer.schedule.updates_per_epoch,
                "passes": trainer.schedule.minibatches * steps,
            }
            for key in ("seconds_sample", "seconds_value", "seconds_train"):
                if key in metrics:  # AlignProp's epoch is one timed piece
                    out[key] = metrics[key]
            if method == "alignprop":
                out["passes"] = trainer.schedule.sample_batches
            return out

        return run

    only_decoder = args.only == "critic-decoder" and not (sdxl or sd3)
    if not only_decoder:
        run_part(results, "1_pipe_call", part_pipe, deadline)
        run_part(results, "2_policy_sample_vs_pipe", part_sample, deadline)
    state.pop("pipe", None)
    run_part(results, "3_tdpo_r_image_epoch", part_epoch("tdpo-r", "image"), deadline)
    if "taesd_dir" in state:
        tiny_decoder = {"critic.decoder": "tiny", "critic.tiny_decoder": str(state["taesd_dir"])}
        run_part(
            results,
            "3t_tdpo_r_image_tiny_epoch",
            part_epoch("tdpo-r", "image", **tiny_decoder),
            deadline,
        )
    if not only_decoder:
        run_part(results, "4_tdpo_r_latent_epoch", part_epoch("tdpo-r", "latent"), deadline)
    if sd3:
        groups = {"sample.prompts_per_epoch": max(1, samples // 2)}  # GRPO: groups of 2
        run_part(results, "5_grpo_epoch", part_epoch("grpo", None, **groups), deadline)
        run_part(results, "6_ddpo2_epoch", part_epoch("ddpo-2", None), deadline)
        reward = {"reward.name": "benchmarks.gpu_check:brightness", "train.alignprop_steps": 1}
        run_part(results, "7_alignprop_epoch", part_epoch("alignprop", None, **reward), deadline)
    elif not sdxl:
        run_part(results, "5_ddpo100_epoch", part_epoch("ddpo-100", None), deadline)
        ratios = critic_decoder_ratios(results)
        if ratios:
            results["critic_decoder"] = ratios
    results["wall_s"] = time.monotonic() - start
    failed = any("error" in v for v in results.values() if isinstance(v, dict))
    return finish(results, out_path, 1 if failed else 0)


def finish(results: dict, out_path: Path, code: int) -> int:
    print(format_table(results), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out_path}", flush=True)
    return code


def format_table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"gpu_check: {s['what']} on {s['device']} ({s['dtype']}), {s['samples']} samples, "
        f"{s['steps']} steps, guidance {s['guidance']}, "
        + ("noise level" if "(sd3" in s["what"] else "eta")
        + f" {s['eta']}",
        f"{'part':<26} {'seconds':>8} {'sample':>7} {'value':>7} {'train':>7} {'peak GiB':>9}  note",
    ]
    for name, r in results.items():
        if name in ("settings", "wall_s", "critic_decoder") or not isinstance(r, dict):
            continue
        if "error" in r or "skipped" in r:
            lines.append(f"{name:<26} {r.get('error') or r.get('skipped')}")
            continue
        seconds = r.get("seconds")
        if isinstance(seconds, dict):  # part 2: medians of each side
            seconds = sorted(seconds["policy_sample"])[len(seconds["policy_sample"]) // 2]
        cols = [f"{seconds:8.2f}" if isinstance(seconds, float) else f"{'':>8}"]
        for key in ("seconds_sample", "seconds_value", "seconds_train"):
            cols.append(f"{r[key]:7.2f}" if key in r else f"{'':>7}")
        peak = r.get("peak_gib")
        cols.append(f"{peak:9.2f}" if isinstance(peak, float) else f"{'':>9}")
        note = ""
        if "ratio_median" in r:
            note = f"policy.sample / pipe() = {r['ratio_median']:.3f} (target <= 1.05)"
        elif "images_per_s" in r:
            note = f"{r['images_per_s']:.2f} images/s"
        elif "updates" in r:
            note = f"{r['passes']} fwd+bwd passes, {r['updates']} updates"
        lines.append(f"{name:<26} " + " ".join(cols) + f"  {note}")
    ratios = results.get("critic_decoder")
    if ratios:
        lines.append(
            "image-critic epoch / DDPO-100 epoch: "
            + ", ".join(
                f"{key.split('_')[1]} decoder {value:.3f}"
                for key, value in ratios.items()
                if key.startswith("image_")
            )
            + f" (target for the tiny decoder <= {ratios['target_tiny']})"
        )
    if "wall_s" in results:
        lines.append(f"wall: {results['wall_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
