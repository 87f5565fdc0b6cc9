"""Run logging: metrics.jsonl, real TensorBoard events, W&B through a stand-in module."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tdpo.errors import UsageError
from tdpo.images import save_grid
from tdpo.tracking import RunLogger, read_metrics, truncate_metrics


def test_log_writes_flat_json_lines_and_tensorboard(tmp_path: Path) -> None:
    with RunLogger(tmp_path, config={"lr": 1e-4}) as logger:
        logger.log(
            {"reward_mean": 1.5, "loss": torch.tensor(0.25), "kl": np.float32(0.125)}, step=1
        )
        logger.log(
            {"reward_mean": float("nan"), "grad_norm": float("inf"), "phase": "eval"}, step=2
        )
        logger.log({"epoch": 7, "reward_mean": 3}, step=3)
        grid = save_grid(torch.rand(2, 3, 8, 8), ["a", "b"], tmp_path / "samples" / "g.png")
        logger.log_image("samples", grid, step=3)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first == {"reward_mean": 1.5, "loss": 0.25, "kl": 0.125, "epoch": 1}
    second = json.loads(lines[1])  # strict JSON: NaN/inf became null
    assert second["reward_mean"] is None and second["grad_norm"] is None
    assert second["phase"] == "eval" and second["epoch"] == 2
    assert read_metrics(tmp_path)[2] == {"epoch": 7, "reward_mean": 3}

    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert "reward_mean" in accumulator.Tags()["scalars"]
    assert "epoch" not in accumulator.Tags()["scalars"]
    scalars = accumulator.Scalars("reward_mean")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert scalars[0].value == pytest.approx(1.5)
    assert "samples" in accumulator.Tags()["images"]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    logger = RunLogger(run, enabled=False)
    logger.log({"a": 1.0}, step=0)
    logger.log_image("x", tmp_path / "missing.png", step=0)
    logger.close()
    assert not run.exists()


def test_non_scalar_metric_is_refused(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(TypeError, match="scalar"):
        logger.log({"hist": torch.ones(3)}, step=0)
    with pytest.raises(TypeError, match="flat"):
        logger.log({"nested": {"a": 1}}, step=0)
    logger.close()


def test_truncate_and_partial_last_line(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch in range(6):
        logger.log({"reward": float(epoch)}, step=epoch)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 6, "rew')  # a crash mid-write
    assert [r["epoch"] for r in read_metrics(tmp_path)] == list(range(6))
    truncate_metrics(tmp_path, last_epoch=3)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    truncate_metrics(tmp_path / "nowhere", last_epoch=0)  # no file: nothing to do


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(tmp_path)


def test_wandb_missing_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UsageError, match=r"pip install tdpo\[wandb\]"):
        RunLogger(tmp_path, tensorboard=False, wandb=True)


def test_wandb_receives_metrics_and_keeps_run_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda data, step: calls.append(("log", data, step))
    fake.finish = lambda: calls.append(("finish",))
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        logger = RunLogger(tmp_path, tensorboard=False, wandb=True, config={"seed": 1})
        logger.log({"reward": 2.0, "phase": "train"}, step=4)
        logger.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["project"] == "tdpo"
    assert ("log", {"reward": 2.0}, 4) in calls
    assert calls[-1] == ("finish",)
