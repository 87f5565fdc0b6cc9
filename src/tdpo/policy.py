"""The diffusion policy: a diffusers Stable Diffusion pipeline's components, driven by our own loop.

``sample`` runs DDIM with eta > 0, so each step ``x_{k+1} ~ N(mu_theta(x_k, t_k, c), sigma_k^2 I)``
is a Gaussian policy step, and returns a :class:`Trajectory`. ``step_log_prob`` re-evaluates one
step's log-probability under the current weights for training. We own the sampling loop rather
than subclassing the pipeline (its ``__call__`` hides the latents and log-probs).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from tdpo.algos.ddim import ddim_step_logprob, gaussian_log_prob
from tdpo.config import ModelConfig, SampleConfig
from tdpo.errors import UsageError
from tdpo.paths import check_pipeline_path, looks_like_path, resolve_alias


@dataclass
class Trajectory:
    """A batch of sampled denoising trajectories (B samples, T steps).

    ``latents[:, k]`` is the state x before step k (k=0 is pure noise x_T) and ``latents[:, k+1]``
    the state after it; ``log_probs[:, k]`` is log pi_old(latents[:, k+1] | latents[:, k]).
    """

    latents: torch.Tensor  # [B, T+1, C, h, w]
    log_probs: torch.Tensor  # [B, T]
    timesteps: torch.Tensor  # [B, T] scheduler timesteps t_k
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D] unconditional embeddings (CFG) or None
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], decoded x_0
    prompts: list[str]
    ref_log_probs: torch.Tensor | None = None  # [B, T] under the frozen base model (KL penalty)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def to(self, device: torch.device | str) -> Trajectory:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Trajectory(**moved)

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        out = {}
        for f in fields(Trajectory):
            values = [getattr(item, f.name) for item in items]
            if f.name == "prompts":
                out[f.name] = [p for v in values for p in v]
            elif values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values)
        return Trajectory(**out)


def load_pipeline(spec: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained`` on a Hub id or folder, with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    spec = resolve_alias(spec)
    check_pipeline_path(spec)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(Path(spec).expanduser()) if looks_like_path(spec) else spec,
            revision=revision,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            "model.pretrained", spec, f"cannot load a Stable Diffusion pipeline ({first[:200]})"
        ) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusionPolicy(nn.Module):
    """Frozen VAE and text encoder, a UNet with trainable LoRA (or fully trainable), DDIM."""

    def __init__(self, pipe, model_cfg: ModelConfig, sample_cfg: SampleConfig):
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.model_cfg = model_cfg
        self.sample_cfg = sample_cfg
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()
        self.reference_unet: nn.Module | None = None
        if model_cfg.finetune == "lora":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            lora = LoraConfig(
                r=model_cfg.lora_rank,
                lora_alpha=model_cfg.lora_alpha,
                init_lora_weights="gaussian",  # B = 0: the adapted model starts as the base model
                target_modules=list(model_cfg.lora_targets),
            )
            try:
                self.unet.add_adapter(lora)
            except ValueError as exc:
                raise UsageError(
                    "model.lora_targets",
                    model_cfg.lora_targets,
                    f"no such UNet modules ({exc}); e.g. to_q,to_k,to_v,to_out.0",
                ) from None
            for p in self.unet.parameters():
                if p.requires_grad:
                    p.data = (
                        p.data.float()
                    )  # trainable LoRA weights stay fp32 under mixed precision
        else:
            self.unet.requires_grad_(True)
        self._neg_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, sample_cfg: SampleConfig, dtype: torch.dtype = torch.float32
    ) -> DiffusionPolicy:
        pipe = load_pipeline(model_cfg.pretrained, model_cfg.revision, dtype)
        return cls(pipe, model_cfg, sample_cfg)

    # -- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def use_cfg(self) -> bool:
        return self.sample_cfg.guidance_scale > 1.0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def enable_kl_reference(self) -> None:
        """Keep a frozen copy of the base UNet for the KL penalty (LoRA uses disabled adapters)."""
        if self.model_cfg.finetune == "full" and self.reference_unet is None:
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_mode(self, unet: nn.Module):
        """The frozen base model: LoRA adapters disabled (or the stored full copy)."""
        if self.model_cfg.finetune == "lora":
            base = _unwrap(unet)
            base.disable_adapters()
            try:
                yield unet
            finally:
                base.enable_adapters()
        else:
            yield self.reference_unet

    # -- prompts ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(tokens)[0]

    def negative_embeds(self, batch: int) -> torch.Tensor:
        key = (self.device, self.text_encoder.dtype)
        if key not in self._neg_cache:
            self._neg_cache[key] = self.encode_prompts([""])
        return self._neg_cache[key].expand(batch, -1, -1)

    # -- denoiser -----------------------------------------------------------------------------

    def predict_noise(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The UNet's output, with classifier-free guidance when ``negative_embeds`` is given."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        dtype = _unwrap(unet).dtype
        if negative_embeds is None:
            return unet(latents.to(dtype), timesteps, prompt_embeds.to(dtype)).sample.float()
        both = unet(
            torch.cat([latents, latents]).to(dtype),
            torch.cat([timesteps, timesteps]),
            torch.cat([negative_embeds, prompt_embeds]).to(dtype),
        ).sample.float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable; wrap in no_grad where nothing trains)."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        unet: nn.Module,
        prompts: list[str],
        noise: torch.Tensor,
        with_reference: bool = False,
        progress=None,
    ) -> Trajectory:
        """Sample trajectories for ``prompts`` with DDIM (eta > 0) and record every step.

        ``noise`` [B, T+1, C, h, w] holds x_T (``noise[:, 0]``) and the standard-normal draw of
        each step k (``noise[:, k+1]``), so that a sample is reproducible from its own seed.
        """
        cfg = self.sample_cfg
        batch = len(prompts)
        self.scheduler.set_timesteps(cfg.num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        prompt_embeds = self.encode_prompts(prompts)
        negative = self.negative_embeds(batch) if self.use_cfg else None
        noise = noise.to(self.device, torch.float32)
        latents = noise[:, 0] * self.scheduler.init_noise_sigma
        all_latents, log_probs, ref_log_probs = [latents], [], []
        for k, t in enumerate(timesteps):
            noise_pred = self.predict_noise(
                unet, latents, t, prompt_embeds, negative, cfg.guidance_scale
            )
            # x_{k+1} = mu_theta(x_k) + sigma_k * z_k, and log pi_theta(x_{k+1} | x_k)
            mean_std = ddim_step_logprob(
                self.scheduler, noise_pred, t, latents, cfg.eta, prev_sample=latents
            )
            next_latents = mean_std.mean + mean_std.std * noise[:, k + 1]
            log_prob = gaussian_log_prob(next_latents, mean_std.mean, mean_std.std)
            if with_reference:
                with self.reference_mode(unet) as ref_unet:
                    ref_pred = self.predict_noise(
                        ref_unet, latents, t, prompt_embeds, negative, cfg.guidance_scale
                    )
                ref = ddim_step_logprob(
                    self.scheduler, ref_pred, t, latents, cfg.eta, prev_sample=next_latents
                )
                ref_log_probs.append(ref.log_prob)
            latents = next_latents.float()
            all_latents.append(latents)
            log_probs.append(log_prob)
            if progress is not None:
                progress.update(1)
        images = self.decode(latents)
        return Trajectory(
            latents=torch.stack(all_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=timesteps.unsqueeze(0).expand(batch, -1).clone(),
            prompt_embeds=prompt_embeds,
            negative_embeds=negative.clone() if negative is not None else None,
            images=images,
            prompts=list(prompts),
            ref_log_probs=torch.stack(ref_log_probs, dim=1) if with_reference else None,
        )

    def step_log_prob(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """log pi_theta(next | latents) under the current weights, for per-sample timesteps [B].

        Pass ``negative_embeds=None`` to re-evaluate without classifier-free guidance."""
        noise_pred = self.predict_noise(
            unet, latents, timesteps, prompt_embeds, negative_embeds, self.sample_cfg.guidance_scale
        )
        return ddim_step_logprob(
            self.scheduler,
            noise_pred,
            timesteps,
            latents,
            self.sample_cfg.eta,
            prev_sample=next_latents,
        ).log_prob

    # -- export -------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(_unwrap(self.unet)))

    def save_final(self, directory: Path) -> None:
        """LoRA in diffusers format (``pipe.load_lora_weights(directory)``), or the full UNet."""
        from diffusers import StableDiffusionPipeline

        directory.mkdir(parents=True, exist_ok=True)
        unet = _unwrap(self.unet)
        if self.model_cfg.finetune == "lora":
            StableDiffusionPipeline.save_lora_weights(
                directory,
                unet_lora_layers={
                    k: v.detach().float().cpu() for k, v in self.lora_state_dict().items()
                },
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
        else:
            unet.save_pretrained(directory / "unet", safe_serialization=True)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
