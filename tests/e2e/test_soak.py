"""Soak (slow, ``pytest -m slow tests/e2e/test_soak.py``): many short epochs in one process;
resident memory stays flat (the last third of the epochs against the first third, after a
warm-up). A leak of tensors kept across epochs (trajectories, graphs, metrics history, optimizer
state) shows up as RSS growing with the epoch count. Epoch times are printed, not asserted: on
a shared machine they measure the load as much as the code."""

from __future__ import annotations

import statistics

import pytest

EPOCHS = 30
WARMUP = 3
RSS_GROWTH_MB = 64  # allowed growth of the median RSS, last third vs first third


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_memory_stays_flat(make_trainer, tmp_path):
    samples: list[tuple[float, float]] = []  # (rss MB, epoch seconds) after each epoch

    def log(message: str) -> None:
        if message.startswith("epoch "):
            seconds = float(message.rsplit("|", 1)[1].strip().rstrip("s"))
            samples.append((rss_mb(), seconds))

    trainer = make_trainer(
        run_dir=tmp_path / "soak",
        log=log,
        run_name="soak",
        output_dir=str(tmp_path),
        **{
            "reward.panel": ["jpeg_incompressibility"],
            "train.batch_size": 4,
            "train.epochs": EPOCHS,
            "reset.every": 2,
            "log.grid_every": 5,
            "checkpoint.keep": 2,
        },
    )
    assert trainer.train() == 0
    assert len(samples) == EPOCHS
    steady = samples[WARMUP:]
    third = len(steady) // 3
    first, last = steady[:third], steady[-third:]
    rss_first = statistics.median(r for r, _ in first)
    rss_last = statistics.median(r for r, _ in last)
    t_first = statistics.median(t for _, t in first)
    t_last = statistics.median(t for _, t in last)
    print(
        f"RSS {rss_first:.0f} -> {rss_last:.0f} MB; epoch {t_first:.2f} -> {t_last:.2f} s "
        f"(first vs last third of {len(steady)} epochs after {WARMUP} warm-up)"
    )
    assert rss_last - rss_first < RSS_GROWTH_MB
