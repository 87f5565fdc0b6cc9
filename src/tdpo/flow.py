"""The flow-matching policy: a diffusers ``StableDiffusion3Pipeline``'s components, driven by our
own SDE sampler.

Stable Diffusion 3 / 3.5 is a rectified-flow transformer (``SD3Transformer2DModel``) sampled by
``FlowMatchEulerDiscreteScheduler``: the noise level ``s`` falls from 1 to 0 and each step moves
``x`` along the predicted velocity (an ODE, no policy). :meth:`FlowPolicy.sample` runs Flow-GRPO's
SDE instead (:mod:`tdpo.algos.flow`, noise level ``sample.noise_level``), so each step is a
Gaussian ``N(mean_theta(x_k, s_k, c), std_k^2 I)`` with an exact log-probability, and returns a
:class:`~tdpo.policy_base.Trajectory` as :class:`tdpo.policy.DiffusionPolicy` does: the methods
(TDPO, TDPO-R, DDPO, GRPO, AlignProp) use either policy through the same interface. With noise
level 0 the sampler is ``StableDiffusion3Pipeline.__call__``'s Euler loop.

Conditioning as the pipeline's ``encode_prompt``: both CLIP encoders' penultimate hidden states
concatenated and zero-padded to the transformer's ``joint_attention_dim``, followed on the token
axis by T5's states (zeros when the pipeline has no T5, as the pipeline does); the pooled
projection is both CLIPs' ``text_embeds`` concatenated. The unconditional embedding encodes the
empty prompt (SD3 does not zero it). Classifier-free guidance mixes the velocities,
``v = v_uncond + w (v_cond - v_uncond)``.

The trained denoiser (the transformer) is ``self.unet``: the trainer, the methods and checkpoints
treat it as SD's UNet. The LoRA exports for ``StableDiffusion3Pipeline.load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tdpo.algos.flow import FlowStepOutput, flow_sde_step_logprob
from tdpo.config import ModelConfig, SampleConfig
from tdpo.errors import UsageError
from tdpo.policy_base import FLOW_PIPELINES, Conditions, PolicyBase, denoiser_dtype, unwrap

T5_MAX_LENGTH = 256  # the pipeline's default max_sequence_length for T5 (zeros without T5)
DEFAULT_NOISE_LEVEL = 0.7  # Flow-GRPO's default a


def _absent_components(
    location: str, revision: str | None, local_files_only: bool = False
) -> dict[str, None]:
    """``{name: None}`` for the pipeline's components saved as null in ``model_index.json``
    (e.g. T5 saved as ``text_encoder_3=None``): ``from_pretrained`` refuses a folder without
    them unless they are passed as None."""
    from diffusers import DiffusionPipeline  # deferred: seconds to import

    config = DiffusionPipeline.load_config(
        location, revision=revision, local_files_only=local_files_only
    )
    if config.get("_class_name") not in FLOW_PIPELINES:
        raise ValueError(f"{location} is a {config.get('_class_name')}, not a flow pipeline")
    return {
        name: None
        for name, value in config.items()
        if not name.startswith("_") and isinstance(value, list) and value[:1] == [None]
    }


def load_flow_pipeline(
    location: str, revision: str | None = None, dtype=torch.float32, local_files_only=False
):
    """``StableDiffusion3Pipeline.from_pretrained`` of a folder or Hub id, absent components
    (T5) passed as None, with a ``FlowMatchEulerDiscreteScheduler`` and no progress bar.
    ``local_files_only``: read the local Hugging Face cache only (the Hub cannot be reached)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    absent = _absent_components(location, revision, local_files_only)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        location,
        revision=revision,
        torch_dtype=dtype,
        local_files_only=local_files_only,
        **absent,
    )
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FlowPolicy(PolicyBase):
    """Frozen VAE and text encoders, an SD3 transformer with trainable LoRA (or fully
    trainable), Flow-GRPO's SDE sampler."""

    denoiser_name = "transformer"

    def __init__(self, pipe, model_cfg: ModelConfig, sample_cfg: SampleConfig):
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.transformer  # "unet": the trained denoiser, as the trainer names it
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = pipe.text_encoder_2
        self.text_encoder_3 = getattr(pipe, "text_encoder_3", None)
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = pipe.tokenizer_2
        self.tokenizer_3 = getattr(pipe, "tokenizer_3", None)
        self.scheduler = pipe.scheduler
        self.model_cfg = model_cfg
        self.sample_cfg = sample_cfg
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise UsageError(
                "model.pretrained",
                model_cfg.pretrained,
                "has no CLIP text encoders (text_encoder, text_encoder_2); give a full "
                "Stable Diffusion 3 pipeline (T5, text_encoder_3, may be absent)",
            )
        self.vae.requires_grad_(False).eval()
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()
        self._setup_finetune("transformer")
        self._neg_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._schedules: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, sample_cfg: SampleConfig, dtype: torch.dtype = torch.float32
    ) -> FlowPolicy:
        from tdpo.backbones.sources import hub_access
        from tdpo.paths import resolve_alias

        location = resolve_alias(model_cfg.pretrained)
        if Path(location).expanduser().is_dir():
            location = str(Path(location).expanduser())
        try:  # a Hub id: the local cache only when the Hub cannot be reached (no retries)
            with hub_access(location) as cache_only:
                pipe = load_flow_pipeline(location, model_cfg.revision, dtype, cache_only)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                "model.pretrained", model_cfg.pretrained, f"cannot load it ({first[:200]})"
            ) from None
        return cls(pipe, model_cfg, sample_cfg)

    # -- properties ---------------------------------------------------------------------------

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    @property
    def text_encoders(self) -> list[nn.Module]:
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [e for e in encoders if e is not None]

    @property
    def text_feature_dim(self) -> int:
        """Width of the prompt embeddings (the critic's prompt features)."""
        return self.unet.config.joint_attention_dim

    @property
    def noise_level(self) -> float:
        return getattr(self.sample_cfg, "noise_level", DEFAULT_NOISE_LEVEL)

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T], sigmas [T+1])`` of ``sample.num_steps`` steps, as the pipeline sets
        them (resolution-dependent shift ``mu`` when the scheduler asks for it); the last sigma
        is 0. Kept per device: the pipeline's ``__call__`` may reset the shared scheduler."""
        device = torch.device(device or self.device)
        steps = self.sample_cfg.num_steps
        key = (steps, str(device))
        if key not in self._schedules:
            kwargs = {}
            config = self.scheduler.config
            if config.get("use_dynamic_shifting", False):
                from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                    calculate_shift,
                )

                size = self.unet.config.sample_size // self.unet.config.patch_size
                kwargs["mu"] = calculate_shift(
                    size * size,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.16),
                )
            self.scheduler.set_timesteps(steps, device=device, **kwargs)
            self._schedules[key] = (
                self.scheduler.timesteps.clone().float(),
                self.scheduler.sigmas.clone().to(device=device, dtype=torch.float32),
            )
        return self._schedules[key]

    def _sigmas_of(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(s, s')`` of the steps at ``timesteps`` [B] (values of the schedule)."""
        schedule_t, sigmas = self.schedule(timesteps.device)
        distance = (timesteps.float()[:, None] - schedule_t[None, :]).abs()
        gap, index = distance.min(dim=1)
        if bool((gap > 1e-3).any()):
            raise ValueError(
                f"timesteps {timesteps.tolist()} are not all in the schedule "
                f"{schedule_t.tolist()} of sample.num_steps={self.sample_cfg.num_steps}"
            )
        return sigmas[index], sigmas[index + 1]

    def _sigma_at_one(self, device) -> torch.Tensor:
        """Flow-GRPO's stand-in for s = 1 in sigma_s's denominator: the schedule's second sigma."""
        sigmas = self.schedule(device)[1]
        return sigmas[1] if len(sigmas) > 1 else sigmas.new_zeros(())

    # -- prompts ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, L + 256, joint_attention_dim], pooled [B, P])`` as the pipeline's
        ``encode_prompt`` (no clip skip; both CLIP tokenizers padded to the first one's
        length)."""
        max_length = self.tokenizer.model_max_length
        hidden, pooled = [], []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2].to(self.text_encoder.dtype))
        clip = torch.cat(hidden, dim=-1)
        width = self.unet.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros(
                len(prompts), T5_MAX_LENGTH, width, device=self.device, dtype=clip.dtype
            )
        else:
            ids = self.tokenizer_3(
                prompts,
                padding="max_length",
                max_length=T5_MAX_LENGTH,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            t5 = self.text_encoder_3(ids)[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def negative_embeds(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's conditioning for CFG (encoded, as SD3's pipeline does), ``batch``
        times."""
        key = (self.device, self.text_encoder.dtype)
        if key not in self._neg_cache:
            self._neg_cache[key] = self.encode_prompts([""])
        embeds, pooled = self._neg_cache[key]
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    # -- denoiser -----------------------------------------------------------------------------

    def predict_velocity(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
        pooled: torch.Tensor | None,
        negative_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity, with classifier-free guidance on the velocity when
        ``negative_embeds`` is given (unconditional half first, as the pipeline batches it)."""
        if pooled is None:
            raise ValueError("a Stable Diffusion 3 policy needs the pooled text embeddings")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        dtype = denoiser_dtype(unet)
        if negative_embeds is None:
            return unet(
                hidden_states=latents.to(dtype),
                timestep=timesteps,
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                return_dict=False,
            )[0].float()
        both = unet(
            hidden_states=torch.cat([latents, latents]).to(dtype),
            timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dtype),
            pooled_projections=torch.cat([negative_pooled, pooled]).to(dtype),
            return_dict=False,
        )[0].float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    predict_noise = predict_velocity  # the name DiffusionPolicy's callers know

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable), with the VAE's scaling and shift
        factors as the pipeline."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # -- sampling (the loops: PolicyBase.sample, .sample_with_grad, .step_log_prob) -----------

    def _start(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule's timesteps (``1000 s``) and x at s = 1, ``noise[:, 0]``."""
        return self.schedule()[0], noise[:, 0]

    def _step(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        k: int | None,
        t: torch.Tensor,
        conditions: Conditions,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> FlowStepOutput:
        """One SDE step ``s_k -> s_{k+1}`` (the schedule's sigmas; ``k=None``: those of the
        per-sample timesteps ``t``): log pi_theta(``prev_sample`` | ``latents``), or a draw
        ``mean + std * noise``."""
        if k is None:
            sigma, sigma_next = self._sigmas_of(t)
        else:
            sigmas = self.schedule(latents.device)[1]
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
        velocity = self._guided_prediction(unet, latents, t, conditions)
        return flow_sde_step_logprob(
            velocity,
            sigma,
            sigma_next,
            latents,
            self.noise_level,
            self._sigma_at_one(latents.device),
            prev_sample=prev_sample,
            noise=noise,
        )

    # -- export -------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's LoRA weights, peft names (what SD3's ``save_lora_weights`` takes)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unwrap(self.unet))
