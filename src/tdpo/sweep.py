"""``tdpo sweep SPEC.yaml | --preset NAME [--out DIR] [--dry-run] [--shard i/n]``: a grid of
training runs (methods x seeds x training rewards), one after another in this process, then
``tdpo report`` over all of them.

A spec (YAML, or a preset from :data:`SWEEP_PRESETS`)::

    out: sweeps/mine                 # default of --out
    base_preset: shapes              # optional train preset under every method (null: none)
    overrides:                       # common overrides of every run (dotted config keys)
      model.pretrained: ./tiny-sd
      train.epochs: 20
    methods:                         # name -> a train preset plus overrides
      tdpo-r: {preset: tdpo-r}
      ddpo-2: {preset: ddpo-2, overrides: {train.updates_per_epoch: 2}}
    grid:                            # blocks of rewards x seeds (x an optional method subset)
      - {rewards: [shapes_aesthetic], seeds: [0, 1, 2]}
      - {rewards: [shapes_pickscore], seeds: [0], methods: [tdpo-r]}

(``rewards:`` and ``seeds:`` at the top level are a one-block grid.) A run's config is, in
order: defaults <- ``base_preset`` <- the method's preset <- ``overrides`` <- the method's
``overrides`` <- ``reward.name``, ``seed``, ``run_name``, ``output_dir`` (written to
``OUT/configs/<run>.yaml`` and given to ``tdpo train --config``). Each run lives in
``OUT/<method>-<reward>-s<seed>``; runs are ordered block, reward, seed, method, so the first
seed of every method finishes before the second starts.

Resumable: a run whose ``final/`` exists is skipped; a run with checkpoints but no ``final/``
is resumed with ``tdpo train --resume`` (``train.epochs`` from the spec, so raising it extends
finished-looking runs only if you delete their ``final/``); a run folder of ours with metrics
but no checkpoint (it died in its first epoch, or while loading) is moved aside to
``<run>.stale-N`` and restarted; a folder that is not a run of ours is never written. A
run that fails is logged and the sweep goes on with the next (exit code 1 at the end); a
signal (Ctrl-C, SIGTERM) stops the sweep after the running run has checkpointed (exit 130/143).
What ran is in ``OUT/sweep.json`` (``OUT/sweep-shard-<i>of<n>.json`` with ``--shard``) and
``OUT/sweep.log``. A method whose train preset does not exist (yet) is reported as
``unavailable`` and not tried.

Several machines or GPUs: ``--shard i/n`` (``0 <= i < n``) runs only every n-th run of the plan,
starting at the i-th, so n processes with the same spec and ``--out`` on a shared folder split
the grid without coordination; one GPU per process with ``CUDA_VISIBLE_DEVICES``::

    for i in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$i tdpo sweep --preset paper-shapes --out sweeps/paper \\
            --shard $i/4 --no-report > shard$i.log 2>&1 &
    done; wait
    tdpo sweep --preset paper-shapes --out sweeps/paper --report-only

On separate machines without a shared folder, copy the run folders into one ``OUT`` before
``--report-only``. Each shard's report covers every run of the plan found under ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdpo.checkpoint import list_checkpoints
from tdpo.claims import write_claims
from tdpo.config import (
    PAPER_CRITIC,
    PRESETS,
    Config,
    build_config,
    config_to_yaml,
    read_text_file,
    strict_yaml_load,
)
from tdpo.errors import StorageError, TrainingError, UsageError
from tdpo.fileio import atomic_write
from tdpo.report import build_report
from tdpo.run import resume_config, train
from tdpo.rundir import FINAL_DIR, METRICS_FILE, is_our_run
from tdpo.world import DEFAULT_STEPS

# ------------------------------------------------------------------------------- presets


def paper_shapes_spec() -> dict[str, Any]:
    """The paper's comparison in the shapes world: {DDPO-2, DDPO-100, TDPO, TDPO-R, AlignProp}
    x 3 seeds on ``shapes_aesthetic``, plus one seed of each on ``shapes_pickscore``.

    Edit the common ``overrides`` in one place. ``ddpo-100`` stands for "as many updates per
    epoch as TDPO makes" (2 per timestep slice): 100 at the paper's 50 steps, ``2 * num_steps``
    here, so its runs are labelled ``DDPO-<that number>`` in the report.
    """
    steps = DEFAULT_STEPS
    # The defaults of `tdpo train` are the shapes world (model, critic backbone, prompts, panel,
    # held-out evaluation); the sweep only shortens the runs to fit its CPU budget.
    overrides: dict[str, Any] = {
        "train.epochs": 8,
        "eval.every": 4,
        "cpu_threads": 1,
        "log.grid_every": 4,
    }
    return {
        "out": "sweeps/paper-shapes",
        "base_preset": "shapes",
        "overrides": overrides,
        "methods": {
            "ddpo-2": {"preset": "ddpo-2", "overrides": {}},
            "ddpo-100": {
                "preset": "ddpo-100",
                "overrides": {"train.updates_per_epoch": 2 * steps},
            },
            "tdpo": {"preset": "tdpo", "overrides": {}},
            "tdpo-r": {"preset": "tdpo-r", "overrides": {}},
            "alignprop": {"preset": "alignprop", "overrides": {}},
        },
        "grid": [
            {"rewards": ["shapes_aesthetic"], "seeds": [0, 1, 2]},
            {"rewards": ["shapes_pickscore"], "seeds": [0]},
        ],
    }


def mechanism_spec() -> dict[str, Any]:
    """Issue 11's experiment: does the temporal critic, and resetting its active neurons, change
    what fine-tuning does? {DDPO-2, DDPO-40, TDPO, TDPO-R, AlignProp, GRPO}, then the reset
    ablation (TDPO-R resetting dormant or all neurons; TDPO = never) and TDPO-R with the paper's
    critic, 5 seeds each on ``shapes_aesthetic``, 12 epochs (768 queries), held-out evaluation
    every 4 epochs; every method's seeds 0-2 come first in the plan. DDPO keeps its usual
    per-prompt normalization (its presets); the TDPO variants use the defaults (running
    normalization, the x0 + prompt critic with replay) unless named ``-paper``.
    """
    steps = DEFAULT_STEPS
    return {
        "out": "sweeps/mechanism",
        "base_preset": "shapes",
        "overrides": {
            "train.epochs": 12,
            "eval.every": 4,
            "cpu_threads": 1,
            "log.grid_every": 12,
            "log.critic_reference": True,
            # steps large enough for policy gradients to move this world within 12 epochs
            "train.learning_rate": 3e-3,
            "train.clip_range": 5e-2,
            "train.inner_epochs": 2,
        },
        "methods": {
            "ddpo-2": {"preset": "ddpo-2", "overrides": {}},
            "ddpo-40": {"preset": "ddpo-100", "overrides": {"train.updates_per_epoch": 2 * steps}},
            "tdpo": {"preset": "tdpo", "overrides": {}},
            "tdpo-r": {"preset": "tdpo-r", "overrides": {}},
            "tdpo-r-dormant": {"preset": "tdpo-r", "overrides": {"reset.target": "dormant"}},
            "tdpo-r-all": {"preset": "tdpo-r", "overrides": {"reset.target": "all"}},
            "tdpo-r-paper": {
                "preset": "tdpo-r",
                "overrides": {**PAPER_CRITIC, "log.critic_reference": True},
            },
            "alignprop": {"preset": "alignprop", "overrides": {}},
            "grpo": {"preset": "grpo", "overrides": {}},
        },
        "grid": [  # 3 seeds of everything first, then seeds 3 and 4: a partial sweep is usable
            {"rewards": ["shapes_aesthetic"], "seeds": seeds, "methods": methods}
            for seeds in ([0, 1, 2], [3, 4])
            for methods in (MECHANISM_MAIN, MECHANISM_ABLATION)
        ],
    }


MECHANISM_MAIN = ["ddpo-2", "ddpo-40", "tdpo", "tdpo-r", "alignprop", "grpo"]
MECHANISM_ABLATION = ["tdpo-r-dormant", "tdpo-r-all", "tdpo-r-paper"]

SWEEP_PRESETS = {"paper-shapes": paper_shapes_spec, "mechanism": mechanism_spec}


# ---------------------------------------------------------------------------------- plan


@dataclass
class PlannedRun:
    name: str
    method: str
    reward: str
    seed: int
    preset: str | None
    overrides: dict[str, Any]
    available: bool = True
    note: str = ""
    status: str = "pending"
    code: int | None = None
    seconds: float | None = None
    error: str | None = None
    attempts: list[str] = field(default_factory=list)
    method_overrides: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "reward": self.reward,
            "seed": self.seed,
            "preset": self.preset,
            "status": self.status,
            "code": self.code,
            "seconds": self.seconds,
            "error": self.error,
            "note": self.note,
            "overrides": self.overrides,
        }


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _check_mapping(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(name, value, "expected a mapping of dotted config keys to values")
    return value


def load_spec(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError("SPEC", path, "no such file; give a sweep YAML file or --preset NAME")
    text = read_text_file(file, "SPEC")  # UsageError for a file that is not UTF-8
    try:
        spec = strict_yaml_load(text)
    except yaml.YAMLError as error:
        why = getattr(error, "problem", None) or "not valid YAML"
        raise UsageError("SPEC", path, f"{why}; fix the file") from None
    if not isinstance(spec, dict):
        raise UsageError("SPEC", path, "must hold a mapping with methods, seeds and rewards")
    return spec


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def build_plan(spec: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the spec, in order (see the module docstring)."""
    methods = spec.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise UsageError("methods", methods, "name at least one method: {name: {preset: ...}}")
    common = _check_mapping(spec.get("overrides"), "overrides")
    base = spec.get("base_preset")
    if base is not None and base not in PRESETS:
        raise UsageError("base_preset", base, f"unknown train preset; one of {', '.join(PRESETS)}")
    grid = spec.get("grid")
    if grid is None:
        grid = [{"rewards": spec.get("rewards"), "seeds": spec.get("seeds")}]
    if not isinstance(grid, list):
        raise UsageError("grid", grid, "a list of {rewards: [...], seeds: [...]} blocks")
    plan: list[PlannedRun] = []
    names: set[str] = set()
    for b, block in enumerate(grid):
        if not isinstance(block, dict):
            raise UsageError(f"grid[{b}]", block, "a mapping {rewards: [...], seeds: [...]}")
        rewards = _as_list(block.get("rewards"), f"grid[{b}].rewards")
        seeds = _as_list(block.get("seeds", [0]), f"grid[{b}].seeds")
        chosen = _as_list(block.get("methods"), f"grid[{b}].methods") or list(methods)
        if not rewards:
            raise UsageError(f"grid[{b}].rewards", rewards, "name at least one training reward")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise UsageError(f"grid[{b}].seeds", seeds, "a list of integers")
        for m in chosen:
            if m not in methods:
                raise UsageError(f"grid[{b}].methods", m, f"not one of {', '.join(methods)}")
        for reward in rewards:
            for seed in seeds:
                for method in chosen:
                    entry = methods[method] or {}
                    if not isinstance(entry, dict):
                        raise UsageError(f"methods.{method}", entry, "{preset: NAME, overrides}")
                    preset = entry.get("preset")
                    merged: dict[str, Any] = {}
                    available, note = True, ""
                    for name in (base, preset):
                        if name is None:
                            continue
                        if name not in PRESETS:
                            available = False
                            note = f"train preset {name!r} does not exist (yet)"
                        else:
                            merged.update(PRESETS[name])
                    merged.update(copy.deepcopy(common))
                    merged.update(
                        copy.deepcopy(_check_mapping(entry.get("overrides"), f"methods.{method}"))
                    )
                    merged["reward.name"] = reward
                    merged["seed"] = seed
                    name = f"{_safe(method)}-{_safe(reward)}-s{seed}"
                    if name in names:
                        raise UsageError("grid", name, "the same run appears twice in the grid")
                    names.add(name)
                    merged["run_name"] = name
                    planned = PlannedRun(
                        name, method, reward, seed, preset, merged, available, note
                    )
                    planned.method_overrides = dict(entry.get("overrides") or {})
                    plan.append(planned)
    return plan


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError("--shard", text, "write i/n, e.g. 0/4 (0 <= i < n)") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError("--shard", text, "need 0 <= i < n, e.g. 0/4 ... 3/4")
    return i, n


def run_state(run_dir: Path) -> str:
    """done (final/), resume (checkpoints), stale (a run of ours without a checkpoint: metrics,
    or only its config.yaml when killed while loading), new."""
    if (run_dir / FINAL_DIR).is_dir():
        return "done"
    if list_checkpoints(run_dir):
        return "resume"
    if is_our_run(run_dir):
        return "stale"
    return "new"


def run_config(run: PlannedRun, out: Path, state: str) -> Config:
    """The config of a run: its own config.yaml when resuming (``train.epochs`` from the spec),
    else the plan's overrides (also written to ``OUT/configs/<run>.yaml`` for the record)."""
    if state == "resume":
        epochs = run.overrides.get("train.epochs")
        return resume_config(out / run.name, {"train.epochs": int(epochs)} if epochs else None)
    config = build_config(overrides=dict(run.overrides, output_dir=str(out)))
    record = out / "configs" / f"{run.name}.yaml"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(config_to_yaml(config))
    return config


def train_run(run: PlannedRun, out: Path, state: str, log) -> tuple[int, str | None]:
    """Train (or resume) one run of the plan: (exit code, error or None)."""
    try:
        config = run_config(run, out, state)
        code = train(config, out / run.name, resume=state == "resume", quiet=True)
    except (UsageError, TrainingError, StorageError) as exc:
        code = 2 if isinstance(exc, UsageError) else 4 if isinstance(exc, StorageError) else 3
        return code, str(exc).splitlines()[0][:500]
    except KeyboardInterrupt:
        return 130, "interrupted"
    except Exception as exc:  # a crash in one run must not stop the sweep
        log(f"{run.name}: failed\n{traceback.format_exc()}")
        return 1, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    return code, None if code == 0 else f"tdpo train exited with {code}"


# --------------------------------------------------------------------------------- running


class _Log:
    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[sweep {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _write_state(path: Path, spec: dict, plan: list[PlannedRun], shard: tuple[int, int]) -> None:
    data = {
        "spec": spec,
        "shard": f"{shard[0]}/{shard[1]}",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [r.record() for r in plan],
    }
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"))


def print_plan(
    spec: dict[str, Any], plan: list[PlannedRun], out: Path, shard: tuple[int, int]
) -> None:
    i, n = shard
    print(f"sweep: {len(plan)} runs into {out}" + (f" (shard {i}/{n})" if n > 1 else ""))
    print(f"base preset: {spec.get('base_preset')}")
    print("common overrides:")
    for key, value in (spec.get("overrides") or {}).items():
        print(f"  {key}={value}")
    for index, run in enumerate(plan):
        mine = index % n == i
        state = run_state(out / run.name) if (out / run.name).exists() else "new"
        action = {"done": "skip (done)", "resume": "resume", "stale": "restart (stale)"}.get(
            state, "train"
        )
        if not run.available:
            action = f"unavailable: {run.note}"
        elif not mine:
            action = f"other shard ({index % n}/{n})"
        extra = " ".join(f"{k}={v}" for k, v in run.method_overrides.items())
        print(f"  [{index:3d}] {run.name:<36s} {action:<18s} --preset {run.preset} {extra}")


def execute(
    spec: dict[str, Any],
    out: Path,
    shard: tuple[int, int] = (0, 1),
    report: bool = True,
    log=None,
) -> int:
    """Run this shard's part of the plan; returns 0 if every run of it is done."""
    plan = build_plan(spec)
    out.mkdir(parents=True, exist_ok=True)
    log = log or _Log(out / "sweep.log")
    i, n = shard
    state_path = out / ("sweep.json" if n == 1 else f"sweep-shard-{i}of{n}.json")
    mine = [run for index, run in enumerate(plan) if index % n == i]
    for run in plan:
        if run not in mine:
            run.status = "other-shard"
    log(f"{len(mine)} of {len(plan)} runs in this shard ({i}/{n}); output {out}")
    failed = 0
    stop_code = None
    for run in mine:
        if not run.available:
            run.status, run.error = "unavailable", run.note
            log(f"{run.name}: unavailable ({run.note})")
            failed += 1
            continue
        run_dir = out / run.name
        state = run_state(run_dir)
        if state == "done":
            run.status = "skipped"
            log(f"{run.name}: done already, skipped")
            continue
        if state == "stale":
            k = 1
            while (out / f"{run.name}.stale-{k}").exists():
                k += 1
            shutil.move(str(run_dir), str(out / f"{run.name}.stale-{k}"))
            log(f"{run.name}: no checkpoint; moved the folder to {run.name}.stale-{k}, restarting")
            state = "new"
        run.status = "running"
        _write_state(state_path, spec, plan, shard)
        log(f"{run.name}: {'resuming' if state == 'resume' else 'training'}")
        start = time.time()
        code, error = train_run(run, out, state, log)
        run.seconds = round(time.time() - start, 1)
        run.code = code
        run.attempts.append(state)
        if code == 0:
            run.status = "resumed" if state == "resume" else "trained"
            log(f"{run.name}: finished in {run.seconds:.0f} s")
        else:
            run.status, run.error = "failed", error
            log(f"{run.name}: failed ({error})")
            failed += 1
            if code in (130, 143):
                stop_code = code
                _write_state(state_path, spec, plan, shard)
                log("stopped by a signal; run the same command again to resume")
                break
        _write_state(state_path, spec, plan, shard)
    _write_state(state_path, spec, plan, shard)
    if stop_code is not None:
        return stop_code
    if report:
        make_report(plan, out, log)
    log(f"{len(mine) - failed} of {len(mine)} runs done, {failed} failed or unavailable")
    return 1 if failed else 0


def make_report(plan: list[PlannedRun], out: Path, log) -> None:
    dirs = [out / r.name for r in plan if (out / r.name / METRICS_FILE).is_file()]
    if not dirs:
        log("no run has metrics yet; no report")
        return
    try:
        build_report(dirs, out / "report", log=log)
        # claims only from finished runs (a run in progress has no final/ yet)
        finished = [
            (r.method, r.seed, out / r.name) for r in plan if (out / r.name / FINAL_DIR).is_dir()
        ]
        log(f"claims: {write_claims(finished, out / 'report')}")
    except UsageError as exc:
        log(f"report not written: {exc}")


# ------------------------------------------------------------------------------------ CLI


def add_sweep_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "sweep",
        help="run a grid of training runs (methods x seeds x rewards), resumable, then report",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Spec format, resuming and sharding: see `python -c 'import tdpo.sweep; "
        "help(tdpo.sweep)'` and docs/experiments.md. Presets: " + ", ".join(SWEEP_PRESETS),
    )
    parser.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="sweep spec file")
    parser.add_argument("--preset", choices=list(SWEEP_PRESETS), help="a built-in sweep spec")
    parser.add_argument("--out", metavar="DIR", help="sweep folder (default: the spec's out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--shard", metavar="i/n", help="run every n-th run starting at the i-th (0 <= i < n)"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write OUT/report")
    parser.add_argument(
        "--report-only", action="store_true", help="only (re)write OUT/report from the runs"
    )
    return parser


def run_sweep(args: argparse.Namespace) -> int:
    if bool(args.spec) == bool(args.preset):
        raise UsageError("SPEC", args.spec, "give either a SPEC.yaml file or --preset NAME")
    spec = SWEEP_PRESETS[args.preset]() if args.preset else load_spec(args.spec)
    out_text = args.out or spec.get("out")
    if not out_text:
        raise UsageError("--out", None, "give the sweep folder --out DIR (or out: in the spec)")
    out = Path(str(out_text)).expanduser()
    shard = parse_shard(args.shard)
    plan = build_plan(spec)
    if args.dry_run:
        print_plan(spec, plan, out, shard)
        return 0
    if args.report_only:
        make_report(plan, out, _Log(None))
        return 0
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        print(f"sweep: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    return execute(spec, out, shard, report=not args.no_report)
