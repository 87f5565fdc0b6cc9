"""Rewards of the shapes world (registered by name with :mod:`tdpo.rewards` by the world's
plug-in, :mod:`tdpo.world.plugin`, which calls :func:`build_world_reward`).

Analytic (the gold metrics of :mod:`tdpo.world.gold`, for evaluation and as oracles):

- ``shapes_gold_alignment``: alignment in {0, .25, .5, .75, 1}; differentiable through a
  straight-through estimator (hard value forward, gradient of the soft version);
- ``shapes_gold_aesthetic``: the gold aesthetic in [0, 1], smooth;
- ``shapes_gold``: alignment * aesthetic.

Learned, each trained on a limited, noisy label set drawn mostly from the base model's own
samples, standing for the paper's four reward models (label counts, noise and measured
correlations with gold are in ``docs/shapes_world.md`` and in each reward's json config):

- ``shapes_aesthetic`` (LAION aesthetic predictor): an MLP on the tiny CLIP's L2-normalized
  image embedding, regressing noisy gold-aesthetic ratings;
- ``shapes_pickscore`` (PickScore): scaled cosine of learned projections of the tiny CLIP's
  image and text embeddings, plus an image-only term, trained on noisy pairwise choices of
  gold (Bradley-Terry) between two samples of the same prompt;
- ``shapes_hps`` (HPSv2): a small CNN on the pixels, FiLM-conditioned on the tiny CLIP's text
  embedding, trained on other noisy same-prompt pairs of gold (Bradley-Terry);
- ``shapes_imagereward`` (ImageReward): an MLP on [image emb, text emb, their product]
  regressing noisy 1-to-7 ratings of gold (alignment and aesthetic together).

All are differentiable in the images: the CLIP preprocessing (resize to 32x32, normalize) is
done in torch (:func:`tdpo.backbones.preprocess_images`). Importing this module loads no weights;
:func:`build_world_reward` and :func:`load_learned_reward` do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tdpo.algos.advantages import pearson
from tdpo.backbones.preprocess import PreprocessConfig, preprocess_images
from tdpo.world import GOLD_REWARDS, LEARNED_REWARDS, WEIGHTS_DIR, gold

LEARNED = LEARNED_REWARDS
GOLD_FOR = {
    "shapes_aesthetic": "aesthetic",
    "shapes_pickscore": "gold",
    "shapes_hps": "gold",
    "shapes_imagereward": "gold",
}


# ----------------------------------------------------------------------------- tiny CLIP


def pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and an output object (projected
    embedding in ``pooler_output``) in transformers 5."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipFeatures(nn.Module):
    """Frozen tiny CLIP: differentiable image embeddings, cached text embeddings."""

    def __init__(self, clip, tokenizer, image_size: int = 32):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.preprocess_config = PreprocessConfig(
            resize=("exact", (image_size, image_size)), crop=None, interpolation="bilinear"
        )
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> ClipFeatures:
        from transformers import CLIPModel, CLIPTokenizer  # deferred: slow to import

        clip = CLIPModel.from_pretrained(path)
        tok = CLIPTokenizer.from_pretrained(path)
        return cls(clip, tok, clip.config.vision_config.image_size).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> CLIP pixel values: clamp to [0, 1], bilinear resize, normalize."""
        return preprocess_images(images.float().clamp(0, 1), self.preprocess_config)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> L2-normalized [B, D]."""
        out = pooled(self.clip.get_image_features(pixel_values=self.preprocess(images)))
        return nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalized [B, D] (cached per prompt)."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            tok = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            out = pooled(self.clip.get_text_features(input_ids=tok.input_ids))
            out = nn.functional.normalize(out, dim=-1)
            for p, e in zip(missing, out):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])


# ----------------------------------------------------------------------------- heads


class AestheticMLP(nn.Module):
    """LAION-aesthetic-predictor analogue: MLP on the normalized CLIP image embedding."""

    def __init__(self, dim: int = 64, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1)
        )

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(img)[:, 0]


class PickHead(nn.Module):
    """PickScore analogue: scale * cos(A img, B txt) + w . img (projections start at identity)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.img_proj = nn.Linear(dim, dim, bias=False)
        self.txt_proj = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.img_proj.weight)
        nn.init.eye_(self.txt_proj.weight)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.img_term = nn.Linear(dim, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        a = nn.functional.normalize(self.img_proj(img), dim=-1)
        b = nn.functional.normalize(self.txt_proj(txt), dim=-1)
        return self.logit_scale.exp() * (a * b).sum(-1) + self.img_term(img)[:, 0]


class HPSNet(nn.Module):
    """HPSv2 analogue: a small CNN on pixels, FiLM-conditioned on the CLIP text embedding."""

    def __init__(self, dim: int = 64, width: int = 24):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, stride=2, padding=1)  # 16x16
        self.c2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 8x8
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)  # 4x4
        self.film = nn.Linear(dim, 4 * width)
        self.out = nn.Sequential(nn.Linear(2 * width * 4, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().clamp(0, 1)
        if x.shape[-2:] != (32, 32):
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        x = x * 2 - 1
        h = nn.functional.gelu(self.c1(x))
        h = nn.functional.gelu(self.c2(h))
        gamma, beta = self.film(txt).chunk(2, dim=-1)
        h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        h = nn.functional.gelu(self.c3(h))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.out(h)[:, 0]


class ImageRewardMLP(nn.Module):
    """ImageReward analogue: MLP on [img, txt, img * txt] of the tiny CLIP."""

    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 64),
            nn.GELU(),
            nn.Linear(64, 1),
        )

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([img, txt, img * txt], -1))[:, 0]


HEADS: dict[str, type[nn.Module]] = {
    "shapes_aesthetic": AestheticMLP,
    "shapes_pickscore": PickHead,
    "shapes_hps": HPSNet,
    "shapes_imagereward": ImageRewardMLP,
}


class LearnedReward:
    """``reward(images, prompts, metadata) -> (rewards [B], info)`` around a trained head."""

    def __init__(self, name: str, head: nn.Module, features: ClipFeatures, config: dict):
        self.name = name
        self.head = head.eval().requires_grad_(False)
        self.features = features
        self.config = config
        self.offset = float(config.get("offset", 0.0))
        self.scale = float(config.get("scale", 1.0))

    def raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dev = self.features.device
        images = images.to(dev)
        img = self.features.image_embeds(images)
        txt = self.features.text_embeds(list(prompts))
        return self.head(img, txt, images)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        r = (self.raw(images, prompts) - self.offset) / self.scale
        return r, {}


def load_learned_reward(
    name: str,
    weights_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    features: ClipFeatures | None = None,
) -> LearnedReward:
    """Load ``weights_dir/rewards/<name>.safetensors`` (+ .json) and ``weights_dir/clip``."""
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    cfg = json.loads((root / "rewards" / f"{name}.json").read_text())
    head = HEADS[name](**cfg.get("head_kwargs", {}))
    head.load_state_dict(load_file(str(root / "rewards" / f"{name}.safetensors")))
    features = features or ClipFeatures.from_pretrained(root / "clip", device)
    return LearnedReward(name, head.to(device), features, cfg)


# ----------------------------------------------------------------------------- gold rewards


def gold_reward(kind: str):
    """``kind``: ``alignment`` (straight-through gradient: hard forward, soft backward),
    ``aesthetic`` (smooth) or ``gold`` (alignment * aesthetic)."""

    def reward(images, prompts, metadata=None):
        if kind == "alignment":
            r = gold.alignment(images, list(prompts), differentiable=True)
        elif kind == "aesthetic":
            r = gold.aesthetic(images)
        else:
            r = gold.alignment(images, list(prompts), differentiable=True) * gold.aesthetic(images)
        return r, {}

    return reward


def build_world_reward(name: str, device: torch.device | str = "cpu"):
    """The world reward ``name``: a gold metric (:data:`tdpo.world.GOLD_REWARDS`) or a learned
    reward from the shipped weights (:data:`tdpo.world.LEARNED_REWARDS`)."""
    if name in GOLD_REWARDS:
        return gold_reward(GOLD_REWARDS[name])
    if name in LEARNED_REWARDS:
        return load_learned_reward(name, device=device)
    raise KeyError(f"{name!r} is not a shapes world reward")


# ----------------------------------------------------------------------------- training

# Label sets: which part of the base-sample pool (fractions) and of the clean generator
# images each reward is trained on, how many labels, and how noisy they are.
LABEL_SPECS: dict[str, dict[str, Any]] = {
    "shapes_aesthetic": {
        "kind": "rating",
        "target": "aesthetic",
        "pool": (0.0, 0.5),
        "clean": (0.0, 0.25),
        "noise_std": 0.08,
        "steps": 3000,
        "lr": 1e-3,
    },
    "shapes_imagereward": {
        "kind": "rating_1_7",
        "target": "gold",
        "pool": (0.3, 0.85),
        "clean": (0.0, 0.0),  # clean images in the mix cut the base-sample Pearson (0.82 -> 0.65)
        "noise_std": 0.08,
        "steps": 600,  # more overfits the integer ratings (measured: base-sample Pearson falls)
        "lr": 1e-3,
        "weight_decay": 0.1,
        "head_kwargs": {"hidden": 64},
    },
    "shapes_pickscore": {
        "kind": "pairs",
        "target": "gold",
        "pool": (0.45, 1.0),
        "clean": (0.0, 0.0),
        "temperature": 0.03,
        "pairs_per_image": 3.0,
        "steps": 1500,
        "lr": 3e-3,
    },
    "shapes_hps": {
        "kind": "pairs",
        "target": "gold",
        "pool": (0.0, 0.7),
        "clean": (0.0, 0.0),
        "temperature": 0.04,
        "pairs_per_image": 2.0,
        "steps": 1000,
        "lr": 2e-3,
        "batch": 128,
    },
}


def _pairs(idx: list[int], prompts: list[str], n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random pairs of distinct images from ``idx``. (Same-prompt pairs only, as in
    Pick-a-Pic and HPD, carry too little gold variation here: the learned model then did not
    correlate with gold across prompts, so pairs are drawn across prompts.)"""
    ii = torch.tensor(idx)
    a = torch.randint(0, len(idx), (n,), generator=g)
    b = (a + torch.randint(1, max(2, len(idx)), (n,), generator=g)) % len(idx)
    return torch.stack([ii[a], ii[b]], 1)


def train_learned_rewards(
    out_dir: Path,
    features: ClipFeatures,
    images: dict[str, torch.Tensor],
    prompts: dict[str, list[str]],
    gold_module,
    scale: float = 1.0,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Label, train and save the four learned rewards into ``out_dir`` (safetensors + json).

    ``images`` / ``prompts`` hold ``pool`` (base-model samples of seen prompts) and ``clean``
    (generator images). Labels are noisy functions of gold (see ``LABEL_SPECS``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.cat([images["pool"], images["clean"]])
    p = list(prompts["pool"]) + list(prompts["clean"])
    n_pool, n_clean = len(images["pool"]), len(images["clean"])
    ev = gold_module.evaluate(x, p)
    with torch.no_grad():
        img = torch.cat([features.image_embeds(x[i : i + 256]) for i in range(0, len(x), 256)])
        txt = features.text_embeds(p)
    info: dict[str, Any] = {}
    for k, (name, spec) in enumerate(LABEL_SPECS.items()):
        g = torch.Generator().manual_seed(seed * 1000 + 17 * k + 1)
        torch.manual_seed(seed * 1000 + 17 * k + 2)
        a, b = spec["pool"]
        idx = list(range(int(a * n_pool), int(b * n_pool)))
        a, b = spec["clean"]
        idx += [n_pool + i for i in range(int(a * n_clean), int(b * n_clean))]
        target = ev[spec["target"]]
        head_kwargs = dict(spec.get("head_kwargs", {}))
        head = HEADS[name](**head_kwargs)
        opt = torch.optim.AdamW(
            head.parameters(), lr=spec["lr"], weight_decay=spec.get("weight_decay", 1e-2)
        )
        steps = max(2, int(spec["steps"] * min(1.0, scale * 10)))
        if spec["kind"].startswith("rating"):
            t = target[idx] + torch.randn(len(idx), generator=g) * spec["noise_std"]
            if spec["kind"] == "rating_1_7":
                y = (1 + 6 * t.clamp(0, 1)).round()
                label_info = {"labels": len(idx), "label": "integer rating 1..7 of gold + noise"}
            else:
                y = t
                label_info = {"labels": len(idx), "label": "rating = gold aesthetic + noise"}
            label_info["noise_std"] = spec["noise_std"]
            label_info["label_pearson_with_gold"] = round(pearson(y, target[idx]), 4)
            ii = torch.tensor(idx)
            for _ in range(steps):
                loss = torch.nn.functional.mse_loss(head(img[ii], txt_sel(txt, ii), x[ii]), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            n_pairs = max(4, int(spec["pairs_per_image"] * len(idx)))
            pairs = _pairs(idx, p, n_pairs, g)
            diff = target[pairs[:, 0]] - target[pairs[:, 1]]
            prob = torch.sigmoid(diff / spec["temperature"])
            choice = (torch.rand(n_pairs, generator=g) < prob).float()  # 1: first preferred
            decided = diff != 0
            agree = ((choice == (diff > 0).float()) & decided).sum() / decided.sum().clamp_min(1)
            label_info = {
                "labels": n_pairs,
                "label": "pairwise choice between two base images (any prompts), "
                "P(first) = sigmoid((gold_1 - gold_2) / T)",
                "temperature": spec["temperature"],
                "choices_agreeing_with_gold": round(float(agree), 4),
                "images": len(idx),
            }
            batch = spec.get("batch", n_pairs)
            for _ in range(steps):
                sel = torch.randint(0, n_pairs, (batch,), generator=g) if batch < n_pairs else None
                pr = pairs if sel is None else pairs[sel]
                ch = choice if sel is None else choice[sel]
                flat = pr.flatten()
                s = head(img[flat], txt[flat], x[flat]).view(-1, 2)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(s[:, 0] - s[:, 1], ch)
                loss = loss + 1e-3 * (s**2).mean()  # keeps the score scale bounded
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        head.eval()
        with torch.no_grad():
            ii = torch.tensor(idx)
            raw = torch.cat(
                [
                    head(img[ii[i : i + 512]], txt[ii[i : i + 512]], x[ii[i : i + 512]])
                    for i in range(0, len(ii), 512)
                ]
            )
        offset, scl = (
            (float(raw.mean()), float(raw.std().clamp_min(1e-6)))
            if spec["kind"] == "pairs"
            else (0.0, 1.0)
        )
        cfg = {
            "name": name,
            "head": type(head).__name__,
            "head_kwargs": head_kwargs,
            "params": sum(q.numel() for q in head.parameters()),
            "offset": offset,
            "scale": scl,
            "gold_target": spec["target"],
            "train_steps": steps,
            "train_fit_pearson": round(pearson(raw, target[idx]), 4),
            **label_info,
        }
        save_file(
            {k2: v.contiguous() for k2, v in head.state_dict().items()},
            str(out_dir / f"{name}.safetensors"),
        )
        (out_dir / f"{name}.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        info[name] = cfg
        if not quiet:
            print(f"[world] reward {name}: {json.dumps(cfg)}", flush=True)
    return info


def txt_sel(txt: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
    return txt[ii]
