"""Checkpoints: round trip, pruning, corruption detection, temporaries, weights-only loading."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tdpo.checkpoint import (
    _sha256,
    capture_rng_state,
    config_hash,
    list_checkpoints,
    load_latest_checkpoint,
    read_manifest,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from tdpo.errors import UsageError
from tdpo.prompts import PromptSampler


def _training_state(epoch: int) -> dict:
    torch.manual_seed(epoch)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": PromptSampler(["a", "b", "c"], seed=epoch).state_dict(),
        "rng": capture_rng_state(),
        "notes": {"name": "run", "history": [1.5, None, True]},
    }


def _log_lines() -> tuple[list[str], Callable[[str], None]]:
    lines: list[str] = []
    return lines, lines.append


def _assert_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip_with_optimizer_and_rng(tmp_path: Path) -> None:
    state = _training_state(3)
    path = save_checkpoint(tmp_path, 3, state, keep=2, config_hash="abc123")
    assert path == tmp_path / "checkpoints" / "epoch_000003"
    assert verify_checkpoint(path) is None
    manifest = read_manifest(path)
    assert (
        manifest["format"] == 1 and manifest["epoch"] == 3 and manifest["config_hash"] == "abc123"
    )
    assert manifest["files"]["state.pt"]["bytes"] == (path / "state.pt").stat().st_size

    # Draw after capturing, then restore the loaded state: the same numbers come out again.
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.random(), np.random.rand(7), torch.rand(5)  # move every generator on
    lines, log = _log_lines()
    loaded_path, loaded = load_latest_checkpoint(tmp_path, log=log)
    assert loaded_path == path and lines == []
    _assert_equal(state, loaded)
    restore_rng_state(loaded["rng"])
    assert random.random() == expected[0]
    assert np.random.rand(3).tolist() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    sampler = PromptSampler(["a", "b", "c"], seed=0)
    sampler.load_state_dict(loaded["sampler"])
    assert sampler.sample(10) == PromptSampler(["a", "b", "c"], seed=3).sample(10)


def test_keep_last_k_and_replace_same_epoch(tmp_path: Path) -> None:
    for epoch in range(5):
        save_checkpoint(tmp_path, epoch, {"x": torch.tensor([epoch])}, keep=2, config_hash="h")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_000003", "epoch_000004"]
    save_checkpoint(tmp_path, 4, {"x": torch.tensor([40])}, keep=2, config_hash="h")
    _, state = load_latest_checkpoint(tmp_path)
    assert state["x"].item() == 40
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_000003",
        "epoch_000004",
    ]


def test_saving_an_earlier_epoch_drops_the_abandoned_later_ones(tmp_path: Path) -> None:
    for epoch in (2, 4):
        save_checkpoint(tmp_path, epoch, {"x": torch.tensor([epoch])}, keep=3, config_hash="h")
    save_checkpoint(tmp_path, 3, {"x": torch.tensor([3])}, keep=3, config_hash="h")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_000002", "epoch_000003"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("truncate", "size mismatch in state.pt"), ("flip", "sha256 mismatch in state.pt")],
)
def test_corrupt_latest_falls_back_with_one_log_line(
    tmp_path: Path, damage: str, reason: str
) -> None:
    for epoch in (2, 4):
        save_checkpoint(tmp_path, epoch, {"x": torch.arange(100) + epoch}, keep=3, config_hash="h")
    state_file = tmp_path / "checkpoints" / "epoch_000004" / "state.pt"
    data = bytearray(state_file.read_bytes())
    if damage == "truncate":
        state_file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        state_file.write_bytes(bytes(data))
    assert reason in verify_checkpoint(state_file.parent)

    lines, log = _log_lines()
    path, state = load_latest_checkpoint(tmp_path, log=log)
    assert path.name == "epoch_000002"
    assert torch.equal(state["x"], torch.arange(100) + 2)
    assert len(lines) == 1
    assert lines[0].startswith(f"checkpoint epoch_000004 is corrupt ({reason}")
    assert lines[0].endswith("); using epoch_000002")


def test_all_corrupt_is_an_error_and_none_means_fresh(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, keep=1, config_hash="h")
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="epoch_000001 is corrupt"):
        load_latest_checkpoint(tmp_path, log=lambda line: None)


def test_leftover_temporaries_are_ignored_then_cleaned(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, keep=3, config_hash="h")
    stale = tmp_path / "checkpoints" / ".tmp-epoch_000002-99999"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half written")
    no_manifest = tmp_path / "checkpoints" / "epoch_000005"  # not ours, not complete
    no_manifest.mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_000001"]
    assert load_latest_checkpoint(tmp_path)[0].name == "epoch_000001"
    save_checkpoint(tmp_path, 2, {"x": torch.ones(2)}, keep=3, config_hash="h")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_000001",
        "epoch_000002",
    ]


class _Sneaky:
    ran = False

    def __reduce__(self) -> tuple:
        return (_Sneaky._run, ())

    @staticmethod
    def _run() -> str:
        _Sneaky.ran = True
        return "ran"


def test_arbitrary_objects_are_refused_at_save_and_never_unpickled(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="_Sneaky"):
        save_checkpoint(tmp_path, 1, {"bad": [_Sneaky()]}, keep=1, config_hash="h")
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path, 1, {"bad": np.zeros(2)}, keep=1, config_hash="h")
    assert list_checkpoints(tmp_path) == []

    # A checkpoint forged with a valid manifest but a pickled object: skipped, never executed.
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, keep=3, config_hash="h")
    forged = tmp_path / "checkpoints" / "epoch_000002"
    forged.mkdir()
    torch.save({"bad": _Sneaky()}, forged / "state.pt")
    _Sneaky.ran = False
    manifest = {
        "format": 1,
        "epoch": 2,
        "config_hash": "h",
        "files": {
            "state.pt": {
                "sha256": _sha256(forged / "state.pt"),
                "bytes": os.path.getsize(forged / "state.pt"),
            }
        },
    }
    (forged / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(forged) is None
    lines, log = _log_lines()
    path, _ = load_latest_checkpoint(tmp_path, log=log)
    assert path.name == "epoch_000001" and not _Sneaky.ran
    assert len(lines) == 1 and "does not load weights-only" in lines[0]


def test_config_hash_is_order_independent() -> None:
    a = config_hash({"lr": 1e-4, "model": {"steps": 20, "eta": 1.0}})
    b = config_hash({"model": {"eta": 1.0, "steps": 20}, "lr": 1e-4})
    assert a == b and len(a) == 16
    assert config_hash({"lr": 2e-4}) != a


def test_a_run_written_before_a_key_was_added_keeps_its_hash(tmp_path):
    """A run's config.yaml from an earlier version lacks the keys added since (ADDED_KEYS); its
    checkpoints hashed the keys it had, so the resume check must hash those same keys."""
    import yaml

    from tdpo.config import (
        RESUME_MUTABLE_PREFIXES,
        build_config,
        flatten,
        run_hash,
        saved_keys,
        to_dict,
    )
    from tdpo.run import resume_config

    old = to_dict(build_config())
    del old["critic"]["decoder"], old["critic"]["tiny_decoder"]  # added after this "run"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    hashed_then = config_hash(
        {k: v for k, v in flatten(old).items() if not k.startswith(RESUME_MUTABLE_PREFIXES)}
    )
    config = resume_config(tmp_path)
    assert config.critic.decoder == "vae"  # the added key holds the old behaviour
    assert run_hash(config, saved_keys(tmp_path)) == hashed_then
    assert run_hash(config) != hashed_then  # all of today's keys: the old run would be refused
