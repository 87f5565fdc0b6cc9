"""The diffusion policy: a diffusers Stable Diffusion pipeline's components, driven by our own loop.

``sample`` runs DDIM with eta > 0, so each step ``x_{k+1} ~ N(mu_theta(x_k, t_k, c), sigma_k^2 I)``
is a Gaussian policy step, and returns a :class:`Trajectory`. ``step_log_prob`` re-evaluates one
step's log-probability under the current weights for training. The loops are
:class:`~tdpo.policy_base.PolicyBase`'s, shared with the flow policy; the DDIM step is here. We own the sampling loop rather
than subclassing the pipeline (its ``__call__`` hides the latents and log-probs).

Stable Diffusion 1.x/2.x (one CLIP text encoder) and SDXL (two text encoders; the UNet also takes
the pooled text embedding and the size/crop "time ids" as added conditions) are supported; the
added conditions ride along in :class:`Trajectory` as ``pooled_embeds`` / ``negative_pooled``.
Stable Diffusion 3 (a flow-matching transformer) has its own policy with the same interface,
:class:`tdpo.flow.FlowPolicy`; :meth:`DiffusionPolicy.from_config` picks the class from the
pipeline's ``model_index.json`` (:func:`make_policy`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tdpo.algos.ddim import DDIMStepOutput, ddim_step_logprob
from tdpo.config import ModelConfig, SampleConfig
from tdpo.errors import UsageError
from tdpo.paths import check_pipeline_path, looks_like_path, resolve_alias
from tdpo.policy_base import (  # noqa: F401  (re-exported: the project imports them from here)
    FLOW_PIPELINES,
    Conditions,
    PolicyBase,
    Trajectory,
    denoiser_dtype,
    tokenize,
    unwrap,
)

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
)


def _load_error(spec: str, exc: Exception) -> UsageError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UsageError(
        "model.pretrained", spec, f"cannot load a Stable Diffusion pipeline ({first[:200]})"
    )


def _location(spec: str) -> str:
    """A pipeline spec as ``from_pretrained`` takes it: alias resolved, a path expanded."""
    spec = resolve_alias(spec)
    return str(Path(spec).expanduser()) if looks_like_path(spec) else spec


def pipeline_class(spec: str, revision: str | None = None) -> str:
    """The pipeline class named in ``model_index.json`` (Hub id or folder; only that file is
    read); a UsageError unless it is one tdpo fine-tunes.

    Loads here and in :func:`load_pipeline` run in :func:`tdpo.backbones.sources.hub_access`: a
    folder needs no Hub; a Hub id reads the local cache only when the Hub cannot be reached, so
    that a cached pipeline loads at once and a missing one fails at once, not after
    huggingface_hub's retries."""
    from diffusers import DiffusionPipeline

    from tdpo.backbones.sources import hub_access

    spec = resolve_alias(spec)
    check_pipeline_path(spec)  # past it, spec is an existing folder or a Hub id
    location = _location(spec)
    try:
        with hub_access(location) as cache_only:
            config = DiffusionPipeline.load_config(
                location, revision=revision, local_files_only=cache_only
            )
        class_name = config.get("_class_name")
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from None
    if class_name not in SUPPORTED_PIPELINES:
        raise UsageError(
            "model.pretrained",
            spec,
            f"is a {class_name}; tdpo fine-tunes {', '.join(SUPPORTED_PIPELINES[:-1])} and "
            f"{SUPPORTED_PIPELINES[-1]} pipelines",
        )
    return class_name


def load_pipeline(spec: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """``from_pretrained`` of a Stable Diffusion 1.x/2.x or SDXL pipeline (Hub id or folder),
    with a DDIM scheduler, or of a Stable Diffusion 3 pipeline with its flow-matching Euler
    scheduler (T5 may be absent: saved as ``text_encoder_3=None``). The class comes from the
    pipeline's ``model_index.json``."""
    import diffusers
    from diffusers import DDIMScheduler

    from tdpo.backbones.sources import hub_access

    class_name = pipeline_class(spec, revision)
    location = _location(spec)
    extra = {}
    if class_name == "StableDiffusionPipeline":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if class_name in FLOW_PIPELINES:
        from tdpo.flow import load_flow_pipeline  # deferred: only for flow models

        try:
            with hub_access(location) as cache_only:
                return load_flow_pipeline(location, revision, dtype, cache_only)
        except (OSError, ValueError) as exc:
            raise _load_error(spec, exc) from None
    try:
        with hub_access(location) as cache_only:
            pipe = getattr(diffusers, class_name).from_pretrained(
                location,
                revision=revision,
                torch_dtype=dtype,
                local_files_only=cache_only,
                **extra,
            )
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_policy(pipe, model_cfg: ModelConfig, sample_cfg: SampleConfig) -> PolicyBase:
    """The policy of a loaded pipeline: :class:`tdpo.flow.FlowPolicy` for flow-matching
    pipelines (Stable Diffusion 3), :class:`DiffusionPolicy` (DDIM) for the others."""
    if type(pipe).__name__ in FLOW_PIPELINES:
        from tdpo.flow import FlowPolicy  # deferred: only for flow models

        return FlowPolicy(pipe, model_cfg, sample_cfg)
    return DiffusionPolicy(pipe, model_cfg, sample_cfg)


class DiffusionPolicy(PolicyBase):
    """Frozen VAE and text encoder(s), a UNet with trainable LoRA (or fully trainable), DDIM."""

    def __init__(self, pipe, model_cfg: ModelConfig, sample_cfg: SampleConfig):
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        # SDXL: a second text encoder (with projection) and added conditions for the UNet.
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.scheduler = pipe.scheduler
        self.model_cfg = model_cfg
        self.sample_cfg = sample_cfg
        if self.text_encoder is None:
            raise UsageError(
                "model.pretrained",
                model_cfg.pretrained,
                "has no first text encoder (an SDXL refiner?); give a base pipeline",
            )
        self.vae.requires_grad_(False)
        self.vae.eval()
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()
        if getattr(self.vae.config, "force_upcast", False) and self.vae.dtype == torch.float16:
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16, as the pipeline knows
        self.add_time_ids = self._add_time_ids() if self.is_sdxl else None
        self._setup_finetune("UNet")
        self._neg_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, sample_cfg: SampleConfig, dtype: torch.dtype = torch.float32
    ) -> PolicyBase:
        """Load ``model_cfg.pretrained`` and wrap it in the policy of its pipeline class."""
        pipe = load_pipeline(model_cfg.pretrained, model_cfg.revision, dtype)
        return make_policy(pipe, model_cfg, sample_cfg)

    # -- properties ---------------------------------------------------------------------------

    @property
    def text_feature_dim(self) -> int:
        """Width of the prompt embeddings (the critic's prompt features)."""
        return self.unet.config.cross_attention_dim

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def _add_time_ids(self) -> torch.Tensor:
        """SDXL's micro-conditioning for unconditioned crops at the native size:
        (original h, w, crop top, left, target h, w), as the pipeline's defaults."""
        size = self.image_size
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
        config = self.unet.config
        expected = self.unet.add_embedding.linear_1.in_features
        got = config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if got != expected:
            raise UsageError(
                "model.pretrained",
                self.model_cfg.pretrained,
                f"SDXL UNet expects {expected} added-condition features, the text encoder and "
                f"time ids give {got}; an SDXL refiner or an inconsistent pipeline?",
            )
        return ids

    # -- prompts ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning: ``(prompt_embeds [B, L, D], pooled [B, P] or None)``.

        SD 1.x/2.x: the text encoder's last hidden state. SDXL (as its pipeline's
        ``encode_prompt``): both encoders' penultimate hidden states concatenated, and the
        second encoder's projected pooled output."""

        def tokens(tokenizer):
            return tokenize(tokenizer, prompts).to(self.device)

        if not self.is_sdxl:
            return self.text_encoder(tokens(self.tokenizer))[0], None
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(tokens(tokenizer), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]  # CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def negative_embeds(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional (empty prompt) conditioning for CFG, ``batch`` times. SDXL with
        ``force_zeros_for_empty_prompt`` (its default) uses zeros, as its pipeline does."""
        key = (self.device, self.text_encoder.dtype)
        if key not in self._neg_cache:
            embeds, pooled = self.encode_prompts([""])
            if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", True):
                embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            self._neg_cache[key] = (embeds, pooled)
        embeds, pooled = self._neg_cache[key]
        if pooled is not None:
            pooled = pooled.expand(batch, -1)
        return embeds.expand(batch, -1, -1), pooled

    # -- denoiser -----------------------------------------------------------------------------

    def predict_noise(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
        pooled: torch.Tensor | None = None,
        negative_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's output, with classifier-free guidance when ``negative_embeds`` is given.
        ``pooled`` / ``negative_pooled``: SDXL's pooled text embeddings (None otherwise)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        dtype = denoiser_dtype(unet)
        if negative_embeds is None:
            added = self._added_conditions(pooled, dtype)
            return unet(
                latents.to(dtype), timesteps, prompt_embeds.to(dtype), added_cond_kwargs=added
            ).sample.float()
        both_pooled = None if pooled is None else torch.cat([negative_pooled, pooled])
        both = unet(
            torch.cat([latents, latents]).to(dtype),
            torch.cat([timesteps, timesteps]),
            torch.cat([negative_embeds, prompt_embeds]).to(dtype),
            added_cond_kwargs=self._added_conditions(both_pooled, dtype),
        ).sample.float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _added_conditions(self, pooled: torch.Tensor | None, dtype) -> dict | None:
        """SDXL's ``added_cond_kwargs``: pooled text embedding and time ids (None for SD 1/2)."""
        if not self.is_sdxl:
            return None
        if pooled is None:
            raise ValueError("an SDXL policy needs the pooled text embeddings")
        time_ids = self.add_time_ids.to(pooled.device, dtype).expand(pooled.shape[0], -1)
        return {"text_embeds": pooled.to(dtype), "time_ids": time_ids}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable; wrap in no_grad where nothing trains)."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # -- sampling (the loops: PolicyBase.sample, .sample_with_grad, .step_log_prob) -----------

    def _start(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM's timesteps of ``sample.num_steps`` steps, and x_T = ``noise[:, 0]`` scaled by
        the scheduler's initial sigma."""
        self.scheduler.set_timesteps(self.sample_cfg.num_steps, device=self.device)
        return self.scheduler.timesteps, noise[:, 0] * self.scheduler.init_noise_sigma

    def _step(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        k: int | None,
        t: torch.Tensor,
        conditions: Conditions,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> DDIMStepOutput:
        """One DDIM step (eta = ``sample.eta``) at timestep ``t`` (DDIM needs no step index
        ``k``): log pi_theta(``prev_sample`` | ``latents``), or a draw from ``noise``."""
        noise_pred = self._guided_prediction(unet, latents, t, conditions)
        # drawing (prev_sample None): x_{k+1} = mu_theta(x_k) + sigma_k * z_k with z = noise,
        # and log pi_theta(x_{k+1} | x_k); else log pi_theta(prev_sample | x_k)
        return ddim_step_logprob(
            self.scheduler,
            noise_pred,
            t,
            latents,
            self.sample_cfg.eta,
            prev_sample=prev_sample,
            noise=noise,
        )

    # -- export -------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's LoRA weights, diffusers names."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(self.unet)))
