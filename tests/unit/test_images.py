"""Images: float to bytes and back, tensor to PIL, and captioned grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdpo.images import _PAD, save_grid, to_float, to_pil, to_uint8


def test_to_uint8_clamps_and_rounds_and_to_float_inverts_it() -> None:
    images = torch.tensor([[-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0]])
    out = to_uint8(images.requires_grad_())
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out[0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # round half to even
    assert torch.equal(to_uint8(to_float(out)), out)
    assert to_float(out).dtype == torch.float32 and to_float(out).max() <= 1.0
    half = torch.tensor([0.25], dtype=torch.float16)
    assert to_float(half).dtype == torch.float32 and to_float(half).item() == 0.25


def test_to_pil_maps_unit_range_to_bytes() -> None:
    image = torch.zeros(3, 4, 5)
    image[0] = 1.0
    image[1, 0, 0] = 2.0  # clamped
    pil = to_pil(image)
    assert pil.size == (5, 4) and pil.mode == "RGB"
    assert pil.getpixel((0, 0)) == (255, 255, 0)
    assert pil.getpixel((1, 1)) == (255, 0, 0)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(4, 4, 4))


def test_grid_of_small_images_is_upscaled_and_captioned(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 32, 32, generator=generator)
    captions = [
        f"a very long prompt number {i} about a red circle\nreward {i / 3:.3f}" for i in range(5)
    ]
    path = save_grid(images, captions, tmp_path / "samples" / "epoch_0001.png", columns=3)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        width, height = grid.size
        array = np.asarray(grid.convert("RGB"))
    assert width == 3 * 128 + 4 * _PAD  # 3 cells of 32 * 4 px, with padding
    assert height > 2 * 128 + 2 * 24  # two rows, each with image and caption lines
    assert array.std() > 10  # not blank
    # The first cell is the first image upscaled 4x with NEAREST: a 4x4 block of equal pixels.
    cell = array[_PAD : _PAD + 128, _PAD : _PAD + 128]
    assert (cell[0:4, 0:4] == cell[0, 0]).all()
    expected = to_pil(images[0]).getpixel((0, 0))
    assert tuple(cell[0, 0]) == expected
    # Captions are drawn: the band under the first image holds dark text pixels.
    band = array[_PAD + 128 : _PAD + 128 + 24, _PAD : _PAD + 128]
    assert (band.min(axis=2) < 100).sum() > 20


def test_grid_explicit_scale_and_caption_count(tmp_path: Path) -> None:
    images = torch.full((2, 3, 64, 64), 0.5)
    path = save_grid(images, ["a", "b"], tmp_path / "g.png", scale=1)
    with Image.open(path) as grid:
        assert grid.size[0] == 2 * 64 + 3 * _PAD
    with pytest.raises(ValueError, match="captions"):
        save_grid(images, ["only one"], tmp_path / "h.png")
