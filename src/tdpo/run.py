"""The library entry point of training: ``tdpo.train(config, run_dir)``.

Used by ``tdpo train``, ``tdpo sweep`` and Python users alike::

    import tdpo
    config = tdpo.build_config(preset="tdpo-r", overrides={"train.epochs": 4})
    tdpo.train(config)                      # a new run under config.output_dir
    tdpo.train(tdpo.resume_config("runs/x"), "runs/x", resume=True)

:func:`check_run` is the one resolve step that checks a run before anything loads: the schedule,
the run folder (or its checkpoints when resuming), the pipeline path, the prompts and every reward
name.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdpo.checkpoint import check_resume, list_checkpoints
from tdpo.config import (
    RESUME_MUTABLE_PREFIXES,
    Config,
    build_config,
    load_yaml,
    resolve_schedule,
    run_hash,
    write_run_config,
)
from tdpo.console import log_line, quiet_libraries
from tdpo.errors import UsageError
from tdpo.paths import check_pipeline_path
from tdpo.prompts import load_prompts
from tdpo.rewards import check_reward_name
from tdpo.rewards.spec import check_factory_modules
from tdpo.rundir import CHECKPOINTS_DIR, CONFIG_FILE, FINAL_DIR, METRICS_FILE, check_new_run_dir
from tdpo.tracking import truncate_metrics


def num_processes() -> int:
    """Processes of this launch (``accelerate launch`` sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def default_run_dir(config: Config, label: str | None = None) -> Path:
    """``output_dir/run_name``, or ``output_dir/<label>-<timestamp>`` without a run name."""
    name = config.run_name or f"{label or config.train.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """A run's own config (its config.yaml) with the overrides a resume may change."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError("--resume", str(run_dir), "not a run directory (no config.yaml)")
    for key, value in (overrides or {}).items():
        if not key.startswith(RESUME_MUTABLE_PREFIXES):
            raise UsageError(
                key,
                value,
                "cannot change on resume (only train.epochs, "
                "log.* and checkpoint.*); start a new run instead",
            )
    return build_config(base=load_yaml(run_dir / CONFIG_FILE, "--resume"), overrides=overrides)


def check_run(config: Config, run_dir: Path, resume: bool) -> None:
    """Every check of a run that loads no model, cheapest first (UsageError on the first fail)."""
    resolve_schedule(config, num_processes())
    if resume:
        check_resume(run_dir, run_hash(config), num_processes())
    else:
        check_new_run_dir(run_dir)
    check_pipeline_path(config.model.pretrained)
    load_prompts(config.prompts.train)
    names = [("reward.name", config.reward.name)]
    names += [(f"reward.panel[{i}]", n) for i, n in enumerate(config.reward.panel)]
    names += [(f"eval.rewards[{i}]", n) for i, n in enumerate(config.eval.rewards)]
    for field, name in names:
        check_factory_modules(name, field)
    for field, name in names:
        check_reward_name(name, field=field)


def _has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / CHECKPOINTS_DIR
    started = folder.is_dir() and any(p.name.startswith("epoch_") for p in folder.iterdir())
    return bool(list_checkpoints(run_dir)) or started


def train(
    config: Config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = log_line,
    quiet: bool = False,
) -> int:
    """Train (or resume) one run; returns the exit code: 0, or 128 + signal number when stopped
    by SIGINT/SIGTERM (the run resumes from its last checkpoint). Raises UsageError for a bad
    config or folder, TrainingError when training cannot go on. ``quiet`` silences the
    libraries' loading logs and progress bars (as the CLI does)."""
    from tdpo.trainers.loop import Trainer  # deferred: loads torch, diffusers, accelerate

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    check_run(config, run_dir, resume)
    if resume and not _has_checkpoint(run_dir):
        # Killed before its first checkpoint: nothing to restore, so start it over.
        if is_main_process():
            truncate_metrics(run_dir, 0)
            log(f"no checkpoint in {run_dir} yet; starting it from epoch 0")
        resume = False
    fresh = not resume and is_main_process()
    if fresh:  # before the models load: a run killed while loading can be resumed
        write_run_config(config, run_dir)
    if quiet:
        quiet_libraries(load=True)
    try:
        trainer = Trainer(config, run_dir, resume=resume, log=log)
    except UsageError:
        if fresh:  # e.g. a Hub id that cannot load: leave no half-made run behind
            (run_dir / CONFIG_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    if trainer.is_main:
        log(f"run directory: {run_dir}")
    code = trainer.train()
    if trainer.is_main and code == 0:
        log(f"done: {run_dir} (LoRA in {run_dir / FINAL_DIR}, metrics in {run_dir / METRICS_FILE})")
    return code
