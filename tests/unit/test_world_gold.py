"""Shapes world: generator and analytic gold metrics (fast, no models)."""

from __future__ import annotations

import torch

from tdpo.world import generator as gen
from tdpo.world import gold


def test_prompt_split():
    seen, unseen, every = gen.seen_prompts(), gen.unseen_prompts(), gen.all_prompts()
    assert len(every) == len(set(every)) == len(seen) + len(unseen)
    assert not set(seen) & set(unseen)
    assert len(unseen) >= 0.15 * len(every)
    words = {w for p in seen for w in p.split()}
    for p in unseen:  # unseen prompts are new compositions of known words
        assert set(p.split()) <= words
    assert gen.make_prompt("circle", "red", "large", "white") == (
        "a large red circle on a white background"
    )
    for p in every:
        assert gen.make_prompt(*gen.parse_prompt(p)) == p
    assert gen.parse_prompt("a photo of a cat") is None


def test_generator_is_deterministic_and_antialiased():
    a, pa, _ = gen.generate(16, seed=3)
    b, pb, _ = gen.generate(16, seed=3)
    c, _, _ = gen.generate(16, seed=4)
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert set(pa) <= set(gen.seen_prompts())
    # anti-aliasing: some edge pixels are mixtures of the shape and background colours
    levels = torch.unique((a[0] * 255).round())
    assert len(levels) > 8


def test_gold_alignment_on_generator_images():
    images, prompts, _ = gen.generate(256, seed=1)
    ev = gold.evaluate(images, prompts)
    assert ev["alignment"].mean() >= 0.95
    assert 0.3 < ev["aesthetic"].mean() <= 1.0
    unseen, uprompts, _ = gen.generate(64, seed=2, combos=list(gen.UNSEEN_COMBOS))
    assert gold.alignment(unseen, uprompts).mean() >= 0.95


def test_gold_low_on_mismatch_and_noise():
    images, prompts, _ = gen.generate(128, seed=5)
    shuffled = prompts[7:] + prompts[:7]
    assert gold.alignment(images, shuffled).mean() < 0.5
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gold.alignment(noise, prompts[:64]).mean() < 0.3
    assert gold.aesthetic(noise).mean() < 0.1
    assert gold.gold(noise, prompts[:64]).mean() < 0.05
    blank = torch.ones(4, 3, 32, 32)
    assert gold.aesthetic(blank).max() < 0.05


def test_gold_robust_to_garbage():
    prompts = ["a small red circle on a white background", "not a world prompt"]
    weird = torch.full((2, 3, 64, 48), float("nan"))
    for x in (weird, torch.randn(2, 3, 32, 32) * 100, torch.zeros(2, 1, 32, 32)):
        ev = gold.evaluate(x, prompts)
        for v in ev.values():
            assert v.shape == (2,) and torch.isfinite(v).all()
            assert (v >= 0).all() and (v <= 1).all()
    images, _, _ = gen.generate(2, seed=0)
    assert gold.alignment(images, ["a photo of a dog", "hello"]).sum() == 0


def test_gold_aesthetic_prefers_centred_crisp_images():
    centred = gen.render_batch([gen.Attributes("circle", "red", "large", "white")])
    shifted = gen.render_batch([gen.Attributes("circle", "red", "large", "white", 4.5, 4.5)])
    blurred = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(centred, (1, 1, 1, 1), mode="replicate"), 3, 1
    )
    noisy = (centred + 0.1 * torch.randn_like(centred)).clamp(0, 1)
    a = gold.aesthetic(torch.cat([centred, shifted, blurred, noisy]))
    assert a[0] > 0.9
    assert a[1] < a[0] - 0.2 and a[2] < a[0] - 0.2 and a[3] < a[0] - 0.2


def test_gold_gradients():
    images, prompts, _ = gen.generate(4, seed=9)
    x = (images * 0.9 + 0.05).requires_grad_(True)
    r = gold.alignment(x, prompts, differentiable=True) + gold.aesthetic(x)
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        hard = gold.alignment(x, prompts)
    assert torch.allclose(gold.alignment(x, prompts, differentiable=True).detach(), hard)
