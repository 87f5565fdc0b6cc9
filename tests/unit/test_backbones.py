"""Image embedders on tiny randomly-initialized CLIP models saved to tmp dirs (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdpo.backbones import (
    ImageEmbedder,
    PreprocessConfig,
    load_image_embedder,
    preprocess_images,
)
from tdpo.errors import UsageError
from tests.fixtures.tiny_clip import VISION, save_tiny_clip, text_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A full CLIPModel folder (with a processor) and a CLIPVisionModelWithProjection folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    full = tmp_path_factory.mktemp("clip_full")
    model = save_tiny_clip(full, text_config(vocab_size=99, bos_token_id=0, eos_token_id=1))
    vision = tmp_path_factory.mktemp("clip_vision")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=12)).save_pretrained(
        vision
    )
    return full, vision, model


def _uint8_images(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float() / 255


def _smooth_images(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 6, 6, generator=generator)
    up = torch.nn.functional.interpolate(low, (height, width), mode="bilinear", align_corners=False)
    return (up * 255).round() / 255


def _processor_pixels(processor, images):
    arrays = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]
    return processor(images=arrays, return_tensors="pt")["pixel_values"]


def test_full_clip_folder_loads_normalized_embeddings_matching_the_model(clip_dirs):
    full, _, model = clip_dirs
    embedder = load_image_embedder(str(full))
    assert isinstance(embedder, ImageEmbedder)
    assert embedder.embed_dim == 16
    images = _uint8_images(3, 40, 52)
    out = embedder(images)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    pixels = embedder.preprocess(images)
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(out, torch.nn.functional.normalize(expected, dim=-1))


def test_preprocessing_equals_the_processor_on_uint8_images(clip_dirs):
    from transformers import CLIPImageProcessor

    full, _, _ = clip_dirs
    processor = CLIPImageProcessor.from_pretrained(full)
    embedder = load_image_embedder(str(full))
    assert embedder.preprocess_config.mean == pytest.approx((0.5, 0.4, 0.3))
    # Already at the target size: only crop + normalize, exact up to float rounding.
    images = _uint8_images(2, 30, 44)
    torch.testing.assert_close(
        embedder.preprocess(images), _processor_pixels(processor, images), atol=1e-5, rtol=0
    )
    # Downscaling: the processor resizes uint8 images with PIL (antialiased bicubic, two passes,
    # each rounded and clipped to uint8); torch's antialiased bicubic uses the same kernel in
    # float. In [0, 1] pixel units (normalized difference times std): on smooth images only the
    # final rounding differs (max < 1/255); on uniform noise, the worst case, PIL's intermediate
    # clipping adds a few levels at a few pixels (measured max 5.4/255), mean ~0.3/255.
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    for height, width in [(64, 64), (61, 90), (100, 47)]:
        for images, max_diff in [
            (_smooth_images(2, height, width, height), 1.1 / 255),
            (_uint8_images(2, height, width, seed=height), 8 / 255),
        ]:
            ours, theirs = embedder.preprocess(images), _processor_pixels(processor, images)
            assert ours.shape == theirs.shape == (2, 3, 30, 30)
            pixel_diff = (ours - theirs).abs() * std
            assert pixel_diff.max().item() < max_diff
            assert pixel_diff.mean().item() < 0.4 / 255


def test_vision_only_folder_and_defaults_without_a_processor(clip_dirs):
    _, vision, _ = clip_dirs
    embedder = load_image_embedder(f"hf:{vision}")
    assert embedder.embed_dim == 12
    cfg = embedder.preprocess_config
    assert cfg.resize == ("shortest_edge", 30) and cfg.crop == (30, 30)
    assert cfg.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert embedder(_uint8_images(2, 32, 32)).shape == (2, 12)


def test_frozen_eval_and_differentiable_wrt_images(clip_dirs):
    full, _, _ = clip_dirs
    embedder = load_image_embedder(str(full))
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.training and not embedder.vision_model.training
    images = _uint8_images(2, 48, 48).requires_grad_(True)
    embedder(images)[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_dtype_is_respected(clip_dirs):
    full, _, _ = clip_dirs
    embedder = load_image_embedder(str(full), dtype=torch.bfloat16)
    assert embedder.dtype == torch.bfloat16
    assert embedder(_uint8_images(1, 30, 30)).dtype == torch.float32


def test_preprocess_crop_rounding_follows_torchvision_when_asked():
    images = torch.arange(5 * 6, dtype=torch.float32).view(1, 1, 5, 6).repeat(1, 3, 1, 1) / 30
    cfg = PreprocessConfig(resize=("exact", (5, 6)), crop=(2, 3), mean=(0, 0, 0), std=(1, 1, 1))
    floor = preprocess_images(images, cfg)
    rounded = preprocess_images(
        images, PreprocessConfig(**{**cfg.__dict__, "crop_rounding": "round"})
    )
    torch.testing.assert_close(floor[0, 0], images[0, 0, 1:3, 1:4])
    torch.testing.assert_close(rounded[0, 0], images[0, 0, 2:4, 2:5])


def test_bad_specs_are_one_line_usage_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="does not exist") as info:
        load_image_embedder(str(tmp_path / "missing"))
    assert info.value.field == "critic.backbone" and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UsageError, match="not a CLIP model"):
        load_image_embedder(str(tmp_path))
    with pytest.raises(UsageError, match="offline"):
        load_image_embedder("nobody/no-such-clip-model")
    with pytest.raises(UsageError, match="open_clip:<architecture>:<checkpoint"):
        load_image_embedder("open_clip:ViT-H-14")
    with pytest.raises(UsageError):
        load_image_embedder("")


def test_named_specs_follow_their_environment_overrides(clip_dirs, monkeypatch):
    full, vision, _ = clip_dirs
    monkeypatch.setenv("TDPO_PICKSCORE_MODEL", str(vision))
    monkeypatch.setenv("TDPO_PICKSCORE_PROCESSOR", str(full))  # processor from another folder
    embedder = load_image_embedder("pickscore")
    assert embedder.embed_dim == 12
    assert embedder.preprocess_config.mean == pytest.approx((0.5, 0.4, 0.3))
    monkeypatch.setenv("TDPO_CLIP_L14", str(full))
    assert load_image_embedder("clip").embed_dim == 16
