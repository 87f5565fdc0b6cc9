"""Preprocessing and scoring parity of the Hub rewards, on tiny randomly-initialized models of
the same classes built from configs (no download).

For each reward: the project's torch path and the model's own processor (uint8 PIL images)
give the same model inputs and scores; the differentiable path equals the no-grad one; a
gradient reaches the images. The HPSv2 conversion (open_clip -> transformers CLIP) is checked
against open_clip's own forward, run in a subprocess (open_clip imports torchvision, which does
not import beside the CPU torch build here, so the subprocess stubs it: only the model code runs).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from tdpo.backbones import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from tdpo.errors import UsageError  # noqa: E402
from tdpo.rewards import hub  # noqa: E402
from tests.fixtures.tiny_clip import STD, save_tiny_clip, text_config  # noqa: E402

# Pixel-value parity in [0, 1] units (normalized difference times std): see
# tests/unit/test_backbones.py; smooth images differ only by the processor's uint8 rounding.
PIXEL_ATOL = 1.1 / 255


def _tiny_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tokenizer, vocab_size = _tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny_clip")
    text = text_config(vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    save_tiny_clip(folder, text)
    tokenizer.save_pretrained(folder)
    return folder


def _smooth_images(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 5, 5, generator=generator)
    up = torch.nn.functional.interpolate(low, (height, width), mode="bilinear", align_corners=False)
    return (up * 255).round() / 255


PROMPTS = ["a cat", "a photo of a dog on a beach"]


def _check_reward(reward, images, score_atol, expect_grad=True):
    plain, info = reward(images, PROMPTS, [{}, {}])
    assert plain.shape == (2,) and plain.dtype == torch.float32 and not plain.requires_grad
    assert all(isinstance(v, float) for v in info.values())
    reference = reward.reference(images, PROMPTS)
    torch.testing.assert_close(plain, reference, atol=score_atol, rtol=0)
    leaf = images.clone().requires_grad_(True)
    diff, _ = reward(leaf, PROMPTS, [{}, {}])
    torch.testing.assert_close(diff.detach(), plain, atol=1e-5, rtol=1e-5)
    diff.sum().backward()
    assert leaf.grad is not None
    if expect_grad:
        assert leaf.grad.abs().sum() > 0
    return plain


def test_pickscore_matches_processor_and_formula(clip_dir):
    reward = hub.pickscore(model=str(clip_dir), processor=str(clip_dir))
    images = _smooth_images(2, 64, 48)
    scorer = reward.scorer
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixel_diff = (scorer.pixels(images) - scorer.processor_pixels(images)).abs() * std
    assert pixel_diff.max().item() < PIXEL_ATOL
    scores = _check_reward(reward, images, score_atol=2e-2)
    model = scorer.model
    tokens = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=scorer.pixels(images),
        )
    # PickScore: logits_per_image = exp(logit_scale) * cos; the reward is its diagonal.
    torch.testing.assert_close(scores, out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-4)


def test_clipscore_is_100_times_clamped_cosine(clip_dir):
    reward = hub.clipscore(model=str(clip_dir))
    images = _smooth_images(2, 40, 40, seed=1)
    with torch.no_grad():
        cos = reward.scorer.cosine(reward.scorer.pixels(images), PROMPTS)
    # max(cos, 0) has no gradient where the (random) model's cosine is negative.
    scores = _check_reward(reward, images, score_atol=0.5, expect_grad=bool((cos > 0).any()))
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0))


def test_aesthetic_mlp_on_normalized_clip_embeddings(clip_dir, tmp_path):
    torch.manual_seed(1)
    mlp = hub.AestheticMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = hub.aesthetic(
        clip=str(clip_dir), mlp=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    )
    images = _smooth_images(2, 72, 50, seed=2)
    scores = _check_reward(reward, images, score_atol=1e-3)
    with torch.no_grad():
        embeds = reward.embedder(images)
        expected = mlp.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_a_wrong_mlp_file(clip_dir, tmp_path):
    torch.save({"layers.0.weight": torch.zeros(4, 16)}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="aesthetic MLP"):
        hub.aesthetic(clip=str(clip_dir), mlp=str(tmp_path / "bad.pth"))


OPEN_CLIP_REFERENCE = textwrap.dedent("""
    import importlib.machinery, sys, types
    import torch

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    class _Any(metaclass=_Meta):
        def __init__(self, *args, **kwargs):
            pass

    def _getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.ops", "torchvision.ops.misc"]
    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = _getattr
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    for name in names[1:]:
        parent, child = name.rsplit(".", 1)
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["timm"] = None
    import open_clip

    inputs = torch.load(sys.argv[1])
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=28, layers=2, width=40, head_width=10, patch_size=7),
        text_cfg=dict(context_length=77, vocab_size=inputs["vocab_size"], width=32, heads=4, layers=2),
    ).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.05)
    with torch.no_grad():
        image = model.encode_image(inputs["pixels"], normalize=True)
        text = model.encode_text(inputs["ids"], normalize=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1, "image": image, "text": text},
               sys.argv[2])
""")


def _torchvision_eval_transform(images, size):
    """open_clip's eval transform on PIL images: Resize(size, BICUBIC), CenterCrop (rounded
    offsets), ToTensor, Normalize(OpenAI mean/std), written with PIL and numpy."""
    out = []
    for array in (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        image = Image.fromarray(np.ascontiguousarray(array))
        w, h = image.size
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        crop = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size] / 255
        out.append(torch.from_numpy(crop).permute(2, 0, 1))
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std


@pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None, reason="open_clip_torch not installed"
)
def test_hpsv2_conversion_matches_open_clip(tmp_path, monkeypatch):
    from tdpo.backbones import open_clip_hf

    monkeypatch.setitem(open_clip_hf.KNOWN_ARCHS, "tiny", (10, 4))
    tokenizer, vocab_size = _tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    images = _smooth_images(2, 56, 41, seed=3)
    pixels = _torchvision_eval_transform(images, 28)
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    torch.save({"pixels": pixels, "ids": ids, "vocab_size": vocab_size}, tmp_path / "in.pt")
    script = tmp_path / "reference.py"
    script.write_text(OPEN_CLIP_REFERENCE)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "ckpt.pt")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    reference = torch.load(tmp_path / "ckpt.pt")

    reward = hub.hpsv2(
        checkpoint=str(tmp_path / "ckpt.pt"), tokenizer=str(tmp_path / "tokenizer"), arch="tiny"
    )
    scorer = reward.scorer
    # Preprocessing: our torch path vs the PIL/torchvision-style transform.
    pixel_diff = (scorer.pixels(images) - pixels).abs() * torch.tensor(OPENAI_CLIP_STD).view(
        1, 3, 1, 1
    )
    assert pixel_diff.max().item() < PIXEL_ATOL
    # Model: the converted transformers CLIP equals open_clip's forward on the same inputs.
    with torch.no_grad():
        image = scorer.image_features(pixels)
        text = scorer.text_features(PROMPTS)
    torch.testing.assert_close(image, reference["image"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text, reference["text"], atol=1e-5, rtol=1e-4)
    # HPS score = diag(image_features @ text_features.T) of normalized features.
    plain, _ = reward(images, PROMPTS, [{}, {}])
    expected = (reference["image"] * reference["text"]).sum(-1)
    torch.testing.assert_close(plain, expected, atol=2e-3, rtol=0)
    leaf = images.clone().requires_grad_(True)
    diff, _ = reward(leaf, PROMPTS, [{}, {}])
    torch.testing.assert_close(diff.detach(), plain, atol=1e-6, rtol=1e-6)
    diff.sum().backward()
    assert leaf.grad.abs().sum() > 0

    # The HPSv2 tower as a critic backbone.
    from tdpo.backbones import load_image_embedder

    embedder = load_image_embedder(f"open_clip:tiny:{tmp_path / 'ckpt.pt'}")
    assert embedder.embed_dim == 16
    torch.testing.assert_close(embedder(images), scorer.image_features(scorer.pixels(images)))


BLIP_TINY = dict(
    image_size=32,
    patch=8,
    vision_width=128,
    vision_depth=2,
    vision_heads=2,
    vocab=14,
    hidden=128,
    text_heads=2,
    text_layers=2,
    max_positions=40,
)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """A tiny ImageReward.pt with the original names (random weights) and a BERT tokenizer."""
    from transformers import BertTokenizer

    from tests.imagereward_reference import ImageReward

    folder = tmp_path_factory.mktemp("imagereward")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "cat",
        "photo",
        "of",
        "dog",
        "on",
        "beach",
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "tokenizer")
    torch.manual_seed(4)
    reference = ImageReward(**BLIP_TINY).eval()
    torch.save(reference.state_dict(), folder / "ImageReward.pt")
    return folder, reference


def test_imagereward_conversion_matches_its_own_forward(imagereward_files):
    folder, reference = imagereward_files
    reward = hub.imagereward(
        checkpoint=str(folder / "ImageReward.pt"), tokenizer=str(folder / "tokenizer")
    )
    images = _smooth_images(2, 40, 59, seed=5)  # resized to 32x47: a centre crop at offset 7.5
    # Preprocessing: our torch path vs ImageReward's PIL transform (written out independently).
    pixels = _torchvision_eval_transform(images, 32)
    pixel_diff = (reward.pixels(images) - pixels).abs() * torch.tensor(OPENAI_CLIP_STD).view(
        1, 3, 1, 1
    )
    assert pixel_diff.max().item() < PIXEL_ATOL
    # Model: the converted transformers BLIP equals ImageReward's forward on the same inputs.
    tokens = reward.tokenizer(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    assert (
        tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum()
    )  # padding is masked
    with torch.no_grad():
        expected = reference(pixels, tokens["input_ids"], tokens["attention_mask"])
        ours = reward.model(pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (expected[0] - expected[1]).abs() > 1e-3  # the two prompts/images score differently
    # The reward (torch preprocessing) against the reference score, and its differentiable path.
    scores = _check_reward(reward, images, score_atol=2e-3)
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=0)


def test_imagereward_rejects_a_foreign_checkpoint(imagereward_files, tmp_path):
    folder, _ = imagereward_files
    torch.save({"layers.0.weight": torch.zeros(4, 16)}, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="not an ImageReward checkpoint") as info:
        hub.imagereward(checkpoint=str(tmp_path / "bad.pt"), tokenizer=str(folder / "tokenizer"))
    assert "\n" not in str(info.value)
    state = torch.load(folder / "ImageReward.pt")
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "truncated.pt")
    with pytest.raises(UsageError, match="1 missing"):
        hub.imagereward(
            checkpoint=str(tmp_path / "truncated.pt"), tokenizer=str(folder / "tokenizer")
        )
