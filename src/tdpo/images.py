"""Float images to bytes and PIL images, and captioned sample grids written atomically as PNG."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tdpo.fileio import atomic_write

MIN_CELL_WIDTH = 128  # small images are upscaled (NEAREST) to at least this width
_PAD = 6
_MAX_CAPTION_LINES = 8
_MAX_CAPTION_LINE_CHARS = 400  # more never fits in 8 wrapped lines; wrapping costs O(chars^2)
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (any shape, any device) as uint8 in [0, 255], same shape and
    device: clamped to [0, 1], times 255, rounded to the nearest integer (halves to even)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_arrays(images: torch.Tensor) -> list:
    """Float images [B, 3, H, W] in [0, 1] as B contiguous uint8 numpy arrays [H, W, 3] (what
    PIL and reward preprocessors take)."""
    import numpy as np  # deferred: keeps this module's import light

    return [np.ascontiguousarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_uint8`: uint8 images as float32 in [0, 1] (divided by 255);
    float images are returned as float32, unchanged."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [3,H,W] (or [1,H,W]) float tensor in [0, 1] as an RGB PIL image; values are clamped."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3,H,W], got shape {tuple(image.shape)}")
    array = to_uint8(image.cpu())
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _text_width(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> float:
    return font.getlength(text)


def _wrap(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """Greedy word wrap to ``width`` pixels; explicit newlines kept, over-long words split."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if _text_width(candidate, font) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            while _text_width(word, font) > width and len(word) > 1:  # split long words
                lo, hi = 1, len(word) - 1  # the longest prefix that fits (at least 1 char)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if _text_width(word[:mid], font) <= width:
                        lo = mid
                    else:
                        hi = mid - 1
                lines.append(word[:lo])
                word = word[lo:]
                if len(lines) > _MAX_CAPTION_LINES:
                    break
            current = word
            if len(lines) > _MAX_CAPTION_LINES:
                break
        lines.append(current)
        if len(lines) > _MAX_CAPTION_LINES:
            break
    if len(lines) > _MAX_CAPTION_LINES:
        lines = lines[:_MAX_CAPTION_LINES]
        lines[-1] = lines[-1].rstrip() + "..."
    return lines


def _shorten(caption: str) -> str:
    """Each line of a caption cut to :data:`_MAX_CAPTION_LINE_CHARS` characters (with "...")."""
    limit = _MAX_CAPTION_LINE_CHARS
    return "\n".join(
        line if len(line) <= limit else line[: limit - 3] + "..." for line in caption.split("\n")
    )


def save_grid(
    images: torch.Tensor,
    captions: list[str],
    path: Path,
    columns: int | None = None,
    scale: int | None = None,
) -> Path:
    """Save images [B,3,H,W] in [0, 1] as a captioned PNG grid, atomically; returns ``path``.

    ``columns`` defaults to ceil(sqrt(B)); ``scale`` (integer, NEAREST) defaults to the smallest
    one making each cell at least 128 px wide. Captions (e.g. prompt and reward; ``\\n`` starts
    a new line) are wrapped to the cell width under each cell.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
    count, _, height, width = images.shape
    if count == 0:
        raise ValueError("no images to save")
    if len(captions) != count:
        raise ValueError(f"{count} images but {len(captions)} captions")
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if scale is None:
        scale = max(1, math.ceil(MIN_CELL_WIDTH / width))
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    rows = math.ceil(count / columns)
    cell_w, cell_h = width * scale, height * scale

    font = _font()
    wrapped = [_wrap(_shorten(c), cell_w, font) for c in captions]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_h = ascent + descent + 1
    caption_h = max(len(lines) for lines in wrapped) * line_h + _PAD

    block_w, block_h = cell_w + _PAD, cell_h + caption_h + _PAD
    grid = Image.new("RGB", (columns * block_w + _PAD, rows * block_h + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i in range(count):
        x = _PAD + (i % columns) * block_w
        y = _PAD + (i // columns) * block_h
        cell = to_pil(images[i])
        if scale != 1:
            cell = cell.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        grid.paste(cell, (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + cell_h + _PAD // 2 + j * line_h), line, fill=_TEXT, font=font)

    return atomic_write(Path(path), lambda f: grid.save(f, format="PNG"), binary=True)
