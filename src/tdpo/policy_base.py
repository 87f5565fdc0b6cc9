"""What every policy shares (DDIM's :class:`tdpo.policy.DiffusionPolicy` and the flow-matching
:class:`tdpo.flow.FlowPolicy`): the sampled :class:`Trajectory`, LoRA or full fine-tuning of the
denoiser, the frozen base model for the KL, and prompt tokenization. Re-exported by
:mod:`tdpo.policy`, where the rest of the project imports them from."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, fields

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
    KL (LoRA disabled, or a frozen copy)."""

    model_cfg: ModelConfig
    sample_cfg: SampleConfig
    unet: nn.Module

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
