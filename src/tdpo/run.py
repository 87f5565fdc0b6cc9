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
import importlib.util
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
    saved_keys,
    write_run_config,
)
from tdpo.console import log_line, quiet_libraries
from tdpo.errors import UsageError
from tdpo.paths import check_pipeline_path
from tdpo.prompts import load_prompts, prompt_set_specs
from tdpo.results import describe_saved
from tdpo.rewards import check_reward_name
from tdpo.rewards.spec import check_factory_modules
from tdpo.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    LOCK_FILE,
    METRICS_FILE,
    REPORT_DIR,
    RunLock,
    check_new_run_dir,
    check_not_locked,
)
from tdpo.tracking import check_metrics, truncate_metrics


def num_processes() -> int:
    """Processes of this launch (``accelerate launch`` sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def default_run_dir(config: Config, label: str | None = None) -> Path:
    """``output_dir/run_name``, or without a run name ``output_dir/<name>-<timestamp>``: the
    method (``tdpo-r``, ``tdpo``, ``ddpo-2``, ``grpo``, ``alignprop``), after the presets'
    ``label`` when that does not already end with it (``sd14-aesthetic-tdpo-r``)."""
    if config.run_name:
        return Path(config.output_dir).expanduser() / config.run_name
    method = method_slug(config)
    if not label:
        name = method
    elif label == method or label.endswith(f"-{method}") or _ends_with_method_preset(label, config):
        name = label
    else:
        name = f"{label}-{method}"
    return Path(config.output_dir).expanduser() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ends_with_method_preset(label: str, config: Config) -> bool:
    """The presets' label ends with a method preset of the run's algorithm (``ddpo-100``)."""
    from tdpo.config import ALGORITHM_PRESETS

    return any(
        (label == name or label.endswith(f"-{name}"))
        and preset.get("train.algorithm") == config.train.algorithm
        for name, preset in ALGORITHM_PRESETS.items()
    )


def method_slug(config: Config) -> str:
    """The run's method as a folder name: TDPO-R -> tdpo-r, DDPO-2 -> ddpo-2."""
    from tdpo.config import method_label  # deferred: the method registry

    label = method_label(config).split(" (", 1)[0].strip().lower()
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label) or "run"


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """A run's own config (its config.yaml) with the overrides a resume may change."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError("--resume", str(run_dir), "not a run directory (no config.yaml)")
    for key, value in (overrides or {}).items():
        if not key.startswith(RESUME_MUTABLE_PREFIXES):
            mutable = ", ".join(p + "*" if p.endswith(".") else p for p in RESUME_MUTABLE_PREFIXES)
            raise UsageError(
                key,
                value,
                f"cannot change on resume (only {mutable}); start a new run instead",
            )
    return build_config(base=load_yaml(run_dir / CONFIG_FILE, "--resume"), overrides=overrides)


def check_run(config: Config, run_dir: Path, resume: bool) -> None:
    """Every check of a run that loads no model, cheapest first (UsageError on the first fail):
    the last two import torch (the algorithm's schedule rule, the reward registry)."""
    check_run_dir(config, run_dir, resume)
    check_pipeline_path(config.model.pretrained)
    load_prompts(config.prompts.train)
    if config.eval.every:
        for label, source in prompt_set_specs(config.eval.prompt_sets):
            load_prompts(source, f"eval.prompt_sets ({label})")
    if config.log.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError(
            "log.wandb", True, "wandb is not installed; pip install tdpo[wandb], or drop log.wandb"
        )
    names = [("reward.name", config.reward.name)]
    names += [(f"reward.panel[{i}]", n) for i, n in enumerate(config.reward.panel)]
    names += [(f"eval.rewards[{i}]", n) for i, n in enumerate(config.eval.rewards)]
    for field, name in names:
        check_factory_modules(name, field)
    resolve_schedule(config, num_processes())  # the algorithm's own rule imports torch
    for field, name in names:
        check_reward_name(name, field=field)  # the reward registry imports torch
    check_hub_sources(config, names)


def check_hub_sources(config: Config, names: list[tuple[str, str]]) -> None:
    """Offline or without a network: the Hub models of the run (its pipeline, its rewards, the
    critic's backbone when the method embeds images) are in the local cache or local folders,
    checked at once (no download, no retries)."""
    from tdpo.backbones.sources import (  # deferred: huggingface_hub
        check_backbone_available,
        check_pipeline_available,
    )
    from tdpo.methods import get_method
    from tdpo.paths import resolve_alias
    from tdpo.rewards.hub import check_reward_sources

    model = resolve_alias(config.model.pretrained)
    check_pipeline_available(model, config.model.revision, "model.pretrained")
    for field, name in names:
        check_reward_sources(name, field)
    if get_method(config.train.algorithm).uses_critic and config.critic.input in ("image", "x0"):
        check_backbone_available(resolve_alias(config.critic.backbone), "critic.backbone")


def check_run_dir(config: Config, run_dir: Path, resume: bool, probe_lock: bool = True) -> None:
    """The run folder: no other process writes it; a new run goes into a new or empty folder; a
    resumed one has a matching checkpoint manifest (if any) and readable metrics.
    ``probe_lock=False`` when this process holds the lock. Under accelerate only the main
    process checks the folder and the lock: the others start while it creates and locks it."""
    if not is_main_process():
        if resume:
            check_resume(run_dir, run_hash(config, saved_keys(run_dir)), num_processes())
        return
    if not resume:
        check_new_run_dir(run_dir, probe_lock)
        return
    if probe_lock:
        check_not_locked(run_dir, "--resume")
    check_resume(run_dir, run_hash(config, saved_keys(run_dir)), num_processes())
    check_metrics(run_dir, "--resume")


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
    libraries' loading logs and progress bars (as the CLI does).

    The main process holds the run directory's lock (:class:`tdpo.rundir.RunLock`) from before
    anything is written until it returns: a second writer is refused with the holder's PID."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    check_run(config, run_dir, resume)
    from tdpo.trainers.loop import Trainer  # deferred: loads torch, diffusers, accelerate

    main = is_main_process()
    lock = RunLock(run_dir).acquire("--resume" if resume else "run_name") if main else None
    wrote_config = False  # a new run's config.yaml, written by this call
    remove = False
    try:
        if main:  # again under the lock: another process may have written the folder meanwhile
            check_run_dir(config, run_dir, resume, probe_lock=False)
        if resume and not _has_checkpoint(run_dir):
            # Killed before its first checkpoint: nothing to restore, so start it over (its
            # metrics too: the base evaluation of epoch 0 runs again).
            if main:
                truncate_metrics(run_dir, -1)
                log(f"no checkpoint in {run_dir} yet; starting it from epoch 0")
            resume = False
        if not resume and main:  # before the models load: a run killed while loading resumes
            write_run_config(config, run_dir)
            wrote_config = True
        if quiet:
            quiet_libraries(load=True)
        trainer = Trainer(config, run_dir, resume=resume, log=log)
        if trainer.is_main:
            log(f"run directory: {run_dir}")
        code = trainer.train()
    except UsageError:
        # e.g. a Hub id that cannot load, a reward that returns the wrong type: a new run that
        # logged nothing leaves no half-made run behind.
        remove = wrote_config and not _started(run_dir) and _remove_unstarted(run_dir)
        raise
    finally:
        if lock is not None:
            lock.release(remove=remove)
            if remove:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
    if trainer.is_main and code == 0:
        if resume:
            refresh_report(run_dir, log)
        saved = describe_saved(run_dir / FINAL_DIR)
        log(f"done: {run_dir} ({saved}, metrics in {run_dir / METRICS_FILE})")
    return code


def refresh_report(run_dir: Path, log: Callable[[str], None] = log_line) -> None:
    """After a resume: rewrite the run's report (``RUN/report``, if ``tdpo report`` wrote one)
    so that it shows the new epochs; if it cannot, say how to."""
    report = run_dir / REPORT_DIR
    if not (report / "index.html").is_file():
        return
    from tdpo.report import build_report  # deferred: matplotlib

    try:
        build_report([run_dir], report, log=lambda _line: None)
    except (UsageError, OSError, ValueError) as error:
        first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        log(
            f"the report in {report} predates this resume and could not be refreshed ({first}); "
            f"refresh it with: tdpo report {run_dir}"
        )
        return
    log(f"report refreshed with the resumed epochs: {report / 'index.html'}")


def _started(run_dir: Path) -> bool:
    """A metrics row or a checkpoint exists (a resume would find something)."""
    metrics = run_dir / METRICS_FILE
    has_rows = metrics.is_file() and metrics.stat().st_size > 0
    return has_rows or (run_dir / CHECKPOINTS_DIR).exists()


def _remove_unstarted(run_dir: Path) -> bool:
    """Delete what a new run wrote before its first metrics row (its config.yaml, an empty
    metrics.jsonl, TensorBoard files) if that is all the folder holds; True if it did (the lock
    and the folder go next)."""
    entries = list(run_dir.iterdir())
    ours = [
        p
        for p in entries
        if p.is_file()
        and not p.is_symlink()
        and (p.name in (CONFIG_FILE, METRICS_FILE) or p.name.startswith("events.out.tfevents."))
    ]
    if len(ours) != len([p for p in entries if p.name != LOCK_FILE]):
        return False
    for path in ours:
        path.unlink()
    return True
