"""Property-based fuzzing of the five commands (issue 14): ``tdpo train | sample | eval | report |
sweep`` with arbitrary arguments, and ``--resume`` / ``report`` of run folders holding arbitrary
``config.yaml``, ``metrics.jsonl`` and checkpoint manifests.

Every example runs ``tdpo.cli.main`` in this process with model loading stubbed out (the
Trainer, the pipeline loader and a sweep's runs): what is fuzzed is everything a command does
before it loads a model. Each must exit 0, 2 or 3 (or reach the point where it would load),
print exactly one line on stderr when it exits 2, never a traceback, and change no file that
existed before (the user's files and the runs it reads). Bounded: a few dozen examples per test,
a few seconds each on 2 cores (``make test`` runs it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tdpo.config import iter_fields
from tests.fixtures.adversarial import snapshot
from tests.fixtures.factories import as_set_args, tiny_overrides

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEYS = [name for name, *_ in iter_fields()]


class WouldLoad(Exception):
    """Raised by the stubs where a command would load a model: the checks before passed."""


# Argument text as a shell passes it: no NUL; undecodable bytes arrive as lone surrogates
# (Python's surrogateescape), so those are included.
ARG_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=24,
)
NUMBERS = st.sampled_from(
    ["0", "-1", "1", "3", "1e308", "nan", "inf", "-inf", "1000000000000", "0.5", "", ","]
)


class Sandbox:
    """user/ (the user's files: never changed), runs/ (runs the commands read), out/ (scratch:
    outputs go there, and the current directory is out/cwd)."""

    def __init__(self, root: Path, pipeline_dir: Path, clip_dir: Path):
        from tests.fixtures.bad_inputs import write_fake_runs
        from tests.fixtures.fake_runs import RUNS, write_run

        self.root, self.pipeline, self.clip = root, pipeline_dir, clip_dir
        user = root / "user"
        (user / "samples").mkdir(parents=True)
        (user / "config.yaml").write_text("train:\n  epochs: 2\n")
        (user / "notes.txt").write_text("my notes\n")
        (user / "prompts.txt").write_text("a cat\na dog\n")
        (user / "binary.bin").write_bytes(b"\xff\xfe\x00\x01 not text")
        (user / "samples" / "epoch_0001.png").write_bytes(b"my picture")
        (user / "spec.yaml").write_text(
            "methods: {tdpo-r: {preset: tdpo-r}}\nrewards: [jpeg_compressibility]\nseeds: [0]\n"
        )
        self.user = user
        self.runs = root / "runs"
        write_run(self.runs, "tdpo-r-s0", RUNS["tdpo-r-s0"])
        write_fake_runs(root / "resumable", pipeline_dir, clip_dir)
        self.out = root / "out"
        self.paths = [
            str(user / "config.yaml"),
            str(user / "notes.txt"),
            str(user / "prompts.txt"),
            str(user / "binary.bin"),
            str(user / "spec.yaml"),
            str(user),
            str(user / "samples"),
            str(user / "notes.txt" / "x"),
            str(self.runs / "tdpo-r-s0"),
            str(self.runs),
            "{out}/new",
            "{out}/new/sub/e.json",
            "{out}/run",
            "/proc/x",
            "/dev/null",
            "~",
            "..",
            ".",
            "",
            str(pipeline_dir),
        ]

    def reset_out(self) -> Path:
        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "cwd").mkdir(parents=True)
        shutil.copytree(self.root / "resumable" / "run", self.out / "run")
        return self.out

    def guarded(self) -> dict[str, str]:
        """Everything outside out/ except the report folders a report run may (re)write."""
        found = snapshot(self.root, skip=(self.out,))
        return {k: v for k, v in found.items() if "/report" not in k and "/.report" not in k}


@pytest.fixture(scope="module")
def sandbox(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("fuzz-cli"), tiny_pipeline_dir, tiny_clip_dir)


def run_main(argv: list[str], sandbox: Sandbox) -> tuple[int | str, str, str]:
    """``tdpo.cli.main(argv)`` with the model loaders stubbed, in out/cwd, stdout and stderr
    encoded as a terminal does (UTF-8; strict for stdout, backslashreplace for stderr).
    Returns (exit code or "loads", stdout, stderr)."""
    import tdpo.policy
    import tdpo.sweep
    import tdpo.trainers.loop
    from tdpo.cli import main

    def would_load(*args, **kwargs):
        raise WouldLoad()

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(
        err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True
    )
    cwd = os.getcwd()
    env = dict(os.environ)
    stubs = [
        mock.patch.object(tdpo.trainers.loop, "Trainer", would_load),
        mock.patch.object(tdpo.policy, "load_pipeline", would_load),
        mock.patch.object(tdpo.sweep, "train", lambda *a, **k: 0),
    ]
    try:
        os.chdir(sandbox.out / "cwd")
        with contextlib.ExitStack() as stack:
            for stub in stubs:
                stack.enter_context(stub)
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
            try:
                code: int | str = main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code if isinstance(exit_.code, int) else 2
            except WouldLoad:
                code = "loads"
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    return code, out_bytes.getvalue().decode("utf-8"), err_bytes.getvalue().decode("utf-8")


def check(argv: list[str], sandbox: Sandbox) -> None:
    before = sandbox.guarded()
    code, stdout, stderr = run_main(argv, sandbox)
    note = f"argv={argv!r}\nexit={code!r}\nstderr={stderr[-2000:]}"
    assert code in (0, 2, 3, "loads"), note
    assert "Traceback" not in stderr and "Traceback" not in stdout, note
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tdpo"), note
    after = sandbox.guarded()
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"changed or removed: {changed}\n{note}"
    # New files only inside a new folder (a run folder the command created, e.g. under a
    # user's --output-dir), never loose among the user's files.
    for path in set(after) - set(before):
        parts = Path(path).parts
        first_new = next(i for i in range(len(parts)) if str(Path(*parts[: i + 1])) not in before)
        assert after[str(Path(*parts[: first_new + 1]))] == "dir", f"new file {path}\n{note}"


def _path(sandbox: Sandbox):
    return st.sampled_from(sandbox.paths).map(lambda p: p.replace("{out}", str(sandbox.out)))


def _value(sandbox: Sandbox):
    return st.one_of(ARG_TEXT, NUMBERS, _path(sandbox))


def _mutations(sandbox: Sandbox, flags: list[str]):
    """A few extra arguments: a flag with a value, a --set of a real or junk key, or junk."""
    flag = st.tuples(st.sampled_from(flags), _value(sandbox)).map(list)
    setting = st.tuples(
        st.just("--set"),
        st.tuples(st.one_of(st.sampled_from(KEYS), ARG_TEXT), _value(sandbox)).map(
            lambda kv: f"{kv[0]}={kv[1]}"
        ),
    ).map(list)
    junk = st.lists(st.one_of(ARG_TEXT, st.sampled_from(flags)), max_size=2)
    return st.lists(st.one_of(flag, setting, junk), max_size=3).map(
        lambda parts: [a for part in parts for a in part]
    )


def _tiny_train(sandbox: Sandbox) -> list[str]:
    overrides = tiny_overrides(sandbox.pipeline, sandbox.clip, run_name="fuzz")
    return ["train", "--output-dir", str(sandbox.out), *as_set_args(overrides)]


TRAIN_FLAGS = ["--preset", "--config", "--model", "--reward", "--output-dir", "--resume"]
TRAIN_FLAGS += ["--set", "--dry-run"]
SAMPLER_FLAGS = ["--model", "--lora", "--prompt", "--prompts", "--seeds", "--steps"]
SAMPLER_FLAGS += ["--guidance", "--eta", "--batch-size", "--out"]
EVAL_FLAGS = [*SAMPLER_FLAGS, "--max-prompts", "--reward", "--device", "--grid"]


@SETTINGS
@given(data=st.data())
def test_train_arguments(data, sandbox):
    sandbox.reset_out()
    base = data.draw(
        st.sampled_from(
            [_tiny_train(sandbox), ["train"], ["train", "--resume", str(sandbox.out / "run")]]
        )
    )
    extra = data.draw(_mutations(sandbox, TRAIN_FLAGS))
    if "--dry-run" in extra and base == ["train"]:
        extra.remove("--dry-run")  # the shapes world's memory estimate: slow, covered elsewhere
    check([*base, *extra], sandbox)


@SETTINGS
@given(data=st.data())
def test_sample_and_eval_arguments(data, sandbox):
    sandbox.reset_out()
    command = data.draw(st.sampled_from(["sample", "eval"]))
    base = [command, "--model", str(sandbox.pipeline), "--prompt", "a cat", "--steps", "2"]
    base += ["--out", str(sandbox.out / ("e.json" if command == "eval" else "s"))]
    if command == "eval":
        base += ["--reward", "jpeg_compressibility"]
    flags = EVAL_FLAGS if command == "eval" else SAMPLER_FLAGS
    check([*base, *data.draw(_mutations(sandbox, flags))], sandbox)


@SETTINGS
@given(data=st.data())
def test_report_and_sweep_arguments(data, sandbox):
    sandbox.reset_out()
    command = data.draw(st.sampled_from(["report", "sweep"]))
    if command == "report":
        base = ["report", data.draw(_path(sandbox))]
        extra = data.draw(
            st.lists(st.one_of(_path(sandbox), st.just("--out"), ARG_TEXT), max_size=3)
        )
    else:
        spec = data.draw(st.sampled_from([str(sandbox.user / "spec.yaml"), *sandbox.paths]))
        base = ["sweep", spec.replace("{out}", str(sandbox.out)), "--out", str(sandbox.out / "sw")]
        flags = ["--preset", "--out", "--shard", "--dry-run", "--no-report", "--report-only"]
        extra = data.draw(_mutations(sandbox, flags))
    check([*base, *extra], sandbox)


# ---------------------------------------------------------------------------------------------
# The files of a run directory: config.yaml, metrics.jsonl, the checkpoint manifest.

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
metrics_lines = st.lists(
    st.one_of(
        st.builds(
            lambda epoch, value: json.dumps({"epoch": epoch, "reward_mean": value}),
            st.one_of(st.integers(-2, 5), json_scalars),
            json_scalars,
        ),
        json_values.map(json.dumps),
        st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
        st.just('{"epoch": 1, "reward_mean": 0.5'),
    ),
    max_size=4,
)
config_texts = st.one_of(
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(
        [
            b"train: {epochs: 2}\ntrain: {epochs: 3}\n",
            b"a: &a [1]\nb: *a\n",
            b"seed: !!python/object/apply:os.system [echo]\n",
            b"- 1\n- 2\n",
            b"42\n",
            b"",
        ]
    ),
)


@SETTINGS
@given(
    config=st.one_of(st.none(), config_texts),
    metrics=st.one_of(st.none(), metrics_lines),
    manifest=st.one_of(st.none(), json_values.map(lambda v: json.dumps(v).encode())),
    command=st.sampled_from(["resume", "report"]),
)
# Found by longer runs of this test: a row with "epoch": null, and rows without reward queries
# in a run whose config has no samples_per_epoch, broke the report's summary.
@example(
    config=None, metrics=['{"epoch": null, "reward_mean": 0}'], manifest=None, command="report"
)
@example(config=b"", metrics=['{"epoch": 0, "reward_mean": 0}'], manifest=None, command="report")
def test_run_folder_files(config, metrics, manifest, command, sandbox):
    out = sandbox.reset_out()
    run = out / "run"
    if config is not None:
        (run / "config.yaml").write_bytes(config)
    if metrics is not None:
        text = "\n".join(metrics) + ("\n" if metrics else "")
        (run / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
    if manifest is not None:
        (run / "checkpoints" / "epoch_000001" / "manifest.json").write_bytes(manifest)
    if command == "resume":
        argv = ["train", "--resume", str(run)]
    else:
        argv = ["report", str(run), "--out", str(out / "report")]
    check(argv, sandbox)
    assert sys.getrecursionlimit() >= 1000
