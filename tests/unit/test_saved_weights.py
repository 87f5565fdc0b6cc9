"""What a run's final/ holds and the words for it (the trainer's closing line)."""

from __future__ import annotations

import pytest

from tdpo.errors import UsageError
from tdpo.results import check_saved_weights, describe_saved, saved_weights


def test_lora_full_unet_full_transformer_and_nothing(tmp_path):
    lora, unet, transformer, empty = (tmp_path / n for n in ("lora", "unet", "tr", "empty"))
    (lora).mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (unet / "unet").mkdir(parents=True)
    (unet / "unet" / "config.json").write_text("{}")
    (transformer / "transformer").mkdir(parents=True)
    (transformer / "transformer" / "config.json").write_text("{}")
    empty.mkdir()
    assert [saved_weights(f) for f in (lora, unet, transformer, empty)] == [
        "lora",
        "unet",
        "transformer",
        None,
    ]
    assert describe_saved(lora) == f"LoRA in {lora}"
    assert describe_saved(unet) == f"fine-tuned UNet in {unet / 'unet'}"
    assert describe_saved(transformer) == f"fine-tuned transformer in {transformer / 'transformer'}"
    with pytest.raises(UsageError) as info:
        check_saved_weights(empty, "--lora", "x")
    assert info.value.field == "--lora" and "transformer/" in info.value.fix
