"""Gold metrics of the shapes world: analytic judgements computed from pixels.

They stand for the human judgement that learned reward models approximate, and are used for
evaluation (and as the analytic ``shapes_gold*`` rewards). All take images [B, 3, H, W] float
in [0, 1] (any H, W: resized to 32x32 with area averaging; NaNs become 0, values are clamped)
and return float tensors [B]. They never raise on garbage images.

**Alignment** (needs the prompt) = mean of four 0/1 checks, one per attribute the prompt names:

- *background*: at least half of the 2-pixel border ring lies within colour distance 0.25 of
  the requested background colour;
- *colour*: the requested shape colour (pixels within distance 0.3, soft) covers at least
  ``MIN_AREA`` = 15 px and at least half of the non-background area (non-background = farther
  than 0.2 from the border's median colour);
- *size*: that colour's area A is in [15, 135) px for ``small`` and [135, 520] px for ``large``
  (the generator's small and large shapes cover about 70 and 215 px);
- *shape*: among the four shape templates of the same area placed at the colour mask's
  centroid, the requested one has the highest IoU with the mask, and that IoU is >= 0.5.

A prompt that is not a world prompt gets alignment 0.

**Gold aesthetic** (image only) = a weighted geometric mean, in [0, 1], gated by presence::

    aesthetic = presence * centred^0.35 * in_frame^0.15 * contrast^0.2 * clean^0.15 * crisp^0.15

with bg = per-channel median of the border ring, fg = soft mask of pixels farther than 0.2
from bg, F its area, c_fg the shape's colour (fg-weighted mean, re-weighted towards the
pixels farthest from bg), and

- presence = sigmoid((F - 15) / 3): is there a shape at all;
- centred  = exp(-d^2 / (2 * 3^2)), d = distance in px of the fg centroid from the centre;
- in_frame = exp(-E / 3), E = fg mass on the outermost pixel ring (a clipped shape);
- contrast = min(1, |c_fg - bg| / 0.8);
- clean    = exp(-D / 0.03), D = mean distance of the pixels from the segment [bg, c_fg]
  in colour space (noise, stray colours, a dirty background; anti-aliased pixels lie on the
  segment and cost nothing);
- crisp    = exp(-max(0, S - 0.7) / 0.5), S = sum over pixels of 4 a (1 - a) (a = each
  pixel's position along [bg, c_fg], clamped to [0, 1]) divided by (1 + the total variation
  of a): the edge width in pixels per unit of outline. The generator's anti-aliased shapes
  have S of 0.55 to 0.7 (up to 1.0 for some small crosses); a 3x3 box blur gives about 1.9.

**Gold** = alignment * aesthetic.

Differentiability: ``alignment(..., differentiable=True)`` returns the hard value in the
forward pass with the gradient of a soft version (every threshold replaced by a sigmoid, the
argmax over templates by a softmax): a straight-through estimator. The aesthetic is smooth
except at the border median (torch.median passes the gradient to the median element).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tdpo.world.generator import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    parse_prompt,
    pixel_grid,
    shape_sdf,
)

MIN_AREA = 15.0
SIZE_SPLIT = 135.0
MAX_AREA = 520.0
COLOUR_RADIUS = 0.3
BG_RADIUS = 0.25
FG_RADIUS = 0.2


def _prepare(images: torch.Tensor) -> torch.Tensor:
    x = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=0.0)
    if x.dim() == 3:
        x = x[None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x.clamp(0.0, 1.0)


def _border_mask(width: int, device: torch.device) -> torch.Tensor:
    m = torch.ones(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool, device=device)
    m[width:-width, width:-width] = False
    return m


def _dist(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """x [B,3,H,W], colour [B,3] -> Euclidean colour distance [B,H,W]."""
    return torch.sqrt(((x - colour[:, :, None, None]) ** 2).sum(1) + 1e-8)


def _sig(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z)


def _st(hard: torch.Tensor, soft: torch.Tensor, differentiable: bool) -> torch.Tensor:
    if not differentiable:
        return hard.detach().float()
    return hard.detach().float() + soft - soft.detach()


def alignment_terms(
    images: torch.Tensor, prompts: list[str], differentiable: bool = False
) -> dict[str, torch.Tensor]:
    """Per-attribute checks {shape, colour, size, background} and ``alignment``, each [B]."""
    x = _prepare(images)
    dev = x.device
    parsed = [parse_prompt(p) for p in prompts]
    valid = torch.tensor([p is not None for p in parsed], device=dev)
    combos = [
        p or (SHAPES[0], next(iter(COLOURS)), "small", next(iter(BACKGROUNDS))) for p in parsed
    ]
    col = torch.tensor([COLOURS[c[1]] for c in combos], device=dev)
    bgc = torch.tensor([BACKGROUNDS[c[3]] for c in combos], device=dev)
    large = torch.tensor([c[2] == "large" for c in combos], device=dev)
    ring = _border_mask(2, dev)

    # background
    bg_member = _sig((BG_RADIUS - _dist(x, bgc)) / 0.03)
    bg_frac = bg_member[:, ring].mean(1)
    bg_hard = bg_frac >= 0.5
    bg_soft = _sig((bg_frac - 0.5) / 0.05)

    # colour
    m = _sig((COLOUR_RADIUS - _dist(x, col)) / 0.03)  # [B,H,W]
    area = m.flatten(1).sum(1)
    bg_est = x[:, :, ring].median(dim=2).values
    non_bg = _sig((_dist(x, bg_est) - FG_RADIUS) / 0.03).flatten(1).sum(1)
    frac = area / (torch.maximum(non_bg, area) + 1e-6)
    present_hard = area >= MIN_AREA
    present_soft = _sig((area - MIN_AREA) / 3.0)
    colour_hard = present_hard & (frac >= 0.5)
    colour_soft = present_soft * _sig((frac - 0.5) / 0.05)

    # size
    small_ok = (area >= MIN_AREA) & (area < SIZE_SPLIT)
    large_ok = (area >= SIZE_SPLIT) & (area <= MAX_AREA)
    size_hard = torch.where(large, large_ok, small_ok)
    s_small = present_soft * _sig((SIZE_SPLIT - area) / 8.0)
    s_large = _sig((area - SIZE_SPLIT) / 8.0) * _sig((MAX_AREA - area) / 8.0)
    size_soft = torch.where(large, s_large, s_small)

    # shape: IoU with same-area templates at the mask's centroid
    gx, gy = pixel_grid(IMAGE_SIZE)
    gx, gy = gx.to(dev), gy.to(dev)
    safe = area.clamp_min(1.0)
    cx = (m * gx).flatten(1).sum(1) / safe
    cy = (m * gy).flatten(1).sum(1) / safe
    r = torch.sqrt(safe / math.pi)
    ious = []
    for shape in SHAPES:
        sd = shape_sdf(shape, gx - cx[:, None, None], gy - cy[:, None, None], r[:, None, None])
        t = _sig(-sd / 0.3)
        inter = (t * m).flatten(1).sum(1)
        union = (t + m - t * m).flatten(1).sum(1)
        ious.append(inter / (union + 1e-6))
    iou = torch.stack(ious, 1)  # [B, S]
    want = torch.tensor([SHAPES.index(c[0]) for c in combos], device=dev)
    iou_req = iou.gather(1, want[:, None])[:, 0]
    shape_hard = present_hard & (iou.argmax(1) == want) & (iou_req >= 0.5)
    shape_soft = (
        present_soft
        * torch.softmax(iou / 0.03, 1).gather(1, want[:, None])[:, 0]
        * _sig((iou_req - 0.5) / 0.05)
    )

    out = {
        "shape": _st(shape_hard, shape_soft, differentiable),
        "colour": _st(colour_hard, colour_soft, differentiable),
        "size": _st(size_hard, size_soft, differentiable),
        "background": _st(bg_hard, bg_soft, differentiable),
    }
    out = {k: v * valid.float() for k, v in out.items()}
    out["alignment"] = (out["shape"] + out["colour"] + out["size"] + out["background"]) / 4
    out["area"] = area.detach()
    return out


def alignment(
    images: torch.Tensor, prompts: list[str], differentiable: bool = False
) -> torch.Tensor:
    """Fraction of the prompt's four attributes present in each image, [B] in {0,.25,..,1}."""
    return alignment_terms(images, prompts, differentiable)["alignment"]


def aesthetic_terms(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gold aesthetic and its factors, each [B] in [0, 1]."""
    x = _prepare(images)
    dev = x.device
    ring2 = _border_mask(2, dev)
    ring1 = _border_mask(1, dev)
    bg = x[:, :, ring2].median(dim=2).values  # [B,3]
    fg = _sig((_dist(x, bg) - FG_RADIUS) / 0.02)  # [B,H,W]
    area = fg.flatten(1).sum(1)
    safe = area.clamp_min(1.0)
    presence = _sig((area - MIN_AREA) / 3.0)

    gx, gy = pixel_grid(IMAGE_SIZE)
    gx, gy = gx.to(dev), gy.to(dev)
    cx = (fg * gx).flatten(1).sum(1) / safe
    cy = (fg * gy).flatten(1).sum(1) / safe
    d2 = (cx - IMAGE_SIZE / 2) ** 2 + (cy - IMAGE_SIZE / 2) ** 2
    centred = torch.exp(-d2 / (2 * 3.0**2))

    edge_mass = fg[:, ring1].sum(1)
    in_frame = torch.exp(-edge_mass / 3.0)

    # the shape's colour: fg-weighted mean, re-weighted towards the pixels farthest from bg
    # (anti-aliased edge pixels would pull a plain mean towards bg)
    d_bg = _dist(x, bg)
    w = fg * (d_bg / (d_bg.flatten(1).amax(1)[:, None, None] + 1e-6)) ** 8
    c_fg = (w[:, None] * x).flatten(2).sum(2) / (w.flatten(1).sum(1)[:, None] + 1e-6)  # [B,3]
    span = c_fg - bg
    span_len = torch.sqrt((span**2).sum(1) + 1e-8)
    contrast = (span_len / 0.8).clamp(max=1.0)

    # position of each pixel along the segment [bg, c_fg], and its distance from the segment
    rel = x - bg[:, :, None, None]
    a = (rel * span[:, :, None, None]).sum(1) / (span_len**2)[:, None, None]
    a = a.clamp(0.0, 1.0)
    closest = bg[:, :, None, None] + a[:, None] * span[:, :, None, None]
    off = torch.sqrt(((x - closest) ** 2).sum(1) + 1e-8)
    clean = torch.exp(-off.flatten(1).mean(1) / 0.03)

    mixed = (4 * a * (1 - a)).flatten(1).sum(1)
    # outline length: total variation of a (finite differences); invariant under blur,
    # while the mixed-pixel mass grows with the edge width
    ddx = a[:, :, 1:] - a[:, :, :-1]
    ddy = a[:, 1:, :] - a[:, :-1, :]
    tv = torch.sqrt(ddx[:, :-1, :] ** 2 + ddy[:, :, :-1] ** 2 + 1e-6).flatten(1).sum(1)
    s = mixed / (tv + 1.0)
    crisp = torch.exp(-(s - 0.7).clamp_min(0.0) / 0.5)

    eps = 1e-6
    log_a = (
        0.35 * torch.log(centred + eps)
        + 0.15 * torch.log(in_frame + eps)
        + 0.2 * torch.log(contrast + eps)
        + 0.15 * torch.log(clean + eps)
        + 0.15 * torch.log(crisp + eps)
    )
    aes = presence * torch.exp(log_a)
    return {
        "aesthetic": aes.clamp(0.0, 1.0),
        "presence": presence,
        "centred": centred,
        "in_frame": in_frame,
        "contrast": contrast,
        "clean": clean,
        "crisp": crisp,
        "edge_ratio": s.detach(),
    }


def aesthetic(images: torch.Tensor) -> torch.Tensor:
    """The gold aesthetic, [B] in [0, 1] (prompt-independent)."""
    return aesthetic_terms(images)["aesthetic"]


def gold(images: torch.Tensor, prompts: list[str], differentiable: bool = False) -> torch.Tensor:
    """Gold = alignment * aesthetic, [B] in [0, 1]."""
    return alignment(images, prompts, differentiable) * aesthetic(images)


def evaluate(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """All gold figures at once (no gradient): alignment and its terms, aesthetic, gold."""
    with torch.no_grad():
        al = alignment_terms(images, prompts)
        ae = aesthetic_terms(images)
    out = {k: v for k, v in al.items() if k != "area"}
    out.update({"aesthetic": ae["aesthetic"], "gold": al["alignment"] * ae["aesthetic"]})
    return out
