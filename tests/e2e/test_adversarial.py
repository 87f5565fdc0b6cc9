"""The faults an adversarial user finds (issue 14): nothing lost, nothing overwritten, no
traceback. Each test is one defect of the issue, numbered as there, through ``python -m
tdpo.cli`` subprocesses on the tiny pipeline (CPU); docs/reliability.md lists them.

1. resume after a kill or a signal with the held-out evaluation on (a base evaluation at epoch
   0 before the first checkpoint) writes the metrics of an uninterrupted run;
2. a folder that is not a run of ours is never written into;
3. ``run_name`` is one path component;
4. one writer per run directory (an OS file lock);
5. - 10. one line and exit 2 instead of a traceback, found before loading where possible.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tdpo.checkpoint import list_checkpoints
from tdpo.tracking import read_metrics
from tests.fixtures.adversarial import (
    assert_one_line_error,
    eval_on_train_args,
    kill_when,
    metrics_lines,
    snapshot,
    start_cli,
)
from tests.fixtures.factories import TRAIN_ARGS_EPOCHS as EPOCHS
from tests.fixtures.processes import run_cli
from tests.fixtures.run_checks import assert_only_complete_checkpoints, assert_same_metrics

# ------------------------------------------------------------------------------------------
# 1. Resume with the held-out evaluation on: no duplicated epoch 0.


@pytest.fixture(scope="module")
def eval_reference(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    """An uninterrupted run with the evaluation on: rows 0 (base model), 1, 2, 3, 4."""
    out = tmp_path_factory.mktemp("adv-ref")
    result = run_cli(eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, out, "ref"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_metrics(out / "ref")
    assert [r["epoch"] for r in rows] == list(range(EPOCHS + 1))
    assert "eval/seen/jpeg_compressibility" in rows[0]
    return out / "ref", rows


def resume_until_done(run_dir: Path) -> int:
    """``tdpo train --resume`` until ``final/`` exists; returns how many resumes it took."""
    for resumes in range(1, 4):
        result = run_cli(["train", "--resume", str(run_dir)])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        if (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file():
            return resumes
    raise AssertionError("the run did not finish after 3 resumes")


def _after_lines(lines: int, delay: float = 0.0):
    seen: dict[str, float] = {}

    def trigger(run_dir: Path, elapsed: float):
        if "t" not in seen and metrics_lines(run_dir) >= lines:
            seen["t"] = elapsed
        if "t" in seen and elapsed >= seen["t"] + delay:
            return f"{delay:.2f}s after {lines} metrics lines"
        return None

    return trigger


KILL_TRIALS = [
    # The base evaluation's row is written, the first checkpoint is not: `0 0 1 2 ...` before.
    pytest.param(lambda: _after_lines(1), id="after-base-eval"),
    pytest.param(
        lambda: _after_lines(2, random.Random(3).uniform(0, 1.5)), id="random-after-epoch-1"
    ),
    pytest.param(
        lambda: _after_lines(1, random.Random(4).uniform(0, 1.5)),
        id="random-after-base-eval",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda: _after_lines(3, random.Random(5).uniform(0, 1.5)),
        id="random-after-epoch-2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("make_trigger", KILL_TRIALS)
def test_sigkill_with_evaluation_on_resumes_to_the_uninterrupted_metrics(
    make_trigger, eval_reference, tiny_pipeline_dir, tiny_clip_dir, tmp_path, request
):
    _, expected = eval_reference
    name = request.node.callspec.id
    proc = start_cli(eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, name))
    what, _, _ = kill_when(proc, tmp_path / name, make_trigger())
    assert proc.returncode == -signal.SIGKILL
    resumes = resume_until_done(tmp_path / name)
    print(f"{name}: killed {what}; resumed {resumes}x")
    assert_same_metrics(expected, read_metrics(tmp_path / name))
    assert_only_complete_checkpoints(tmp_path / name)


def test_sigterm_during_the_base_evaluation_resumes_to_the_uninterrupted_metrics(
    eval_reference, tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    """SIGTERM while the base model is evaluated: the state of epoch 0 is checkpointed (after the
    evaluation's row), and the resume must not evaluate epoch 0 a second time."""
    _, expected = eval_reference
    run_dir = tmp_path / "term"
    proc = start_cli(eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "term"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not any(line.startswith("run directory:") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    time.sleep(0.05)  # inside the base evaluation (16 samples)
    assert metrics_lines(run_dir) == 0, "the base evaluation ended before the signal"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert proc.returncode == 143, "".join(lines) + proc.stderr.read()
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]
    assert list_checkpoints(run_dir), "the state after the base evaluation is checkpointed"
    resume_until_done(run_dir)
    assert_same_metrics(expected, read_metrics(run_dir))


# ------------------------------------------------------------------------------------------
# 2. A folder that is not a run of ours is refused before anything is written.


def _user_folder(root: Path) -> Path:
    folder = root / "mine"
    (folder / "samples").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own notes\n")
    (folder / "samples" / "epoch_0001.png").write_bytes(b"my picture")
    return folder


def test_a_folder_of_user_files_is_never_written(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    folder = _user_folder(tmp_path)
    before = snapshot(tmp_path)
    args = eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "mine")
    result = run_cli([*args, "--set", "train.epochs=1"])
    assert_one_line_error(result, "run_name", "mine", "not a tdpo run")
    assert snapshot(tmp_path) == before
    assert (folder / "config.yaml").read_text() == "my: own notes\n"


def test_run_name_dot_does_not_write_into_the_output_dir(
    tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    (tmp_path / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    args = eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, ".")
    result = run_cli(args)
    assert_one_line_error(result, "run_name", "'.'", "one folder name")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------
# 3. run_name is one path component: it cannot put the run outside --output-dir.


@pytest.mark.parametrize("name", ["../../escaped", "{tmp}/escaped", "a/../../../escaped"])
def test_run_name_cannot_escape_the_output_dir(name, tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "out" / "runs"
    out.mkdir(parents=True)
    name = name.replace("{tmp}", str(tmp_path))
    result = run_cli(eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, out, name))
    assert_one_line_error(result, "run_name=", "one folder name", "--output-dir")
    assert not (tmp_path / "escaped").exists()
    assert snapshot(tmp_path) == {"out": "dir", "out/runs": "dir"}


# ------------------------------------------------------------------------------------------
# 4. One writer per run directory: a second `tdpo train` (new or --resume) is refused with the
#    holder's PID while the first runs, and nothing it wrote is disturbed.


def _wait_for_lock(proc, run_dir: Path, timeout: float = 240) -> None:
    from tdpo.rundir import lock_holder

    deadline = time.monotonic() + timeout
    while lock_holder(run_dir) != str(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)


def test_a_second_writer_is_refused_with_the_holders_pid(
    tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    args = eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "one")
    run_dir = tmp_path / "one"
    first = start_cli(args)
    _wait_for_lock(first, run_dir)  # the first is loading its models (or training)
    second = run_cli(args)
    assert_one_line_error(second, "run_name=", f"PID {first.pid}")
    resumed = run_cli(["train", "--resume", str(run_dir)])
    assert_one_line_error(resumed, "--resume=", f"PID {first.pid}")
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(EPOCHS + 1))


def test_two_concurrent_resumes_one_is_refused(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    args = eval_on_train_args(
        tiny_pipeline_dir, tiny_clip_dir, tmp_path, "two", **{"train.epochs": 2}
    )
    run_dir = tmp_path / "two"
    assert run_cli(args).returncode == 0
    extend = ["train", "--resume", str(run_dir), "--set", f"train.epochs={EPOCHS}"]
    first = start_cli(extend)
    _wait_for_lock(first, run_dir)
    second = run_cli(extend)
    assert_one_line_error(second, "--resume=", f"PID {first.pid}")
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(EPOCHS + 1))
