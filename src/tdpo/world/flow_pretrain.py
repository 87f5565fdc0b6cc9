"""Pre-training of the flow shapes world: a tiny Stable-Diffusion-3-style rectified-flow pipeline
on the shapes world's data (``tdpo world pretrain --family flow``).

What is reused from the shipped SD shapes world (:data:`tdpo.world.WEIGHTS_DIR`) and what is new:

- the **VAE** (``pipeline/vae``) as it is, weights unchanged; its config gains SD3's
  ``shift_factor`` (the measured mean of the training latents), so latents are
  ``(z - shift) * scaling`` as in SD3;
- the **data generator** (the same 20,000 seen-prompt training images as the SD world);
- the **tokenizer** (both of SD3's CLIP tokenizers are the world's tokenizer);
- the **tiny CLIP and the learned rewards** (they score images, not models): not retrained;
- new: two ``CLIPTextModelWithProjection`` text encoders (warm-started from the SD world's
  text encoder, the projection new) and a tiny ``SD3Transformer2DModel``, trained jointly with
  the rectified-flow objective of diffusers' SD3 training scripts:
  ``x_s = (1 - s) x0 + s noise``, the transformer (at timestep ``1000 s``) predicts
  ``v = noise - x0``; ``s`` from the logit-normal density (``weighting_scheme="logit_normal"``,
  mean 0, std 1) mapped through the scheduler's ``shift``; 10 % caption dropout to the empty
  prompt (SD3 encodes the empty prompt for guidance); no T5 (``text_encoder_3=None``).

Stages (each skipped when ``OUT/<stage>.done.json`` exists, so an interrupted run resumes):

1. ``latents``     render the training images, encode them with the shipped VAE;
2. ``transformer`` train the transformer and the two text encoders (atomic checkpoints every
                   100 steps); save the ``StableDiffusion3Pipeline`` to ``OUT/pipeline``;
3. ``report``      the base flow model's gold figures (seen / unseen prompts) with the
                   pipeline's Euler sampler and with tdpo's SDE sampler, and the learned
                   rewards' correlations with gold on its samples, into ``OUT/flow_report.json``.

Without T5 the pipeline appends 256 all-zero "T5" tokens to the 16 CLIP tokens; every one of them
stays identical through every block (no positional embedding on the context, the same ops per
token), so the pre-training replaces them by one token whose attention logit gets
``+ log 256`` (:class:`RepeatedContextProcessor`): exactly the same model (tested), about 14x
cheaper. The saved transformer uses diffusers' default attention processor.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tdpo.images import to_uint8
from tdpo.world import (
    DEFAULT_FLOW_GUIDANCE,
    DEFAULT_FLOW_NOISE_LEVEL,
    DEFAULT_FLOW_STEPS,
    PIPELINE_DIR,
    WEIGHTS_DIR,
)
from tdpo.world import generator as gen
from tdpo.world.evaluate import batched_images, eval_draws, evaluate_world, gold_summary
from tdpo.world.pretrain import (
    CAPTION_DROPOUT,
    N_EVAL,
    N_TRAIN_IMAGES,
    _atomic_save,
    _copy_bpe_files,
    _scaled,
    _train_loop,
    _write_json,
    pretraining_record,
    run_stages,
)

FLOW_STAGES = ("latents", "transformer", "report")

T5_TOKENS = 256  # the zero "T5" tokens StableDiffusion3Pipeline appends without T5
FLOW_SHIFT = 1.0  # the scheduler's shift: SD3 uses 3.0 at 1024 px; 8x8 latents need none
TRANSFORMER_STEPS, TRANSFORMER_BATCH, TRANSFORMER_LR = 2000, 128, 1e-3

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,  # two 64-wide CLIP encoders' states, concatenated
    "caption_projection_dim": 64,
    "pooled_projection_dim": 128,  # two 64-wide projections, concatenated
    "pos_embed_max_size": 8,
}


class RepeatedContextProcessor:
    """``JointAttnProcessor2_0`` for a context whose last token stands for ``repeat`` identical
    tokens: that key's attention logit gets ``+ log(repeat)`` (``repeat`` copies of one key and
    value contribute ``repeat`` times its softmax weight). With ``repeat`` = 256 and one zero
    token in place of the pipeline's 256 zero T5 tokens, the transformer's output is the same
    as with the 256 tokens."""

    def __init__(self, repeat: int):
        self.log_repeat = math.log(repeat)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        k = split(attn.to_k(hidden_states))
        v = split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., -1] = self.log_repeat
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        hidden_states, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, context


def set_repeated_context(transformer, repeat: int | None) -> None:
    """Switch the transformer's attention to :class:`RepeatedContextProcessor` (``repeat``) or
    back to diffusers' default (``None``)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(
        JointAttnProcessor2_0() if repeat is None else RepeatedContextProcessor(repeat)
    )


def build_transformer():
    from diffusers import SD3Transformer2DModel  # deferred: seconds to import

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler  # deferred: seconds to import

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def build_text_encoder_with_projection(sd_text_encoder_dir: Path):
    """A ``CLIPTextModelWithProjection`` with the SD world's text encoder's weights (the
    projection newly initialized)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = CLIPTextModel.from_pretrained(sd_text_encoder_dir)
    config = CLIPTextConfig(**{**base.config.to_dict(), "projection_dim": base.config.hidden_size})
    model = CLIPTextModelWithProjection(config)
    # transformers 5: CLIPTextModel holds the text transformer directly (no .text_model)
    inner = getattr(base, "text_model", base)
    model.text_model.load_state_dict(inner.state_dict())  # strict: every weight
    return model


def shifted_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """The scheduler's ``shift`` applied to ``u`` in (0, 1): ``shift u / (1 + (shift - 1) u)``."""
    return shift * u / (1 + (shift - 1) * u)


def encode_for_training(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's CLIP conditioning (penultimate states concatenated, pooled projections
    concatenated) plus ONE zero token standing for the 256 zero T5 tokens."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, -1)
    width = TRANSFORMER_CONFIG["joint_attention_dim"]
    clip = F.pad(clip, (0, width - clip.shape[-1]))
    zero = clip.new_zeros(clip.shape[0], 1, width)
    return torch.cat([clip, zero], 1), torch.cat(pooled, -1)


# ----------------------------------------------------------------------------- stages


def stage_latents(out: Path, scale: float, seed: int, quiet: bool, sd_dir: Path) -> dict:
    from diffusers import AutoencoderKL  # deferred: seconds to import

    from tdpo.world.pretrain import _encode_latents

    n = _scaled(N_TRAIN_IMAGES, scale, 64)
    images, prompts, _ = gen.generate(n, seed=seed)  # the SD world's training images
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae").eval()
    mean, std = _encode_latents(vae, images)
    shift = float(mean.mean())
    _atomic_save({"mean": mean, "std": std, "prompts": prompts}, out / "latents.pt")
    vae.register_to_config(shift_factor=shift)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {
        "train_images": n,
        "shift_factor": shift,
        "scaling_factor": vae.config.scaling_factor,
        "std_after_shift_and_scale": float(((mean - shift) * vae.config.scaling_factor).std()),
    }


def stage_transformer(out: Path, scale: float, seed: int, quiet: bool, sd_dir: Path) -> dict:
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from tdpo.policy import tokenize
    from tdpo.world.models import n_params

    data = torch.load(out / "latents.pt", weights_only=True)
    lat_mean, lat_std, prompts = data["mean"], data["std"], data["prompts"]
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    ids = tokenize(tokenizer, prompts)
    empty = tokenize(tokenizer, [""])[0]
    torch.manual_seed(seed)
    transformer = build_transformer()
    encoders = [build_text_encoder_with_projection(sd_dir / "text_encoder") for _ in range(2)]
    set_repeated_context(transformer, T5_TOKENS)
    params = list(transformer.parameters())
    for encoder in encoders:
        params += list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=TRANSFORMER_LR, weight_decay=1e-2)
    steps = _scaled(TRANSFORMER_STEPS, scale)
    g = torch.Generator().manual_seed(seed + 17)
    batch = TRANSFORMER_BATCH

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(0, len(lat_mean), (batch,), generator=g)
        eps = torch.randn(lat_mean[idx].shape, generator=g)
        x0 = (lat_mean[idx] + lat_std[idx] * eps - shift) * sf
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < CAPTION_DROPOUT] = empty
        u = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1)
        s = shifted_sigmas(u).view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - s) * x0 + s * noise
        context, pooled = encode_for_training(encoders, tok)
        pred = transformer(
            hidden_states=xs,
            timestep=s.flatten() * 1000,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item()}

    owners = {
        "transformer": transformer,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1],
    }
    logs = _train_loop("transformer", out, owners, opt, steps, step_fn, quiet, TRANSFORMER_LR)
    set_repeated_context(transformer, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=build_flow_scheduler(),
        vae=vae,
        text_encoder=encoders[0].eval(),
        tokenizer=tokenizer,
        text_encoder_2=encoders[1].eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        _copy_bpe_files(sd_dir / "tokenizer", out / "pipeline" / name)
    return {
        "steps": steps,
        "batch": batch,
        "transformer_params": n_params(transformer),
        "text_encoder_params": n_params(encoders[0]) + n_params(encoders[1]),
        **logs,
    }


def load_flow_pipeline(path: str | Path):
    from tdpo.flow import load_flow_pipeline as _load

    return _load(str(path))


@torch.no_grad()
def sample_ode(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = DEFAULT_FLOW_STEPS,
    guidance: float = DEFAULT_FLOW_GUIDANCE,
    batch: int = 128,
) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] from ``StableDiffusion3Pipeline.__call__`` (its Euler
    ODE sampler), deterministic by seed."""

    def draw(chunk: list[str], g: torch.Generator) -> torch.Tensor:
        return pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt"
        ).images

    return batched_images(prompts, seed, batch, draw)


@torch.no_grad()
def sample_sde(
    path: str | Path,
    prompts: list[str],
    seed: int = 0,
    steps: int = DEFAULT_FLOW_STEPS,
    guidance: float = DEFAULT_FLOW_GUIDANCE,
    noise_level: float = DEFAULT_FLOW_NOISE_LEVEL,
    batch: int = 128,
) -> torch.Tensor:
    """Images from tdpo's SDE sampler (:class:`tdpo.flow.FlowPolicy`, what RL fine-tuning
    samples from) at ``noise_level``, deterministic by seed."""
    from tdpo.config import ModelConfig, SampleConfig
    from tdpo.flow import FlowPolicy

    policy = FlowPolicy.from_config(
        ModelConfig(pretrained=str(path), finetune="full"),
        SampleConfig(num_steps=steps, guidance_scale=guidance, noise_level=noise_level),
    )
    policy.unet.requires_grad_(False).eval()

    def draw(chunk: list[str], g: torch.Generator) -> torch.Tensor:
        noise = torch.randn((len(chunk), *policy.noise_shape), generator=g)
        return policy.sample(policy.unet, chunk, noise).images

    return batched_images(prompts, seed, batch, draw)


def evaluate_flow_world(
    pipeline_dir: str | Path,
    n: int = N_EVAL,
    seed: int = 0,
    quiet: bool = True,
    weights_dir: str | Path = WEIGHTS_DIR,
    n_clean: int = 512,
) -> dict[str, Any]:
    """The base flow model's gold figures (seen / unseen prompts, ``n`` each) with the
    pipeline's ODE sampler and tdpo's SDE sampler, and the learned rewards (of ``weights_dir``)
    against gold on them."""
    pipeline_dir = Path(pipeline_dir)
    pipe = load_flow_pipeline(pipeline_dir)
    samples: dict[str, Any] = {}
    sde: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name, prompts, s in eval_draws(n, seed):
        t0 = time.time()
        samples[name] = {"images": to_uint8(sample_ode(pipe, prompts, seed=s)), "prompts": prompts}
        timings[f"ode_{name}"] = round(time.time() - t0, 1)
        t0 = time.time()
        images = sample_sde(pipeline_dir, prompts, seed=s)
        timings[f"sde_{name}"] = round(time.time() - t0, 1)
        sde[name.replace("eval_", "base_")] = dict(gold_summary(images, prompts), n=n)
        if not quiet:
            print(f"[world] flow: sampled {n} x 2 base images ({name})", flush=True)
    imgs, prompts, _ = gen.generate(n_clean, seed=seed + 404)
    samples["clean"] = {"images": to_uint8(imgs), "prompts": prompts}
    report = evaluate_world(
        weights_dir, samples=samples, retrieval_images=0, hack_images=0, pipeline_dir=pipeline_dir
    )
    report["sampler"] = {
        "ode": {"steps": DEFAULT_FLOW_STEPS, "guidance": DEFAULT_FLOW_GUIDANCE},
        "sde": {
            "steps": DEFAULT_FLOW_STEPS,
            "guidance": DEFAULT_FLOW_GUIDANCE,
            "noise_level": DEFAULT_FLOW_NOISE_LEVEL,
        },
    }
    report["gold_sde"] = sde
    report["sampling_seconds"] = timings
    return report


def stage_report(out: Path, scale: float, seed: int, quiet: bool, sd_dir: Path) -> dict:
    report = evaluate_flow_world(
        out / "pipeline",
        n=_scaled(N_EVAL, scale, 16),
        seed=seed,
        quiet=quiet,
        n_clean=_scaled(512, scale, 16),
    )
    report.update(pretraining_record(out, FLOW_STAGES[:-1]))
    _write_json(out / "flow_report.json", report)
    return {"report": str(out / "flow_report.json")}


FLOW_STAGE_FNS = {
    "latents": stage_latents,
    "transformer": stage_transformer,
    "report": stage_report,
}


def run_flow_pretrain(
    out: str | Path,
    steps_scale: float = 1.0,
    seed: int = 0,
    stages: list[str] | None = None,
    quiet: bool = False,
    num_threads: int = 1,
    sd_dir: str | Path = PIPELINE_DIR,
) -> dict:
    """Run (or resume) the flow stages into ``out``, reusing the SD world's VAE, tokenizer and
    text encoder from ``sd_dir`` (default: the shipped pipeline); returns {stage: info}."""
    torch.set_num_threads(num_threads)
    out, sd_dir = Path(out), Path(sd_dir)
    out.mkdir(parents=True, exist_ok=True)

    def run_stage(stage: str) -> dict:
        return FLOW_STAGE_FNS[stage](out, steps_scale, seed, quiet, sd_dir)

    return run_stages(out, stages or FLOW_STAGES, run_stage, quiet, "flow stage")
