"""The temporal critic V(x_t): a frozen image-embedding backbone and a small trainable head.

States are valued from the image they decode to: ``V(x_k) = head(embed(decode(x_k)))``. All T
states of a batch of trajectories are decoded and embedded together after sampling, in batches of
``embed_batch_size`` (the reference code did one decode and one CLIP pass per step while sampling).
The embeddings are stored, so training only runs the head.
"""

from __future__ import annotations

import torch
from torch import nn

# Reference head (copied from the LAION aesthetic predictor): no nonlinearity between layers.
HEAD_WIDTHS = (1024, 128, 64, 16)
HEAD_DROPOUT = (0.2, 0.2, 0.1, 0.0)


def build_head(in_dim: int, kind: str = "linear") -> nn.Sequential:
    """``Linear(d,1024)-Dropout(.2)-Linear(1024,128)-Dropout(.2)-Linear(128,64)-Dropout(.1)-
    Linear(64,16)-Linear(16,1)``; ``kind="relu"`` adds a ReLU after each hidden Linear.

    Weights are drawn from N(0, (1/(d+1))^2) and biases are zero, as in the reference code.
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
    std = head_init_std(in_dim)
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
    return head


def head_init_std(in_dim: int) -> float:
    return 1.0 / (in_dim + 1)


class CriticHead(nn.Module):
    """The trainable part: maps a state embedding (and optionally t) to a value."""

    def __init__(
        self,
        embed_dim: int,
        kind: str = "linear",
        timestep_input: bool = False,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.timestep_input = timestep_input
        self.num_train_timesteps = num_train_timesteps
        self.in_dim = embed_dim + int(timestep_input)
        self.mlp = build_head(self.in_dim, kind)
        self.weight_std = head_init_std(self.in_dim)

    def features(self, embeddings: torch.Tensor, timesteps: torch.Tensor | None) -> torch.Tensor:
        """The head's input: the embedding, with t / num_train_timesteps appended if enabled."""
        if not self.timestep_input:
            return embeddings
        t = timesteps.to(embeddings.dtype).unsqueeze(-1) / self.num_train_timesteps
        return torch.cat([embeddings, t], dim=-1)

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


LATENT_POOL = 8  # the cheap critic sees x_t average-pooled to C x 8 x 8


def latent_state_features(latents: torch.Tensor) -> torch.Tensor:
    """The cheap critic's state features: x_t [..., C, h, w] average-pooled to C x 8 x 8, flat."""
    lead = latents.shape[:-3]
    flat = latents.reshape(-1, *latents.shape[-3:]).float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(flat, LATENT_POOL)
    return pooled.reshape(*lead, -1)


def latent_feature_dim(latent_channels: int) -> int:
    return latent_channels * LATENT_POOL * LATENT_POOL
