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


# ------------------------------------------------------------------------------------------
# 5. One line and exit 2 instead of a traceback (and found before loading where it can be).

BILLION_LAUGHS = "".join(
    [
        "l0: &l0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}\n",
        *(
            f"l{n}: &l{n} {{" + ", ".join(f"k{i}: *l{n - 1}" for i in range(9)) + "}\n"
            for n in range(1, 9)
        ),
        "train: {epochs: 1}\n",
    ]
)
REWARDS = "tests.fixtures.adversarial_rewards"


class Workspace:
    """Files and folders the cases refer to, made once per module under ``root``."""

    def __init__(self, root: Path, pipeline_dir: Path, clip_dir: Path):
        from tests.fixtures.bad_inputs import write_fake_runs

        self.root, self.pipeline, self.clip = root, pipeline_dir, clip_dir
        self.binary = root / "binary.yaml"
        self.binary.write_bytes(b"train:\n  epochs: 2\n# \xff\xfe\n")
        self.binary_prompts = root / "binary-prompts.txt"
        self.binary_prompts.write_bytes(b"a cat\n\xff\xfe a dog\n")
        self.aliases = root / "aliases.yaml"
        self.aliases.write_text(BILLION_LAUGHS)
        self.file = root / "a-file"
        self.file.write_text("not a folder\n")
        self.empty = root / "empty"
        self.empty.mkdir()
        self.bad_lora = root / "bad-lora"
        self.bad_lora.mkdir()
        (self.bad_lora / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
        self.runs = write_fake_runs(root / "fake-runs", pipeline_dir, clip_dir)
        (self.runs / "run" / "checkpoints" / "x").mkdir()  # a checkpoints/ folder, not a LoRA
        self.pickle_lora = root / "pickle-lora"
        self.pickle_lora.mkdir()
        (self.pickle_lora / "pytorch_lora_weights.bin").write_bytes(
            b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x05print"
            b"\x94\x93\x94\x8c\x05PWNED\x94\x85\x94R\x94."
        )
        self.long_prompts = root / "long-prompts.txt"
        self.long_prompts.write_text("a cat\n" + "a dog " * 1_000_000 + "\n")
        self.duplicate = root / "duplicate.yaml"
        self.duplicate.write_text("train:\n  epochs: 2\ntrain:\n  epochs: 3\n")

    def train(self, out: Path, *extra: str, run_name: str = "bad", **overrides) -> list[str]:
        args = eval_on_train_args(
            self.pipeline, self.clip, out, run_name, **{"train.epochs": 1, **overrides}
        )
        return [*args, *extra]

    def sampler(self, command: str, *extra: str) -> list[str]:
        base = [command, "--model", str(self.pipeline), "--prompt", "a cat", "--steps", "2"]
        if command == "eval":
            base += ["--reward", "jpeg_compressibility"]
        return [*base, *extra]


@pytest.fixture(scope="module")
def ws(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("adv-ws"), tiny_pipeline_dir, tiny_clip_dir)


def _resume_with(files: dict[str, bytes]):
    """A ``--resume`` case: a copy of the fake run with ``files`` (relative path: content)."""

    def make(ws: Workspace, out: Path) -> list[str]:
        import shutil

        run = out / "run"
        shutil.copytree(ws.runs / "run", run)
        for rel, data in files.items():
            (run / rel).write_bytes(data)
        return ["train", "--resume", str(run)]

    return make


GOOD_LINE = b'{"epoch": 1, "reward_mean": 0.5}\n'
# (id, args from (workspace, an empty folder), strings the one line names, nothing may be left
# in the empty folder: the run folder of a refused new run included)
CASES_5 = [
    ("config-not-utf8", lambda w, o: w.train(o, "--config", str(w.binary)), ["--config", "UTF-8"]),
    (
        "prompts-not-utf8",
        lambda w, o: w.train(o, "--set", f"prompts.train={w.binary_prompts}"),
        ["prompts.train", "UTF-8", "line 2"],
    ),
    (
        "sweep-spec-not-utf8",
        lambda w, o: ["sweep", str(w.binary), "--out", str(o / "sweep")],
        ["SPEC", "UTF-8"],
    ),
    ("run-name-300", lambda w, o: w.train(o, run_name="x" * 300), ["run_name", "300 bytes"]),
    (
        "output-dir-in-proc",
        lambda w, o: w.train(o, "--output-dir", "/proc/x"),
        ["output_dir", "/proc/x"],
    ),
    ("yaml-aliases", lambda w, o: w.train(o, "--config", str(w.aliases)), ["--config", "alias"]),
    (
        "prompts-per-epoch-negative",
        lambda w, o: w.train(o, **{"sample.prompts_per_epoch": -1}),
        ["sample.prompts_per_epoch", "-1", ">= 0"],
    ),
    (
        "cpu-threads-huge",
        lambda w, o: w.train(o, cpu_threads=1000000000000),
        ["cpu_threads", "1000000000000"],
    ),
    (
        "reward-not-callable",
        lambda w, o: w.train(o, "--reward", f"{REWARDS}:not_callable"),
        ["reward.name", "not_callable", "callable"],
    ),
    (
        "reward-factory-not-callable",
        lambda w, o: w.train(o, "--reward", f"{REWARDS}:NOT_A_FACTORY"),
        ["reward.name", "NOT_A_FACTORY", "callable"],
    ),
    (
        "reward-bare-tensor",
        lambda w, o: w.train(o, "--reward", f"{REWARDS}:bare_tensor"),
        ["reward.name", "bare_tensor", "(rewards, info)"],
    ),
    (
        "panel-empty-tensor",
        lambda w, o: w.train(o, **{"reward.panel": [f"{REWARDS}:empty_tensor"]}),
        ["reward.panel[0]", "empty_tensor", "shape (0,)"],
    ),
    (
        "eval-reward-bare-tensor",
        lambda w, o: w.train(o, **{"eval.rewards": [f"{REWARDS}:bare_tensor"]}),
        ["eval.rewards[0]", "bare_tensor", "(rewards, info)"],
    ),
    (
        "unloadable-hub-id",  # offline: huggingface_hub's warning must not come first
        lambda w, o: w.train(o, "--model", "someorg/no-such-model-xyz"),
        ["model.pretrained", "someorg/no-such-model-xyz", "cannot load"],
    ),
    (
        "prompts-line-6mb",  # 7. a runaway prompt line
        lambda w, o: w.train(o, "--set", f"prompts.train={w.long_prompts}"),
        ["prompts.train", "long-prompts.txt:2", "5999999 characters", "at most"],
    ),
    (
        "yaml-duplicate-section",  # 8. a section given twice kept one of them silently
        lambda w, o: w.train(o, "--config", str(w.duplicate)),
        ["--config", "'train'", "twice", "line 3"],
    ),
    (
        "eval-duplicate-labels",  # 8. two sets with one label kept one of them silently
        lambda w, o: w.train(o, **{"eval.prompt_sets": ["a=simple_animals", "a=unseen_animals"]}),
        ["eval.prompt_sets[1]", "'a' is used twice"],
    ),
    (
        "guidance-1e308",  # 8. passed validation, then exit 3 blaming the reward
        lambda w, o: w.train(o, **{"sample.guidance_scale": 1e308}),
        ["sample.guidance_scale", "1e+308", "[1, 100]"],
    ),
    (
        "monitor-unknown",  # 9. caught after loading and the base evaluation
        lambda w, o: w.train(o, **{"eval.monitor": "eval/nope/x"}),
        ["eval.monitor", "eval/nope/x", "not a metric the evaluation logs"],
    ),
    (
        "resume-metrics-malformed",
        _resume_with({"metrics.jsonl": GOOD_LINE + b"not json\n" + GOOD_LINE}),
        ["--resume", "metrics.jsonl:2", "not a JSON line"],
    ),
    (
        "resume-metrics-not-utf8",
        _resume_with({"metrics.jsonl": GOOD_LINE + b'{"epoch": 2, "x": "\xff"}\n' + GOOD_LINE}),
        ["--resume", "metrics.jsonl:2", "UTF-8"],
    ),
    (
        "resume-metrics-json-list",
        _resume_with({"metrics.jsonl": GOOD_LINE + b"[1, 2]\n"}),
        ["--resume", "metrics.jsonl:2", "list"],
    ),
    (
        "resume-metrics-epoch-string",
        _resume_with({"metrics.jsonl": GOOD_LINE + b'{"epoch": "x"}\n'}),
        ["--resume", "metrics.jsonl:2", "epoch 'x'"],
    ),
    (
        "resume-binary-config",
        _resume_with({"config.yaml": b"seed: 0\n\xff\xfe\x00\x01"}),
        ["--resume", "UTF-8"],
    ),
    (
        "resume-state-missing-keys",  # the fake run's state.pt holds only its epoch
        _resume_with({}),
        ["--resume", "epoch_000001", "policy"],
    ),
    (
        "sample-lora-empty-folder",
        lambda w, o: w.sampler("sample", "--lora", str(w.empty), "--out", str(o / "s")),
        ["--lora", "pytorch_lora_weights.safetensors"],
    ),
    (
        "sample-lora-checkpoints-folder",
        lambda w, o: w.sampler(
            "sample", "--lora", str(w.runs / "run" / "checkpoints"), "--out", str(o / "s")
        ),
        ["--lora", "final/"],
    ),
    (
        "sample-lora-not-safetensors",
        lambda w, o: w.sampler("sample", "--lora", str(w.bad_lora), "--out", str(o / "s")),
        ["--lora", "cannot load"],
    ),
    *[
        (
            f"sample-{flag[2:]}-{value}",
            lambda w, o, a=(flag, value): w.sampler("sample", *a),
            [flag],
        )
        for flag, value in [
            ("--seeds", ","),
            ("--steps", "100000000"),
            ("--eta", "-5"),
            ("--guidance", "nan"),
        ]
    ],
    (
        "eval-guidance-inf",
        lambda w, o: w.sampler("eval", "--guidance", "inf", "--out", str(o / "e.json")),
        ["--guidance", "inf"],
    ),
    (
        "sample-lora-a-file",
        lambda w, o: w.sampler("sample", "--lora", str(w.file), "--out", str(o / "s")),
        ["--lora", "is a file", "pytorch_lora_weights.safetensors"],
    ),
    (
        "sample-lora-pickle",  # a pickle is never loaded (no torch warning before the line)
        lambda w, o: w.sampler("sample", "--lora", str(w.pickle_lora), "--out", str(o / "s")),
        ["--lora", "pytorch_lora_weights.safetensors"],
    ),
    (
        "sample-out-is-a-file",
        lambda w, o: w.sampler("sample", "--out", str(w.file)),
        ["--out", "not a folder"],
    ),
    (
        "sample-out-under-a-file",
        lambda w, o: w.sampler("sample", "--out", str(w.file / "x")),
        ["--out", "is a file"],
    ),
    (
        "eval-device-tpu9",
        lambda w, o: w.sampler("eval", "--device", "tpu9", "--out", str(o / "e.json")),
        ["--device", "tpu9"],
    ),
    (
        "eval-prompts-binary",
        lambda w, o: w.sampler("eval", "--prompts", str(w.binary_prompts)),
        ["--prompts", "UTF-8"],
    ),
    (
        "eval-out-under-a-file",
        lambda w, o: w.sampler("eval", "--out", str(w.file / "e.json")),
        ["--out", "is a file"],
    ),
    (
        "eval-grid-under-a-file",
        lambda w, o: w.sampler("eval", "--out", str(o / "e.json"), "--grid", str(w.file / "g.png")),
        ["--grid", "is a file"],
    ),
    (
        "eval-reward-empty-tensor",
        lambda w, o: [
            *w.sampler("eval", "--out", str(o / "e.json")),
            "--reward",
            f"{REWARDS}:empty_tensor",
        ],
        ["--reward", "empty_tensor", "shape (0,)"],
    ),
]


@pytest.mark.parametrize(("name", "make_args", "texts"), CASES_5, ids=[c[0] for c in CASES_5])
def test_bad_input_is_one_line_and_exit_2(name, make_args, texts, ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = make_args(ws, out)
    before = snapshot(ws.root)
    runs_before = {p: snapshot(p) for p in out.iterdir()}
    result = run_cli(args, timeout=120)
    print(f"{name}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    assert_one_line_error(result, *texts)
    assert snapshot(ws.root) == before, "a file outside the run folder changed"
    for path, files in runs_before.items():  # a refused resume changes nothing in the run
        assert {k: v for k, v in snapshot(path).items() if k != ".lock"} == files
    if args[1:2] != ["--resume"] and args[0] == "train":
        assert not [p for p in out.iterdir()], "a refused run leaves no run folder behind"


# ------------------------------------------------------------------------------------------
# 6. A full disk while a checkpoint is written: one line naming the folder and the space
#    needed, exit 4, no temporary left, the earlier checkpoint intact, and the run resumes.


@pytest.mark.parametrize("kind", ["oserror", "enforce"])
def test_full_disk_is_one_line_exit_4_and_resumes(
    kind, eval_reference, tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    import subprocess
    import sys

    from tests.fixtures.adversarial import DISK_FULL_CLI
    from tests.fixtures.processes import REPO, cli_env

    _, expected = eval_reference
    run_dir = tmp_path / "full"
    args = eval_on_train_args(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "full")
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CLI, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(), "TDPO_TEST_DISK_FULL": kind},
        cwd=REPO,
    )
    assert_one_line_error(
        result, "epoch_000002", str(run_dir / "checkpoints"), "needs about", "--resume", code=4
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch_000001"]
    assert_only_complete_checkpoints(run_dir)
    resume_until_done(run_dir)
    assert_same_metrics(expected, read_metrics(run_dir))


# ------------------------------------------------------------------------------------------
# 7. A runaway prompt: captions are cut before they are wrapped (the prompt file itself is
#    refused, see "prompts-line-6mb" above).


def test_a_5_mb_caption_is_cut_not_wrapped(tmp_path):
    import torch

    from tdpo.images import save_grid

    start = time.perf_counter()
    captions = ["a cat " * 900_000 + "\nreward = 1.0", "x" * 5_000_000]
    save_grid(torch.rand(2, 3, 16, 16), captions, tmp_path / "grid.png")
    assert time.perf_counter() - start < 5  # was about 17 s per MB per caption


# ------------------------------------------------------------------------------------------
# 8. Silently accepted values (the YAML and range cases are in the table above).


def test_rewards_near_5e37_are_logged_not_null(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    args = eval_on_train_args(
        tiny_pipeline_dir,
        tiny_clip_dir,
        tmp_path,
        "huge",
        **{"train.epochs": 1, "eval.every": 0, "reward.name": f"{REWARDS}:huge"},
    )
    result = run_cli(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = read_metrics(tmp_path / "huge")
    assert row["nonfinite_rewards"] == 0
    assert row["reward_mean"] == pytest.approx(5.05e37, rel=0.01)
    assert row["reward_std"] is not None


def test_output_dir_with_a_tilde_is_expanded(tmp_path):
    import subprocess
    import sys

    from tests.fixtures.processes import REPO, cli_env

    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", "train", "--output-dir", "~/runs"]
        + ["--set", "run_name=x", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**cli_env(), "HOME": str(home)},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"# run directory: {home}/runs/x" in result.stdout


# ------------------------------------------------------------------------------------------
# 9. Named right and found early.


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("wandb") is not None, reason="wandb installed"
)
def test_missing_wandb_is_log_wandb_before_loading(ws, tmp_path):
    result = run_cli(ws.train(tmp_path, **{"log.wandb": True}))
    assert_one_line_error(result, "log.wandb=True", "pip install tdpo[wandb]")
    assert not any(tmp_path.iterdir())
    assert "run directory:" not in result.stdout


def test_the_resume_message_names_every_field_a_resume_may_change(ws, tmp_path):
    import shutil

    shutil.copytree(ws.runs / "run", tmp_path / "run")
    result = run_cli(["train", "--resume", str(tmp_path / "run"), "--set", "seed=3"])
    assert_one_line_error(result, "seed=3", "train.epochs, log.*, checkpoint.*, eval.*")


# ------------------------------------------------------------------------------------------
# 10. Security: the report follows no symlink out of a run and writes no cache under $HOME;
#     a plug-in reward's package is not imported (its __init__ not run) to check its name.


def _report(args: list[str], home: Path):
    import subprocess
    import sys

    from tests.fixtures.processes import REPO, cli_env

    env = {**cli_env(), "HOME": str(home)}
    env.pop("MPLCONFIGDIR", None)
    return subprocess.run(
        [sys.executable, "-m", "tdpo.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


@pytest.fixture()
def fake_run(tmp_path):
    from tests.fixtures.fake_runs import RUNS, write_run

    return write_run(tmp_path / "runs", "tdpo-r-s0", RUNS["tdpo-r-s0"])


def test_report_copies_no_symlinked_sample_and_writes_nothing_under_home(fake_run, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG top secret bytes")
    (fake_run / "samples" / "epoch_0009.png").symlink_to(secret)
    home = tmp_path / "home"
    home.mkdir()
    result = _report([str(fake_run)], home)
    assert result.returncode == 0, result.stderr[-3000:]
    copied = [p for p in (fake_run / "report").rglob("*") if p.is_file()]
    assert copied and not [p for p in copied if b"top secret" in p.read_bytes()]
    assert not [p for p in (fake_run / "report").rglob("epoch_0009.png")]
    assert not any(home.iterdir()), "the report wrote under $HOME"


def test_report_refuses_a_symlinked_report_folder_and_config(fake_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (fake_run / "report").symlink_to(elsewhere)
    result = _report([str(fake_run)], tmp_path)
    assert_one_line_error(result, "--out", "symbolic link")
    assert not any(elsewhere.iterdir())
    (fake_run / "report").unlink()
    outside = tmp_path / "outside.yaml"
    (fake_run / "config.yaml").rename(outside)
    (fake_run / "config.yaml").symlink_to(outside)
    assert_one_line_error(_report([str(fake_run)], tmp_path), "RUN_DIR", "config.yaml", "symlink")


def test_report_replaces_an_earlier_report_and_refuses_other_folders(fake_run, tmp_path):
    assert _report([str(fake_run)], tmp_path).returncode == 0
    (fake_run / "report" / "stale.txt").write_text("from the earlier report")
    assert _report([str(fake_run)], tmp_path).returncode == 0
    assert not (fake_run / "report" / "stale.txt").exists()
    assert (fake_run / "report" / "index.html").is_file()
    assert not [p for p in fake_run.iterdir() if p.name.startswith(".report")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = _report([str(fake_run), "--out", str(mine)], tmp_path)
    assert_one_line_error(result, "--out", "not a tdpo report")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


REPORT_CASES = [
    ("config-list", {"config.yaml": b"- 1\n- 2\n"}, ["RUN_DIR", "mapping"]),
    ("config-scalar", {"config.yaml": b"42\n"}, ["RUN_DIR", "mapping"]),
    ("config-binary", {"config.yaml": b"seed: 0\n\xff\n"}, ["RUN_DIR", "UTF-8"]),
    (
        "metrics-json-list",
        {"metrics.jsonl": b'{"epoch": 1}\n[1, 2]\n'},
        ["metrics.jsonl:2", "list"],
    ),
]


@pytest.mark.parametrize(("name", "files", "texts"), REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_bad_run_files_are_one_line(name, files, texts, fake_run, tmp_path):
    for rel, data in files.items():
        (fake_run / rel).write_bytes(data)
    assert_one_line_error(_report([str(fake_run)], tmp_path), *texts)
    assert not (fake_run / "report").exists()


def test_report_out_that_is_a_file_is_one_line(fake_run, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    result = _report([str(fake_run), "--out", str(tmp_path / "a-file")], tmp_path)
    assert_one_line_error(result, "--out", "not a folder")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_plugin_package_is_not_imported_to_check_its_name(ws, tmp_path):
    import subprocess
    import sys

    from tests.fixtures.processes import REPO, cli_env

    package = tmp_path / "plugins" / "evilpkg"
    package.mkdir(parents=True)
    marker = tmp_path / "init-ran"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    args = ws.train(tmp_path / "out", "--reward", "evilpkg.nope:make")
    env = {**cli_env(), "PYTHONPATH": f"{REPO}:{tmp_path / 'plugins'}"}
    result = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert_one_line_error(result, "reward.name", "evilpkg.nope", "cannot find the module")
    assert not marker.exists(), "checking the name ran the package's __init__"


def test_report_into_the_current_empty_folder(fake_run, tmp_path):
    """`--out .` in an empty folder (found by the fuzz test: renaming "." failed)."""
    import subprocess
    import sys

    from tests.fixtures.processes import cli_env

    here = tmp_path / "here"
    here.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", "report", str(fake_run), "--out", "."],
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(), "HOME": str(tmp_path)},
        cwd=here,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (here / "index.html").is_file()
