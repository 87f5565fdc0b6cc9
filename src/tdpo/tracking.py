"""Run logging: ``metrics.jsonl`` always, TensorBoard by default, Weights & Biases on request.

``metrics.jsonl`` is the contract: one flat JSON object a line, each with an ``epoch`` key,
flushed and fsynced as it is written, so a crash loses at most the line being written.
Non-finite numbers are written as ``null`` (JSON has no NaN). On resume,
:func:`truncate_metrics` drops lines logged after the checkpoint the run resumes from.

(Named ``tracking`` rather than ``logging`` so that it never shadows the standard library.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdpo.errors import UsageError
from tdpo.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
_WANDB_ID_FILE = ".wandb_run_id"


def _unwrap(key: str, value: Any) -> Any:
    """A Python scalar from a tensor / numpy scalar; anything else unchanged."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError) as error:
            raise TypeError(f"metric {key!r} is not a scalar: {error}") from None
    return value


def _json_value(key: str, value: Any) -> float | int | str | bool | None:
    """A JSON-able scalar, NaN and inf as None."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log flat scalars only")


class RunLogger:
    """Write metrics and images of one run; with ``enabled=False`` every method does nothing."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "tdpo",
        config: dict | None = None,
        enabled: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb:
            self._wandb = _init_wandb(self.run_dir, wandb_project, config)
        if tensorboard:
            # deferred: torch; tdpo.report imports this module at CLI start-up
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir))
            if config is not None:
                text = json.dumps(config, indent=2, sort_keys=True, default=str)
                self._writer.add_text("config", "```\n" + text + "\n```", 0)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append one JSON line (``epoch`` = ``step`` unless given) and the scalars to TB/W&B."""
        if not self.enabled:
            return
        record: dict[str, Any] = {}
        scalars: dict[str, float] = {}  # for TensorBoard / W&B, NaN kept as NaN
        for k, v in metrics.items():
            key = str(k)
            value = _unwrap(key, v)
            record[key] = _json_value(key, value)
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[key] = float(value)
        record.setdefault("epoch", step)
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Add a PNG (e.g. a sample grid) to TensorBoard and W&B."""
        if not self.enabled:
            return
        if self._writer is not None:
            # deferred: tdpo.report imports this module at CLI start-up
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            self._writer.add_image(tag, array, global_step=step, dataformats="HWC")
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        """Flush and close TensorBoard and W&B."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_wandb(run_dir: Path, project: str, config: dict | None) -> Any:
    try:
        import wandb  # deferred: optional, and slow to import
    except ImportError:
        raise UsageError(
            "log.wandb", True, "wandb is not installed; pip install tdpo[wandb]"
        ) from None
    # Keep the W&B run id in the run directory, so that a resumed run continues the same chart.
    id_file = run_dir / _WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not run_id:
        run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
        id_file.write_text(run_id + "\n")
    wandb.init(
        project=project,
        config=config,
        dir=str(run_dir),
        name=run_dir.name,
        id=run_id,
        resume="allow",
    )
    return wandb


def read_metrics(run_dir: Path) -> list[dict]:
    """Parse ``metrics.jsonl``; an unfinished last line (a crash mid-write) is ignored. A line
    that is not a JSON object (or not UTF-8), or whose ``epoch`` is missing or not an integer,
    raises ValueError naming the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(lines):  # no trailing newline: the write was cut short
                break
            why = "not UTF-8" if isinstance(error, UnicodeDecodeError) else str(error)
            raise ValueError(f"{path}:{number}: not a JSON line ({why})") from None
        except RecursionError:
            raise ValueError(f"{path}:{number}: not a JSON line (nested too deeply)") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number}: a JSON {type(record).__name__}, not an object of metrics"
            )
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"{path}:{number}: epoch {epoch!r} is not an integer")
        records.append(record)
    return records


def check_metrics(run_dir: Path, field: str = "--resume") -> None:
    """UsageError when ``metrics.jsonl`` cannot be read (a line that is not a JSON object, not
    UTF-8, or has a non-integer epoch): checked before a resume loads anything."""
    try:
        read_metrics(run_dir)
    except ValueError as error:
        raise UsageError(
            field,
            str(run_dir),
            f"{error}; fix or delete that line of {METRICS_FILE} (nothing was changed)",
        ) from None
    except OSError as error:
        raise UsageError(
            field, str(run_dir), f"cannot read {METRICS_FILE} ({error.strerror or error})"
        ) from None


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop lines with ``epoch > last_epoch`` (and an unfinished last line), atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("epoch") is None or r["epoch"] <= last_epoch]

    def write(f) -> None:
        for record in kept:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    atomic_write(path, write)
