"""The temporal critic V(x_t): a frozen image-embedding backbone and a small trainable head.

States are valued from the image they decode to: ``V(x_k) = head(embed(decode(x_k)))``. All T
states of a batch of trajectories are decoded and embedded together after sampling, in batches of
``embed_batch_size`` (the reference code did one decode and one CLIP pass per step while sampling).
The embeddings are stored, so training only runs the head.
"""

from __future__ import annotations

import torch
from torch import nn

from tdpo.algos.advantages import merge_moments
from tdpo.errors import UsageError

# Reference head (copied from the LAION aesthetic predictor): no nonlinearity between layers.
HEAD_WIDTHS = (1024, 128, 64, 16)
HEAD_DROPOUT = (0.2, 0.2, 0.1, 0.0)


def build_head(in_dim: int, kind: str = "linear", init: str = "reference") -> nn.Sequential:
    """``Linear(d,1024)-Dropout(.2)-Linear(1024,128)-Dropout(.2)-Linear(128,64)-Dropout(.1)-
    Linear(64,16)-Linear(16,1)``; ``kind="relu"`` adds a ReLU after each hidden Linear.

    Biases are zero. ``init="reference"``: every weight from N(0, (1/(d+1))^2) with d the head's
    input width, as the reference code (the output starts near 0 and, through five such layers,
    moves little: a deep linear chain initialized near its saddle at zero); ``init="fan_in"``:
    each hidden layer's weights from N(0, 1/fan_in) (LeCun), so every layer passes its input's
    scale on, and the output layer at zero (V starts at 0, as with the reference init).
    """
    layers: list[nn.Module] = []
    width = in_dim
    for out, dropout in zip(HEAD_WIDTHS, HEAD_DROPOUT):
        layers.append(nn.Linear(width, out))
        if kind == "relu":
            layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = out
    layers.append(nn.Linear(width, 1))
    head = nn.Sequential(*layers)
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=layer_init_std(module, in_dim, init))
            nn.init.zeros_(module.bias)
    return head


def layer_init_std(layer: nn.Linear, head_in_dim: int, init: str) -> float:
    """The standard deviation a layer's weights are drawn from (initialization and resets);
    with ``fan_in`` the output layer starts at zero, so V starts at 0 and learns from there."""
    if init == "reference":
        return head_init_std(head_in_dim)
    return 0.0 if layer.out_features == 1 else layer.in_features**-0.5


def head_init_std(in_dim: int) -> float:
    return 1.0 / (in_dim + 1)


class CriticHead(nn.Module):
    """The trainable part: maps a state embedding (and optionally t) to a value.

    ``standardize`` keeps running statistics of the head's input (mean and variance per feature,
    over every state valued so far, as PPO implementations do for observations) and feeds it
    ``(x - mean) / std``: the states' embeddings differ from each other by a small part of their
    length, which a head on raw L2-normalized embeddings must first learn to amplify.
    """

    def __init__(
        self,
        embed_dim: int,
        kind: str = "linear",
        timestep_input: bool = False,
        num_train_timesteps: int = 1000,
        standardize: bool = False,
        init: str = "reference",
    ):
        super().__init__()
        self.timestep_input = timestep_input
        self.num_train_timesteps = num_train_timesteps
        self.in_dim = embed_dim + int(timestep_input)
        self.standardize = standardize
        if standardize:  # running statistics, saved with the head (checkpoints, final/)
            self.register_buffer("feature_count", torch.zeros((), dtype=torch.float64))
            self.register_buffer("feature_mean", torch.zeros(self.in_dim, dtype=torch.float64))
            self.register_buffer("feature_var", torch.ones(self.in_dim, dtype=torch.float64))
        self.init = init
        self.mlp = build_head(self.in_dim, kind, init)

    def weight_std(self, layer: nn.Linear) -> float:
        """The standard deviation ``layer``'s weights were drawn from (resets redraw from it)."""
        return layer_init_std(layer, self.in_dim, self.init)

    def raw_features(
        self, embeddings: torch.Tensor, timesteps: torch.Tensor | None
    ) -> torch.Tensor:
        """The embedding, with t / num_train_timesteps appended if enabled."""
        if not self.timestep_input:
            return embeddings
        t = timesteps.to(embeddings.dtype).unsqueeze(-1) / self.num_train_timesteps
        return torch.cat([embeddings, t], dim=-1)

    def features(self, embeddings: torch.Tensor, timesteps: torch.Tensor | None) -> torch.Tensor:
        """The head's input: :meth:`raw_features`, standardized if enabled."""
        x = self.raw_features(embeddings, timesteps)
        if not self.standardize:
            return x
        std = (self.feature_var + STANDARDIZE_EPS).sqrt()
        return ((x - self.feature_mean.to(x.dtype)) / std.to(x.dtype)).to(x.dtype)

    @torch.no_grad()
    def update_statistics(self, embeddings: torch.Tensor, timesteps: torch.Tensor | None) -> None:
        """Merge the features of ``embeddings`` [..., d] into the running mean and variance
        (Chan et al.'s parallel update; every process must pass the same, gathered, states)."""
        if not self.standardize:
            return
        x = self.raw_features(embeddings, timesteps).reshape(-1, self.in_dim)
        count, mean, var = merge_moments(
            float(self.feature_count), self.feature_mean, self.feature_var, x
        )
        self.feature_count.fill_(count)
        self.feature_mean.copy_(mean)
        self.feature_var.copy_(var)

    def forward(
        self, embeddings: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mlp(self.features(embeddings.float(), timesteps)).squeeze(-1)


@torch.no_grad()
def embed_states(
    decode, embedder: nn.Module, latents: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Decode and embed states ``latents`` [N, C, h, w] in batches -> embeddings [N, d] (float32).

    ``decode`` maps latents to images in [0, 1]; ``embedder`` maps images to L2-normalized
    embeddings.
    """
    out = [embedder(decode(chunk)).float() for chunk in latents.split(batch_size)]
    return torch.cat(out)


def trajectory_state_embeddings(
    decode, embedder: nn.Module, states: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Embeddings of states [B, S, C, h, w] (e.g. x_T ... x_1, or each step's x0 estimate),
    decoded and embedded in batches -> [B, S, d]."""
    b, s = states.shape[:2]
    flat = states.reshape(b * s, *states.shape[2:])
    return embed_states(decode, embedder, flat, batch_size).view(b, s, -1)


class TinyStateDecoder(nn.Module):
    """Latents -> images in [0, 1] with the decoder of a tiny autoencoder (diffusers'
    ``AutoencoderTiny``, TAESD), the cheap stand-in for the VAE when valuing states
    (``critic.decoder=tiny``).

    The latents are the pipeline's (the denoiser's space); as diffusers' pipelines do with a
    tiny autoencoder in place of the VAE, they are divided by the tiny model's own
    ``scaling_factor`` and shifted by its ``shift_factor`` (TAESD: 1 and 0; TAESD3: SD3's VAE
    factors). Its decoder maps to [-1, 1], as the VAE's."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        config = autoencoder.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        images = self.autoencoder.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)


TINY_DECODER_FIELD = "critic.tiny_decoder"


def load_tiny_decoder(
    spec: str, latent_channels: int, device, dtype: torch.dtype | None = None
) -> TinyStateDecoder:
    """The frozen decoder of ``critic.tiny_decoder`` (an ``AutoencoderTiny`` folder or Hub id),
    checked against the pipeline's ``latent_channels``; a bad value raises :class:`UsageError`
    naming the field, the value and the fix. The encoder is dropped (only decoding is needed)."""
    from diffusers import AutoencoderTiny  # deferred: seconds to import

    from tdpo.backbones import hub_error_fix

    try:
        kind = AutoencoderTiny.load_config(spec).get("_class_name")
        if kind != "AutoencoderTiny":
            raise UsageError(
                TINY_DECODER_FIELD,
                spec,
                f"this is a {kind}, not an AutoencoderTiny: give a tiny autoencoder "
                "(madebyollin/taesd, taesdxl, taesd3 or a folder saved from AutoencoderTiny) "
                "or set critic.decoder=vae",
            )
        autoencoder = AutoencoderTiny.from_pretrained(spec, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(TINY_DECODER_FIELD, spec, hub_error_fix(spec, exc)) from None
    channels = autoencoder.config.latent_channels
    if channels != latent_channels:
        raise UsageError(
            TINY_DECODER_FIELD,
            spec,
            f"its latent_channels={channels} do not match the pipeline's {latent_channels}: "
            "give a tiny autoencoder made for this model's latents (madebyollin/taesd for SD "
            "1.x/2.x, madebyollin/taesdxl for SDXL, madebyollin/taesd3 for SD3) or set "
            "critic.decoder=vae",
        )
    autoencoder.encoder = None  # never used: free its memory
    decoder = TinyStateDecoder(autoencoder).to(device).eval()
    decoder.requires_grad_(False)
    return decoder


STANDARDIZE_EPS = 1e-8  # added to the running variance before its square root

LATENT_POOL = 8  # the cheap critic sees x_t average-pooled to C x 8 x 8


def latent_state_features(latents: torch.Tensor) -> torch.Tensor:
    """The cheap critic's state features: x_t [..., C, h, w] average-pooled to C x 8 x 8, flat."""
    lead = latents.shape[:-3]
    flat = latents.reshape(-1, *latents.shape[-3:]).float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(flat, LATENT_POOL)
    return pooled.reshape(*lead, -1)


def latent_feature_dim(latent_channels: int) -> int:
    return latent_channels * LATENT_POOL * LATENT_POOL
