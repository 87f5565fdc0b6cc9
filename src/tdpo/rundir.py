"""The run directory, the user-facing contract of a training run (README, "The run directory"):
the names of its parts, in one place, and the checks made before a run writes into a folder.

    runs/<name>/
      config.yaml     the full resolved config (what --resume reads)
      metrics.jsonl   one JSON object per epoch (and per evaluation)
      samples/        image grids
      checkpoints/    resumable state, written atomically
      final/          LoRA weights in diffusers format (and the critic head)
      best/           the best LoRA by eval.monitor
      report/         `tdpo report` output
"""

from __future__ import annotations

import os
from pathlib import Path

from tdpo.errors import UsageError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
BEST_DIR = "best"
REPORT_DIR = "report"


def is_run_dir(path: Path) -> bool:
    """A folder that a run has written (its config.yaml)."""
    return (Path(path) / CONFIG_FILE).is_file()


def has_started(run_dir: Path) -> bool:
    """The run has trained or evaluated at least once (metrics or checkpoints exist)."""
    return (run_dir / CHECKPOINTS_DIR).exists() or (run_dir / METRICS_FILE).exists()


def check_new_run_dir(run_dir: Path) -> None:
    """A new run must not reuse a folder holding another run; the folder must be creatable and
    writable (checked without writing anything)."""
    if has_started(run_dir):
        raise UsageError(
            "run_name",
            run_dir.name,
            f"{run_dir} already holds a run; resume it "
            "with --resume, or choose another --set run_name=...",
        )
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # e.g. output_dir=/etc/hostname/x: a regular file in the path
        raise UsageError(
            "output_dir",
            str(run_dir.parent),
            f"{parent} is a file, not a folder; choose another --output-dir",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            "output_dir", str(run_dir.parent), "not writable; choose another --output-dir"
        )
