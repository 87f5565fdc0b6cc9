"""The shapes world's procedural generator: attributes -> (32x32 RGB image, caption).

One shape per image, drawn from signed distance functions (shared with the gold metrics, see
``sdf_mask``), rendered at 4x supersampling with hard edges and box-downsampled to 32x32, so the
edges are anti-aliased.

Attributes:

- ``shape``: circle, square, triangle, cross (all of the same area for a given size, so the
  size can be read from the area alone);
- ``colour``: red, green, blue, yellow, purple (each image jitters the colour a little);
- ``size``: small (equivalent radius 5 px) or large (equivalent radius 8.5 px);
- ``background``: white, black, gray;
- ``position``: *not* in the prompt. The centre is drawn around the image centre with a
  Gaussian spread of ``POSITION_STD`` pixels, clipped so the shape stays at least mostly in
  frame. The gold aesthetic rewards a centred, fully visible shape, so a fine-tuned model has
  room to improve on the base model even on prompts it already renders correctly.

Prompts follow one template: ``"a large red circle on a white background"``.

A fixed split keeps ``UNSEEN_COMBOS`` (18 of the 120 attribute combinations, 15 %) out of
pre-training: :func:`unseen_prompts`. Every attribute value still appears in the seen set,
so unseen prompts are new *compositions* of known words (the paper's unseen animals).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: listing prompts loads nothing heavy
    import torch


IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.75),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.96, 0.96, 0.96),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
# Equivalent radius (sqrt(area / pi)) in pixels of the 32x32 image.
SIZES: dict[str, float] = {"small": 5.0, "large": 8.5}
POSITION_STD = 2.5  # pixels, spread of the shape's centre around the image centre
POSITION_MAX = 4.5  # pixels, the centre offset is clipped to this in each axis
COLOUR_JITTER = 0.04  # per-channel uniform jitter of the shape's colour

TEMPLATE = "a {size} {colour} {shape} on a {background} background"
# Every word the prompts use, in a fixed order (the tokenizer's vocabulary is built from it).
WORDS: tuple[str, ...] = (
    ("a", "on", "background") + tuple(SIZES) + tuple(COLOURS) + SHAPES + tuple(BACKGROUNDS)
)

Combo = tuple[str, str, str, str]  # (shape, colour, size, background)


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    background: str
    dx: float = 0.0  # centre offset from the image centre, pixels
    dy: float = 0.0

    @property
    def combo(self) -> Combo:
        return (self.shape, self.colour, self.size, self.background)

    @property
    def prompt(self) -> str:
        return make_prompt(*self.combo)

    def to_dict(self) -> dict:
        return asdict(self)


def make_prompt(shape: str, colour: str, size: str, background: str) -> str:
    return TEMPLATE.format(shape=shape, colour=colour, size=size, background=background)


def parse_prompt(prompt: str) -> Combo | None:
    """Inverse of :func:`make_prompt`; ``None`` when the prompt is not a world prompt."""
    words = prompt.strip().lower().rstrip(".").split()
    if len(words) != 8 or words[0] != "a" or words[4] != "on" or words[5] != "a":
        return None
    size, colour, shape, background = words[1], words[2], words[3], words[6]
    if words[7] != "background":
        return None
    if size not in SIZES or colour not in COLOURS or shape not in SHAPES:
        return None
    if background not in BACKGROUNDS:
        return None
    return (shape, colour, size, background)


def all_combos() -> list[Combo]:
    return [(s, c, z, b) for s, c, z, b in itertools.product(SHAPES, COLOURS, SIZES, BACKGROUNDS)]


def _unseen_split() -> list[Combo]:
    # A fixed, seeded choice of 18 combinations (15 %), re-drawn until every attribute value
    # and every (shape, colour) pair keeps at least one seen combination.
    rng = random.Random(20240611)
    combos = all_combos()
    n = math.ceil(0.15 * len(combos))
    while True:
        unseen = sorted(rng.sample(combos, n))
        seen = set(combos) - set(unseen)
        pairs = {(s, c) for s, c, _, _ in seen}
        if len(pairs) == len(SHAPES) * len(COLOURS):
            return unseen


UNSEEN_COMBOS: tuple[Combo, ...] = tuple(_unseen_split())


def seen_combos() -> list[Combo]:
    unseen = set(UNSEEN_COMBOS)
    return [c for c in all_combos() if c not in unseen]


def seen_prompts() -> list[str]:
    """The training prompts (102): every combination not held out."""
    return [make_prompt(*c) for c in seen_combos()]


def unseen_prompts() -> list[str]:
    """The held-out prompts (18): combinations never shown in pre-training."""
    return [make_prompt(*c) for c in UNSEEN_COMBOS]


def all_prompts() -> list[str]:
    return [make_prompt(*c) for c in all_combos()]


# ----------------------------------------------------------------------------- geometry


def shape_sdf(
    shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor | float
) -> torch.Tensor:
    """Signed distance (negative inside, in the units of x, y) to a shape of equivalent radius
    ``r`` centred at the origin (the triangle at its centroid, pointing up). Broadcasts."""
    import torch  # deferred: the CLI lists and checks prompts without loading torch

    if shape == "circle":
        return torch.sqrt(x * x + y * y + 1e-12) - r
    if shape == "square":
        h = r * math.sqrt(math.pi) / 2  # half side: (2h)^2 = pi r^2
        return torch.maximum(x.abs(), y.abs()) - h
    if shape == "triangle":
        # Equilateral, side a with a^2 sqrt(3)/4 = pi r^2; inradius a / (2 sqrt 3).
        a = r * math.sqrt(4 * math.pi / math.sqrt(3))
        inr = a / (2 * math.sqrt(3))
        # Image y grows downwards; pointing up means the apex has negative y.
        d1 = y  # bottom edge, outward normal (0, 1)
        d2 = -0.5 * y + (math.sqrt(3) / 2) * x  # right edge
        d3 = -0.5 * y - (math.sqrt(3) / 2) * x  # left edge
        return torch.maximum(torch.maximum(d1, d2), d3) - inr
    if shape == "cross":
        # Plus sign: two bars of width w and length 3w; area 5 w^2 = pi r^2.
        w = r * math.sqrt(math.pi / 5)
        bar1 = torch.maximum(x.abs() - 1.5 * w, y.abs() - 0.5 * w)
        bar2 = torch.maximum(x.abs() - 0.5 * w, y.abs() - 1.5 * w)
        return torch.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {shape!r}")


def pixel_grid(size: int = IMAGE_SIZE, supersample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x, y) [size*ss, size*ss] in units of output pixels, with
    the image centre at size / 2."""
    import torch  # deferred: the CLI lists and checks prompts without loading torch

    n = size * supersample
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


# ----------------------------------------------------------------------------- rendering


def sample_attributes(rng: random.Random, combo: Combo | None = None) -> Attributes:
    combo = combo or rng.choice(seen_combos())

    def offset() -> float:
        return max(-POSITION_MAX, min(POSITION_MAX, rng.gauss(0.0, POSITION_STD)))

    return Attributes(*combo, dx=offset(), dy=offset())


def render(attrs: Attributes, seed: int = 0) -> torch.Tensor:
    """One image [3, 32, 32] float in [0, 1]. ``seed`` drives the colour jitter only."""
    return render_batch([attrs], seed=seed)[0]


def render_batch(attrs: list[Attributes], seed: int = 0) -> torch.Tensor:
    """Images [B, 3, 32, 32] float32 in [0, 1], deterministic in (attrs, seed)."""
    # Tiny tensor ops: intra-op threads only add synchronisation (40x slower when the cores
    # are oversubscribed), so render single-threaded.
    import torch  # deferred: the CLI lists and checks prompts without loading torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render_batch(attrs, seed)
    finally:
        torch.set_num_threads(threads)


def _render_batch(attrs: list[Attributes], seed: int) -> torch.Tensor:
    import torch  # deferred: the CLI lists and checks prompts without loading torch

    gen = torch.Generator().manual_seed(seed)
    x, y = pixel_grid(IMAGE_SIZE, SUPERSAMPLE)
    out = torch.empty(len(attrs), 3, IMAGE_SIZE, IMAGE_SIZE)
    centre = IMAGE_SIZE / 2
    for i, a in enumerate(attrs):
        inside = shape_sdf(a.shape, x - centre - a.dx, y - centre - a.dy, SIZES[a.size]) <= 0
        cov = torch.nn.functional.avg_pool2d(inside[None, None].float(), SUPERSAMPLE)[0]
        jitter = (torch.rand(3, generator=gen) * 2 - 1) * COLOUR_JITTER
        fg = (torch.tensor(COLOURS[a.colour]) + jitter).clamp(0, 1)[:, None, None]
        bg = torch.tensor(BACKGROUNDS[a.background])[:, None, None]
        out[i] = cov * fg + (1 - cov) * bg
    return out


def generate(
    n: int, seed: int = 0, combos: list[Combo] | None = None
) -> tuple[torch.Tensor, list[str], list[Attributes]]:
    """``n`` random images from ``combos`` (default: the seen ones), deterministic by seed.

    Returns (images [n, 3, 32, 32] in [0, 1], prompts, attributes)."""
    rng = random.Random(seed)
    pool = combos if combos is not None else seen_combos()
    attrs = [sample_attributes(rng, rng.choice(pool)) for _ in range(n)]
    images = render_batch(attrs, seed=seed)
    return images, [a.prompt for a in attrs], attrs
