"""Crash safety: SIGKILL a tiny training run at random moments (some while a checkpoint is being
written), resume it with ``--resume`` until it is done, and get the metrics of an uninterrupted
run. A truncated or corrupted latest checkpoint is reported in one line and the previous one is
used. Everything runs ``python -m tdpo.cli`` in subprocesses on the tiny pipeline (CPU)."""

from __future__ import annotations

import math
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tdpo.checkpoint import list_checkpoints, read_manifest
from tdpo.tracking import read_metrics
from tests.fixtures.factories import TRAIN_ARGS_EPOCHS as EPOCHS
from tests.fixtures.factories import tiny_train_args
from tests.fixtures.processes import REPO, cli_env, run_cli, tdpo_command
from tests.fixtures.run_checks import assert_only_complete_checkpoints, assert_same_metrics


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    """One uninterrupted run: its metrics are what every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("crash-ref")
    result = run_cli(tiny_train_args(tiny_pipeline_dir, tiny_clip_dir, out, "ref"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_metrics(out / "ref")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    return out / "ref", rows


def kill_and_resume(args, run_dir: Path, trigger, slow_checkpoints: bool) -> dict:
    """Start a run, SIGKILL it when ``trigger(run_dir, started_s)`` says so, resume until done."""
    proc = subprocess.Popen(
        tdpo_command(args, slow_checkpoints),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=REPO,
    )
    start = time.monotonic()
    killed_at = None
    while proc.poll() is None and time.monotonic() - start < 240:
        what = trigger(run_dir, time.monotonic() - start)
        if what:
            proc.send_signal(signal.SIGKILL)
            killed_at = what
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    assert killed_at is not None, f"the run ended (rc {proc.returncode}) before the kill: {stderr}"
    assert proc.returncode == -signal.SIGKILL
    assert_only_complete_checkpoints(run_dir)
    resumes = 0
    while True:
        resumes += 1
        assert resumes <= 3, "the run did not finish after 3 resumes"
        result = run_cli(["train", "--resume", str(run_dir), "--set", f"train.epochs={EPOCHS}"])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        if (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file():
            break
    return {"killed_at": killed_at, "resumes": resumes}


def while_writing(epoch: int):
    """Kill while the checkpoint of ``epoch`` exists only as a `.tmp-*` directory."""

    def trigger(run_dir: Path, _elapsed: float):
        ckpts = run_dir / "checkpoints"
        if ckpts.is_dir() and any(
            p.name.startswith(f".tmp-epoch_{epoch:06d}") for p in ckpts.iterdir()
        ):
            return f"writing checkpoint epoch {epoch}"
        return None

    return trigger


def after_rows(rows: int, seed: int):
    """Kill a random 0-1.5 s after metrics.jsonl first holds ``rows`` rows (mid-epoch, between
    epochs, or mid-checkpoint, whatever the moment turns out to be)."""
    delay = random.Random(seed).uniform(0.0, 1.5)
    seen: dict[str, float] = {}

    def trigger(run_dir: Path, elapsed: float):
        if "t" not in seen and len(read_metrics(run_dir)) >= rows:
            seen["t"] = elapsed
        if "t" in seen and elapsed >= seen["t"] + delay:
            return f"{delay:.2f}s after {rows} metrics rows"
        return None

    return trigger


def at_time(seconds: float):
    """Kill ``seconds`` after the start (e.g. while the models load: no checkpoint yet)."""

    def trigger(run_dir: Path, elapsed: float):
        return f"{seconds:.1f}s after start" if elapsed >= seconds else None

    return trigger


TRIALS = [
    pytest.param("writing-epoch-2", lambda: while_writing(2), True, id="writing-epoch-2"),
    pytest.param("random-after-1", lambda: after_rows(1, seed=1), False, id="random-after-1"),
    pytest.param(
        "writing-epoch-1",
        lambda: while_writing(1),
        True,
        id="writing-epoch-1",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "random-after-2",
        lambda: after_rows(2, seed=2),
        False,
        id="random-after-2",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "writing-epoch-3",
        lambda: while_writing(3),
        True,
        id="writing-epoch-3",
        marks=pytest.mark.slow,
    ),
    pytest.param("loading", lambda: at_time(2.0), False, id="loading", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "make_trigger", "slow_checkpoints"), TRIALS)
def test_sigkill_then_resume_reaches_the_uninterrupted_metrics(
    name, make_trigger, slow_checkpoints, reference, tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    _, expected = reference
    args = tiny_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, name)
    report = kill_and_resume(args, tmp_path / name, make_trigger(), slow_checkpoints)
    print(f"{name}: killed {report['killed_at']}; resumed {report['resumes']}x")
    assert_same_metrics(expected, read_metrics(tmp_path / name))
    assert_only_complete_checkpoints(tmp_path / name)
    assert not [p for p in (tmp_path / name / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoints_carry_the_config_hash_the_cli_computes(reference):
    """The CLI refuses an incompatible resume from the manifest alone, before loading models:
    its hash formula must stay the trainer's."""
    from tdpo.config import build_config, load_yaml, run_hash

    run_dir, _ = reference
    config = build_config(base=load_yaml(run_dir / "config.yaml"))
    for path in list_checkpoints(run_dir):
        manifest = read_manifest(path)
        assert manifest["config_hash"] == run_hash(config)
        assert manifest["num_processes"] == 1


@pytest.mark.parametrize(
    "damage", ["truncate", "flip-byte", pytest.param("missing-state", marks=pytest.mark.slow)]
)
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage):
    run_src, expected = reference
    run_dir = tmp_path / "run"
    shutil.copytree(run_src, run_dir)
    latest, previous = list_checkpoints(run_dir)[-1], list_checkpoints(run_dir)[-2]
    state = latest / "state.pt"
    if damage == "truncate":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif damage == "flip-byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        state.unlink()
    result = run_cli(["train", "--resume", str(run_dir), "--set", f"train.epochs={EPOCHS}"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if " is corrupt (" in line]
    assert len(lines) == 1, result.stdout
    assert latest.name in lines[0] and f"using {previous.name}" in lines[0]
    assert_same_metrics(expected, read_metrics(run_dir))
    assert_only_complete_checkpoints(run_dir)


def test_all_checkpoints_corrupt_is_one_line_and_exit_2(reference, tmp_path):
    run_src, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(run_src, run_dir)
    for path in list_checkpoints(run_dir):
        (path / "state.pt").write_bytes(b"garbage")
    result = run_cli(["train", "--resume", str(run_dir), "--set", f"train.epochs={EPOCHS + 1}"])
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no usable checkpoint" in err and "corrupt" in err


# ---------------------------------------------------------------------------------------------
# Non-finite rewards: past train.max_nonfinite_fraction the run exits 3 with one line and an
# intact, loadable last checkpoint; below it, the samples are left out and weights stay finite.

NONFINITE = [
    # (reward factory, extra overrides, exit code, epochs logged)
    ("nan_after_two_epochs", {}, 3, 2),
    ("neg_inf_all", {}, 3, 0),
    ("nan_once", {"train.max_nonfinite_fraction": 0.3}, 0, 2),
]


@pytest.mark.parametrize(
    ("factory", "extra", "code", "logged"), NONFINITE, ids=[c[0] for c in NONFINITE]
)
def test_nonfinite_rewards(
    factory, extra, code, logged, tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    from safetensors.torch import load_file

    from tdpo.checkpoint import load_latest_checkpoint

    args = tiny_train_args(
        tiny_pipeline_dir,
        tiny_clip_dir,
        tmp_path,
        factory,
        **{
            "reward.name": f"tests.rewards_for_tests:{factory}",
            "train.epochs": 2 if code == 0 else 3,
            # The factories count calls as epochs: no extra calls scoring x0 estimates.
            "log.critic_reference": False,
        },
        **extra,
    )
    result = run_cli(args)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = tmp_path / factory
    rows = read_metrics(run_dir)
    assert len(rows) == logged
    if code == 3:
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "NaN or infinite" in err and "train.max_nonfinite_fraction" in err
    else:
        assert all(r["nonfinite_rewards"] == 1 for r in rows)
        assert all(math.isfinite(r["reward_mean"]) for r in rows)
        lora = load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))
        assert all(bool(t.isfinite().all()) for t in lora.values())
    assert_only_complete_checkpoints(run_dir)
    found = load_latest_checkpoint(run_dir, log=lambda _: None)
    if logged == 0:
        assert found is None
        return
    path, state = found
    assert state["epoch"] == logged
    tensors = list(state["policy"].values()) + list(state.get("critic", {}).values())
    assert tensors and all(bool(t.isfinite().all()) for t in tensors)
