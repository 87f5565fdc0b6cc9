"""Dormant / active neurons of the critic head and their re-initialization (TDPO-R, step 7).

The head is an ``nn.Sequential`` of ``nn.Linear`` (with ``nn.Dropout``, optionally ``nn.ReLU``)
layers. Its *hidden* layers are all its Linear layers but the last; neuron i of hidden layer l
has incoming weights ``W_l[i, :]``, bias ``b_l[i]`` and outgoing weights ``W_{l+1}[:, i]``.

Score of neuron i of layer l (ReDo, Sokar et al. 2023, as in the TDPO reference code):
``s_i = E_x |relu(h_i(x))| / (mean_j E_x |relu(h_j(x))| + 1e-9)``, with ``h`` the Linear layer's
pre-activation output (the reference head has no nonlinearity, so the relu is applied here).
A neuron is dormant if ``s_i <= tau``, active otherwise. TDPO-R re-initializes the *active*
neurons; ReDo the dormant ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "dormant_overlap",
    "hidden_linear_layers",
    "neuron_fractions",
    "neuron_masks",
    "neuron_scores",
    "reset_neurons",
]

_SCORE_EPS = 1e-9
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _linear_layers(head: nn.Module) -> list[nn.Linear]:
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def hidden_linear_layers(head: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` of ``head`` (in module order) except the last one."""
    return _linear_layers(head)[:-1]


@torch.no_grad()
def neuron_scores(head: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Normalized activation score ``s`` of every hidden neuron, one ``[out_features]`` tensor per layer.

    ``s_i = mean_x |relu(h_i(x))| / (mean over the layer's neurons of that quantity + 1e-9)``,
    with ``h`` captured by forward hooks on the hidden Linear outputs (pre-activation). The head
    runs in eval mode (no dropout) without grad; each module's train/eval mode is restored after.

    Args:
        head: the critic head.
        inputs: a batch of head inputs (state embeddings), ``[N, d]``.
    """
    layers = hidden_linear_layers(head)
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            captured[index] = output.detach()

        return hook

    modes = {m: m.training for m in head.modules()}
    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        head.eval()
        head(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    scores = []
    for layer, h in zip(layers, captured):
        if h is None:
            raise RuntimeError(f"hidden layer {layer} was not called in the head's forward")
        activity = torch.relu(h.float()).abs().reshape(-1, h.shape[-1]).mean(dim=0)
        scores.append(activity / (activity.mean() + _SCORE_EPS))
    return scores


def neuron_masks(
    scores: list[torch.Tensor], tau: float = 0.0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(dormant, active)`` boolean masks per layer: dormant ``s <= tau``, active ``~dormant``."""
    dormant = [s <= tau for s in scores]
    active = [~m for m in dormant]
    return dormant, active


def _zero_moments(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: tuple
) -> None:
    """Zero the Adam moments of ``param[index]``; parameters without optimizer state are skipped."""
    if optimizer is None or param not in optimizer.state:
        return
    state = optimizer.state[param]
    for key in _MOMENT_KEYS:
        moment = state.get(key)
        if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
            moment[index] = 0


def _normal(
    shape: tuple[int, ...], std: float, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``N(0, std^2)`` samples drawn on the generator's device, moved to ``like``'s."""
    device = generator.device if generator is not None else like.device
    sample = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std
    return sample.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def reset_neurons(
    head: nn.Module,
    masks: list[torch.Tensor],
    weight_std: float | Callable[[nn.Linear], float],
    optimizer: torch.optim.Optimizer | None = None,
    outgoing: str = "redraw",
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialize the selected neurons of every hidden layer, in place.

    For hidden layer l and each neuron i with ``masks[l][i]``:
    ``W_l[i, :] ~ N(0, std_l^2)``, ``b_l[i] = 0``, and the outgoing weights
    ``W_{l+1}[:, i]`` are redrawn from the same distribution (``outgoing="redraw"``, the reference
    code) or zeroed (``outgoing="zero"``, ReDo). The optimizer's Adam/AdamW moments
    (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) of exactly these entries are zeroed, looked
    up by parameter identity (``optimizer.state[param]``); the step count is left alone.

    Args:
        head: the critic head.
        masks: one boolean ``[out_features]`` mask per hidden layer (e.g. the *active* masks for
            TDPO-R, the dormant ones for ReDo).
        weight_std: standard deviation of the re-drawn weights, or a function of the layer
            giving it (the layer's own initialization).
        optimizer: the head's optimizer, or None.
        outgoing: ``"redraw"`` or ``"zero"``.
        generator: RNG for the re-drawn weights.

    Returns:
        The number of neurons reset.
    """
    if outgoing not in ("redraw", "zero"):
        raise ValueError(f"outgoing must be 'redraw' or 'zero', got {outgoing!r}")
    std_of = weight_std if callable(weight_std) else (lambda _layer: weight_std)
    linears = _linear_layers(head)
    hidden = linears[:-1]
    if len(masks) != len(hidden):
        raise ValueError(f"expected {len(hidden)} masks (one per hidden layer), got {len(masks)}")

    total = 0
    for layer, next_layer, mask in zip(hidden, linears[1:], masks):
        mask = torch.as_tensor(mask, device=layer.weight.device).bool()
        if mask.shape != (layer.out_features,):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({layer.out_features},)")
        if next_layer.in_features != layer.out_features:
            raise ValueError(
                f"cannot find outgoing weights: {next_layer} does not take {layer}'s outputs"
            )
        idx = mask.nonzero().flatten()
        n = idx.numel()
        if n == 0:
            continue
        total += n

        # incoming weights W_l[i, :] and bias b_l[i]
        layer.weight[idx] = _normal((n, layer.in_features), std_of(layer), layer.weight, generator)
        _zero_moments(optimizer, layer.weight, (idx,))
        if layer.bias is not None:
            layer.bias[idx] = 0
            _zero_moments(optimizer, layer.bias, (idx,))

        # outgoing weights W_{l+1}[:, i]
        if outgoing == "redraw":
            next_layer.weight[:, idx] = _normal(
                (next_layer.out_features, n), std_of(next_layer), next_layer.weight, generator
            )
        else:
            next_layer.weight[:, idx] = 0
        _zero_moments(optimizer, next_layer.weight, (slice(None), idx))
    return total


def dormant_overlap(
    previous_dormant: list[torch.Tensor] | None, dormant: list[torch.Tensor]
) -> float:
    """Fraction of the currently dormant neurons that were dormant at the previous check.

    ``|prev & cur| / |cur|`` over dormant neurons only (the reference code divided by the number
    of mask elements, which always gave 100%). nan with no previous check or no dormant neuron.
    """
    if previous_dormant is None:
        return float("nan")
    if len(previous_dormant) != len(dormant):
        raise ValueError(f"{len(previous_dormant)} previous masks for {len(dormant)} layers")
    both = 0
    current = 0
    for prev, cur in zip(previous_dormant, dormant):
        if prev.shape != cur.shape:
            raise ValueError(f"mask shapes differ: {tuple(prev.shape)} vs {tuple(cur.shape)}")
        prev = prev.to(cur.device).bool()
        cur = cur.bool()
        both += int((prev & cur).sum())
        current += int(cur.sum())
    return both / current if current else float("nan")


def neuron_fractions(dormant: list[torch.Tensor]) -> tuple[float, float]:
    """``(dormant fraction, active fraction)`` over all hidden neurons (nan, nan if none)."""
    total = sum(m.numel() for m in dormant)
    if total == 0:
        return math.nan, math.nan
    n_dormant = sum(int(m.bool().sum()) for m in dormant)
    return n_dormant / total, (total - n_dormant) / total
