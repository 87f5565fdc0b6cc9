"""What every policy shares (DDIM's :class:`tdpo.policy.DiffusionPolicy` and the flow-matching
:class:`tdpo.flow.FlowPolicy`): the sampled :class:`Trajectory`, the sampling loops
(:meth:`PolicyBase.sample`, :meth:`PolicyBase.sample_with_grad`) and the re-evaluated log-prob
(:meth:`PolicyBase.step_log_prob`) written once against each family's step, LoRA or full
fine-tuning of the denoiser, the frozen base model for the KL, and prompt tokenization.
Re-exported by :mod:`tdpo.policy`, where the rest of the project imports them from."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from tdpo.config import ModelConfig, SampleConfig
from tdpo.errors import UsageError

FLOW_PIPELINES = ("StableDiffusion3Pipeline",)  # flow matching: tdpo.flow.FlowPolicy


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
    pooled_embeds: torch.Tensor | None = None  # [B, P] SDXL's pooled text embedding (else None)
    negative_pooled: torch.Tensor | None = None  # [B, P] its unconditional counterpart (CFG)
    x0_preds: torch.Tensor | None = None  # [B, T, C, h, w] the denoiser's x_0 estimate at step k

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


class Conditions(NamedTuple):
    """A batch's text conditioning c, as the denoiser takes it (``negative_*``: the empty
    prompt's, for classifier-free guidance, or None without it; ``pooled``: SDXL's / SD3's
    pooled text embedding, None for SD 1/2)."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D]
    pooled: torch.Tensor | None  # [B, P]
    negative_pooled: torch.Tensor | None  # [B, P]


class PolicyStep(Protocol):
    """One step of a family's sampler, the Gaussian policy
    ``pi_theta(x_{k+1} | x_k, c) = N(mean, std^2 I)`` (:class:`tdpo.algos.ddim.DDIMStepOutput`,
    :class:`tdpo.algos.flow.FlowStepOutput`)."""

    prev_sample: torch.Tensor  # x_{k+1}
    log_prob: torch.Tensor  # [B] log pi_theta(x_{k+1} | x_k), averaged over the non-batch dims
    mean: torch.Tensor  # mu_theta(x_k, t_k, c)
    std: torch.Tensor  # sigma_k, [B, 1, ..., 1]
    pred_original: torch.Tensor  # the denoiser's estimate of x_0 at this step


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompt token ids padded/truncated to the tokenizer's length, as the pipelines do."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class PolicyBase(nn.Module):
    """What every policy shares: the trained denoiser is ``self.unet`` (a UNet, or SD3's
    transformer), with LoRA adapters (peft) or fully trainable, and a frozen base model for the
    KL (LoRA disabled, or a frozen copy).

    A family provides ``encode_prompts``, ``negative_embeds`` and ``decode``, and the two
    methods the loops here are written against: :meth:`_start` (the schedule and x_T) and
    :meth:`_step` (one step of its sampler with its log-prob)."""

    model_cfg: ModelConfig
    sample_cfg: SampleConfig
    unet: nn.Module
    denoiser_name = "unet"  # the pipeline component ``self.unet`` is (SD3: "transformer")

    def _setup_finetune(self, what: str) -> None:
        """LoRA adapters on ``model.lora_targets`` of ``self.unet`` (B = 0: the adapted model
        starts as the base model; trainable weights in fp32), or every weight trainable."""
        self.reference_unet: nn.Module | None = None
        if self.model_cfg.finetune == "lora":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            lora = LoraConfig(
                r=self.model_cfg.lora_rank,
                lora_alpha=self.model_cfg.lora_alpha,
                init_lora_weights="gaussian",  # B = 0: the adapted model starts as the base model
                target_modules=list(self.model_cfg.lora_targets),
            )
            try:
                self.unet.add_adapter(lora)
            except ValueError as exc:
                raise UsageError(
                    "model.lora_targets",
                    self.model_cfg.lora_targets,
                    f"no such {what} modules ({exc}); e.g. to_q,to_k,to_v,to_out.0",
                ) from None
            for p in self.unet.parameters():
                if p.requires_grad:
                    p.data = (
                        p.data.float()
                    )  # trainable LoRA weights stay fp32 under mixed precision
        else:
            self.unet.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def use_cfg(self) -> bool:
        return self.sample_cfg.guidance_scale > 1.0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of one sample's noise: x_T (flow: x at s = 1) and the draw of each of the
        T steps, [T+1, C, h, w] (see :meth:`sample`)."""
        c = self.unet.config
        return (self.sample_cfg.num_steps + 1, c.in_channels, c.sample_size, c.sample_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def enable_kl_reference(self) -> None:
        """Keep a frozen copy of the base model for the KL penalty (LoRA uses disabled adapters)."""
        if self.model_cfg.finetune == "full" and self.reference_unet is None:
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_mode(self, unet: nn.Module):
        """The frozen base model: LoRA adapters disabled (or the stored full copy)."""
        if self.model_cfg.finetune == "lora":
            base = unwrap(unet)
            base.disable_adapters()
            try:
                yield unet
            finally:
                base.enable_adapters()
        else:
            yield self.reference_unet

    @contextlib.contextmanager
    def lora_merged(self, unet: nn.Module):
        """For gradient-free passes: each LoRA layer's weight replaced by a merged copy
        W' = W + s B A and the adapters disabled, so a pass makes one matmul per adapted layer
        instead of three; W itself is put back untouched afterwards (no drift from repeated
        merging). A no-op unless ``sample.merge_lora`` and LoRA fine-tuning."""
        if self.model_cfg.finetune != "lora" or not self.sample_cfg.merge_lora:
            yield
            return
        from peft.tuners.lora import LoraLayer

        base = unwrap(unet)
        originals = []
        with torch.no_grad():
            for layer in base.modules():
                if isinstance(layer, LoraLayer) and layer.active_adapters:
                    weight = layer.get_base_layer().weight
                    delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters)
                    originals.append((weight, weight.data))
                    weight.data = weight.data + delta.to(weight.dtype)
        base.disable_adapters()
        try:
            yield
        finally:
            base.enable_adapters()
            for weight, data in originals:
                weight.data = data

    # -- the family's sampler -----------------------------------------------------------------

    def _start(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T], x_T [B, C, h, w])`` for ``noise`` (on the policy's device, fp32):
        sets up the schedule of ``sample.num_steps`` steps; x_T comes from ``noise[:, 0]``."""
        raise NotImplementedError

    def _step(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        k: int | None,
        t: torch.Tensor,
        conditions: Conditions,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> PolicyStep:
        """Step k (at timestep ``t``) from ``latents`` = x_k with the denoiser ``unet``, guided
        as ``sample.guidance_scale`` says when ``conditions`` has negatives. ``prev_sample``:
        the x_{k+1} whose log-prob to compute; else x_{k+1} = mean + std * ``noise`` is drawn.
        ``k=None``: ``t`` is a [B] tensor of per-sample timesteps of the schedule."""
        raise NotImplementedError

    def _guided_prediction(
        self, unet: nn.Module, latents: torch.Tensor, t: torch.Tensor, conditions: Conditions
    ) -> torch.Tensor:
        """The denoiser's output for :meth:`_step` (DDIM: the noise, flow: the velocity), with
        classifier-free guidance at ``sample.guidance_scale`` when ``conditions`` has negatives."""
        return self.predict_noise(
            unet,
            latents,
            t,
            conditions.prompt_embeds,
            conditions.negative_embeds,
            self.sample_cfg.guidance_scale,
            conditions.pooled,
            conditions.negative_pooled,
        )

    # -- sampling -----------------------------------------------------------------------------

    def _conditions(self, prompts: list[str]) -> Conditions:
        prompt_embeds, pooled = self.encode_prompts(prompts)
        negative, negative_pooled = (
            self.negative_embeds(len(prompts)) if self.use_cfg else (None, None)
        )
        return Conditions(prompt_embeds, negative, pooled, negative_pooled)

    @torch.no_grad()
    def sample(
        self,
        unet: nn.Module,
        prompts: list[str],
        noise: torch.Tensor,
        with_reference: bool = False,
        progress=None,
        keep_x0: bool = False,
    ) -> Trajectory:
        """Sample trajectories for ``prompts`` with the family's stochastic sampler (DDIM with
        eta > 0; SD3: the SDE of noise level ``sample.noise_level``) and record every step.

        ``noise`` [B, T+1, C, h, w] holds x_T (``noise[:, 0]``; for flow models x at s = 1) and
        the standard-normal draw z_k of each step k (``noise[:, k+1]``), so that a sample is
        reproducible from its own seed. ``with_reference`` also records each step's log-prob
        under the frozen base model (``ref_log_probs``, for the KL penalty); ``keep_x0`` the
        denoiser's x_0 estimate of every step (``x0_preds``; flow: ``x0_hat = x - s v``).
        ``timesteps`` are the scheduler's (flow: ``1000 s``).
        """
        batch = len(prompts)
        noise = noise.to(self.device, torch.float32)
        timesteps, latents = self._start(noise)
        conditions = self._conditions(prompts)
        all_latents, log_probs, ref_log_probs, x0_preds = [latents], [], [], []
        # the reference passes need the adapters switchable: merge only without them
        merged = contextlib.nullcontext() if with_reference else self.lora_merged(unet)
        with merged:
            for k, t in enumerate(timesteps):
                # x_{k+1} = mu_theta(x_k) + sigma_k * z_k, and log pi_theta(x_{k+1} | x_k)
                step = self._step(unet, latents, k, t, conditions, noise=noise[:, k + 1])
                if with_reference:  # log pi_ref(x_{k+1} | x_k) of the same transition
                    with self.reference_mode(unet) as ref_unet:
                        ref = self._step(
                            ref_unet, latents, k, t, conditions, prev_sample=step.prev_sample
                        )
                    ref_log_probs.append(ref.log_prob)
                latents = step.prev_sample.float()
                all_latents.append(latents)
                log_probs.append(step.log_prob)
                if keep_x0:
                    x0_preds.append(step.pred_original.float())
                if progress is not None:
                    progress.update(1)
        prompt_embeds, negative, pooled, negative_pooled = conditions
        return Trajectory(
            latents=torch.stack(all_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=timesteps.unsqueeze(0).expand(batch, -1).clone(),
            prompt_embeds=prompt_embeds,
            negative_embeds=negative.clone() if negative is not None else None,
            images=self.decode(latents),
            prompts=list(prompts),
            ref_log_probs=torch.stack(ref_log_probs, dim=1) if with_reference else None,
            pooled_embeds=pooled,
            negative_pooled=negative_pooled.clone() if negative_pooled is not None else None,
            x0_preds=torch.stack(x0_preds, dim=1) if keep_x0 else None,
        )

    def sample_with_grad(
        self, unet: nn.Module, prompts: list[str], noise: torch.Tensor, grad_steps: int
    ) -> torch.Tensor:
        """:meth:`sample`'s sampler (same noise layout) whose last ``grad_steps`` steps keep the
        graph, for AlignProp: the draw x_{k+1} = mu_theta(x_k) + sigma_k z_k is differentiable
        in mu_theta. Returns images in [0, 1]."""
        noise = noise.to(self.device, torch.float32)
        timesteps, latents = self._start(noise)
        conditions = self._conditions(prompts)
        first_grad = len(timesteps) - grad_steps
        for k, t in enumerate(timesteps):
            with torch.set_grad_enabled(k >= first_grad):
                step = self._step(  # the log-prob is not used
                    unet, latents, k, t, conditions, prev_sample=latents.detach()
                )
                latents = step.mean + step.std * noise[:, k + 1]  # differentiable in mu_theta
        return self.decode(latents)

    def step_log_prob(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        pooled: torch.Tensor | None = None,
        negative_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log pi_theta(next | latents) under the current weights, for per-sample timesteps [B]
        (values of the sampling schedule).

        Pass ``negative_embeds=None`` to re-evaluate without classifier-free guidance."""
        conditions = Conditions(prompt_embeds, negative_embeds, pooled, negative_pooled)
        return self._step(
            unet, latents, None, timesteps, conditions, prev_sample=next_latents
        ).log_prob

    # -- export -------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA weights, as the pipeline's ``save_lora_weights`` takes them."""
        raise NotImplementedError

    def save_final(self, directory: Path) -> None:
        """LoRA for the pipeline's ``load_lora_weights(directory)``
        (``pytorch_lora_weights.safetensors``), or the full denoiser (``directory/unet``; SD3:
        ``directory/transformer``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        denoiser = unwrap(self.unet)
        name = self.denoiser_name
        if self.model_cfg.finetune == "lora":
            layers = {k: v.detach().float().cpu() for k, v in self.lora_state_dict().items()}
            metadata = denoiser.peft_config["default"].to_dict()
            type(self.pipe).save_lora_weights(
                directory,
                **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata},
                safe_serialization=True,
            )
        else:
            denoiser.save_pretrained(directory / name, safe_serialization=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def denoiser_dtype(denoiser: nn.Module) -> torch.dtype:
    """``unwrap(denoiser).dtype``, remembered per module: diffusers' ``ModelMixin.dtype`` walks
    every submodule (2.7 ms a call on the shapes-world UNet with LoRA, about 5 % of a guided
    pass), and the policy reads it on every denoiser pass. The entry is checked against its
    first parameter's dtype, so a cast (``.to(dtype)``) is seen."""
    model = unwrap(denoiser)
    first = next(model.parameters(), None)
    hit = _DTYPES.get(model)
    if hit is not None and hit[0] is first and first is not None and hit[1] == first.dtype:
        return hit[2]
    dtype = model.dtype
    _DTYPES[model] = (first, None if first is None else first.dtype, dtype)
    return dtype
