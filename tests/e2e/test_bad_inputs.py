"""Bad input, table-driven, through ``python -m tdpo.cli`` subprocesses: each exits with code 2
and ONE line on stderr naming the field, the value and the fix, without a traceback. Checks that
need no model run before anything heavy is imported: those finish within 3 seconds (timed)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdpo.checkpoint import save_checkpoint
from tdpo.config import build_config, config_to_yaml
from tests.fixtures.factories import as_set_args, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BUDGET_S = 3.0

# Never load: validated from the config, paths and manifests alone (no torch import).
FAST = "fast"
# The reward registry imports torch (about 2 CPU-seconds), still before any model loads.
REGISTRY = "registry"
# Only detectable once models run (the reward's output): no time budget.
LOADS = "loads"
# Detected when the pipeline loads: no time budget, and no run directory may be left behind.
AT_LOAD = "at-load"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }


def run_timed(args: list[str], timeout: float = 300) -> tuple[int, str, str, float, float]:
    """(exit code, stdout, stderr, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.returncode, result.stdout, result.stderr, wall, cpu


@pytest.fixture(scope="module")
def fake_run(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    """A run directory with its config and a (small, valid) checkpoint: enough for every resume
    check that happens before models load."""
    from tdpo.cli import run_config_hash

    root = tmp_path_factory.mktemp("fake-run")
    overrides = {
        **tiny_overrides(tiny_pipeline_dir, tiny_clip_dir),
        "reward.panel": [],
        "eval.every": 0,
        "prompts.train": "simple_animals",
        "output_dir": str(root),
        "run_name": "run",
    }
    config = build_config("tdpo-r", None, overrides)
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(config))
    save_checkpoint(run, 1, {"epoch": 1, "num_processes": 1}, 2, run_config_hash(config))
    # Same config, checkpoint from a 2-process launch.
    two = root / "two"
    two.mkdir()
    (two / "config.yaml").write_text(config_to_yaml(config))
    save_checkpoint(two, 1, {"epoch": 1, "num_processes": 2}, 2, run_config_hash(config))
    # config.yaml edited after the checkpoint was written.
    edited = root / "edited"
    edited.mkdir()
    (edited / "config.yaml").write_text(
        config_to_yaml(config).replace("guidance_scale: 3.0", "guidance_scale: 4.0")
    )
    save_checkpoint(edited, 1, {"epoch": 1, "num_processes": 1}, 2, run_config_hash(config))
    return root


# (id, extra args, strings the one line must contain (field, value, fix), kind)
# Args may use {tmp} (a fresh empty folder), {run}/{two}/{edited} (fake runs), {file} (a
# regular file), {yaml:...} (a file with that text), {pipe} (the tiny pipeline).
CASES = [
    ("unknown-key", ["--set", "train.epoch=3"], ["train.epoch", "3", "did you mean train.epochs"]),
    ("unknown-section", ["--set", "trian.epochs=3"], ["trian.epochs", "unknown config key"]),
    ("wrong-type-int", ["--set", "train.epochs=three"], ["train.epochs", "three", "integer"]),
    ("wrong-type-float", ["--set", "sample.eta=fast"], ["sample.eta", "fast", "number"]),
    ("wrong-type-bool", ["--set", "log.tensorboard=maybe"], ["log.tensorboard", "true or false"]),
    ("wrong-type-seed", ["--set", "seed=1.5"], ["seed", "1.5", "integer"]),
    ("wrong-type-list", ["--set", "model.lora_targets=5"], ["model.lora_targets", "list"]),
    ("non-finite", ["--set", "train.learning_rate=.nan"], ["train.learning_rate", "finite"]),
    ("zero-epochs", ["--set", "train.epochs=0"], ["train.epochs", "0", ">= 1"]),
    ("negative-epochs", ["--set", "train.epochs=-1"], ["train.epochs", "-1", ">= 1"]),
    ("zero-sample-batch", ["--set", "sample.batch_size=0"], ["sample.batch_size", "0", ">= 1"]),
    (
        "negative-samples",
        ["--set", "sample.samples_per_epoch=-8"],
        ["sample.samples_per_epoch", "-8"],
    ),
    ("zero-train-batch", ["--set", "train.batch_size=0"], ["train.batch_size", "0", ">= 1"]),
    ("zero-steps", ["--set", "sample.num_steps=0"], ["sample.num_steps", "0", ">= 1"]),
    ("sample-batch-not-dividing", ["--set", "sample.batch_size=3"], ["sample.batch_size", "3"]),
    ("train-batch-not-dividing", ["--set", "train.batch_size=3"], ["train.batch_size", "3"]),
    ("updates-not-dividing", ["--set", "train.updates_per_epoch=3"], ["updates_per_epoch", "3"]),
    ("eta-zero", ["--set", "sample.eta=0"], ["sample.eta", "0", "deterministic"]),
    ("guidance-below-1", ["--set", "sample.guidance_scale=0.5"], ["guidance_scale", "0.5"]),
    ("beta-1", ["--set", "train.adam_beta1=1.0"], ["train.adam_beta1", "1.0", "[0, 1)"]),
    ("fraction-2", ["--set", "train.max_nonfinite_fraction=2"], ["max_nonfinite_fraction"]),
    ("min-count", ["--set", "train.norm_min_count=100"], ["norm_min_count", "100"]),
    ("keep-0", ["--set", "checkpoint.keep=0"], ["checkpoint.keep", "0", ">= 1"]),
    ("grid-negative", ["--set", "log.grid_every=-1"], ["log.grid_every", "-1"]),
    (
        "eval-without-sets",
        ["--set", "eval.every=1", "--set", "eval.prompt_sets=[]"],
        ["eval.prompt_sets", "held-out"],
    ),
    ("unknown-algorithm", ["--set", "train.algorithm=ppo"], ["train.algorithm", "ppo", "tdpo"]),
    ("unknown-reset-target", ["--set", "reset.target=sleepy"], ["reset.target", "sleepy"]),
    ("unknown-precision", ["--set", "mixed_precision=fp8"], ["mixed_precision", "fp8", "bf16"]),
    ("unknown-kl-estimator", ["--set", "kl.estimator=bogus"], ["kl.estimator", "bogus"]),
    ("unknown-preset", ["--preset", "nope"], ["--preset", "nope", "choose from"]),
    ("unknown-prompt-set", ["--set", "prompts.train=nope"], ["prompts.train", "nope"]),
    (
        "missing-prompt-file",
        ["--set", "prompts.train=/no/such/prompts.txt"],
        ["prompts.train", "/no/such/prompts.txt", "no such prompt file"],
    ),
    ("missing-model", ["--model", "/no/such/pipeline"], ["model.pretrained", "/no/such/pipeline"]),
    ("model-not-a-pipeline", ["--model", "{tmp}"], ["model.pretrained", "model_index.json"]),
    (
        "model-unsupported-pipeline",
        ["--model", "{kandinsky}"],
        ["model.pretrained", "KandinskyPipeline", "tdpo fine-tunes"],
        AT_LOAD,
    ),
    (
        "output-under-a-file",
        ["--output-dir", "{file}/x"],
        ["output_dir", "{file}/x", "is a file, not a folder"],
    ),
    ("missing-config", ["--config", "/no/such.yaml"], ["--config", "/no/such.yaml", "no such"]),
    ("bad-yaml", ["--config", "{yaml:train:\n  epochs: [1,\n}"], ["--config", "line", "fix"]),
    ("yaml-not-mapping", ["--config", "{yaml:- 1\n- 2\n}"], ["--config", "mapping"]),
    ("yaml-unknown-key", ["--config", "{yaml:train:\n  epoch: 3\n}"], ["train.epoch", " in "]),
    ("yaml-wrong-type", ["--config", "{yaml:sample: 5\n}"], ["sample", "5"]),
    ("set-without-equals", ["--set", "noequals"], ["--set", "noequals", "key=value"]),
    ("set-empty-key", ["--set", "=5"], ["5", "unknown config key"]),
    ("existing-run", ["--set", "run_name=run", "--output-dir", "{root}"], ["already holds"]),
    ("resume-missing", ["--resume", "/no/such/run"], ["--resume", "/no/such/run", "config.yaml"]),
    ("resume-incompatible", ["--set", "sample.num_steps=8"], ["sample.num_steps", "resume"]),
    ("resume-with-preset", ["--preset", "ddpo-2"], ["--resume", "drop --preset"]),
    ("resume-edited-config", [], ["--resume", "different configuration"]),
    ("resume-other-process-count", [], ["--resume", "2 processes", "same number"]),
    ("missing-plugin-module", ["--reward", "tests.no_such_module:f"], ["tests.no_such_module"]),
    ("unknown-reward", ["--reward", "no_such_reward"], ["reward.name", "no_such_reward"], REGISTRY),
    (
        "unknown-panel-reward",
        ["--set", "reward.panel=[jpeg_compressibility,nope]"],
        ["reward.panel[1]", "nope", "choose one of"],
        REGISTRY,
    ),
    (
        "reward-wrong-shape",
        ["--reward", "tests.rewards_for_tests:wrong_shape"],
        ["reward.name", "wrong_shape", "shape (8, 2)", "shape [8]"],
        LOADS,
    ),
    (
        "reward-wrong-type",
        ["--reward", "tests.rewards_for_tests:wrong_type"],
        ["reward.name", "wrong_type", "list", "tensor"],
        LOADS,
    ),
]
RESUME_CASES = {
    "resume-incompatible": "run",
    "resume-with-preset": "run",
    "resume-edited-config": "edited",
    "resume-other-process-count": "two",
}


def _expand(text: str, subs: dict[str, str], tmp_path: Path) -> str:
    if text.startswith("{yaml:"):
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text[len("{yaml:") : -1])
        return str(path)
    for key, value in subs.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    case, tiny_pipeline_dir, tiny_clip_dir, fake_run, tmp_path
):
    name, extra, expected = case[:3]
    kind = case[3] if len(case) > 3 else FAST
    out = tmp_path / "out"
    out.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    regular_file = tmp_path / "regular-file"
    regular_file.write_text("not a folder\n")
    kandinsky = tmp_path / "kandinsky"
    kandinsky.mkdir()
    (kandinsky / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    subs = {
        "tmp": str(empty),
        "file": str(regular_file),
        "root": str(fake_run),
        "kandinsky": str(kandinsky),
    }
    extra = [_expand(a, subs, tmp_path) for a in extra]
    expected = [_expand(e, subs, tmp_path) for e in expected]
    if name in RESUME_CASES:
        args = ["train", "--resume", str(fake_run / RESUME_CASES[name]), *extra]
    else:
        base = {
            **tiny_overrides(tiny_pipeline_dir, tiny_clip_dir),
            "reward.panel": [],
            "eval.every": 0,
            "prompts.train": "simple_animals",
            "train.batch_size": 4,
            "train.epochs": 1,
            "log.grid_every": 0,
            "run_name": "bad",
        }
        args = ["train", "--output-dir", str(out), *as_set_args(base), *extra]
    code, stdout, stderr, wall, cpu = run_timed(args)
    print(f"{name}: exit {code}, {wall:.2f}s wall, {cpu:.2f}s CPU: {stderr.strip()}")
    assert code == 2, stdout[-1500:] + stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert "Traceback" not in stderr and line.startswith("tdpo")
    for text in expected:
        assert text in line, (text, line)
    if kind != LOADS:
        assert not (out / "bad").exists(), "a rejected config must not create a run directory"
    if kind in (FAST, REGISTRY):
        assert cpu < BUDGET_S, f"{name}: {cpu:.2f} CPU-seconds (budget {BUDGET_S}s)"
    if kind == FAST:  # no torch import: far within budget even on a busy machine
        assert wall < BUDGET_S, f"{name}: {wall:.2f}s (budget {BUDGET_S}s)"
        assert "run directory:" not in stdout


def test_table_has_at_least_30_cases():
    assert len(CASES) >= 30
