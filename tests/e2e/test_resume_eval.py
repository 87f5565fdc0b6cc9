"""A run always ends evaluated, also when resumed to more epochs, and a resume refreshes the
run's report (issue 13)."""

from __future__ import annotations

import html

from tdpo.cli import main
from tdpo.tracking import read_metrics
from tdpo.verdict import judge

SMALL = {
    "sample.samples_per_epoch": 8,
    "sample.batch_size": 8,
    "sample.prompts_per_epoch": 2,
    "sample.num_steps": 4,
    "train.batch_size": 4,
    "eval.every": 4,  # neither epoch 1 nor epoch 2 is a multiple: only "the last" evaluates them
    "eval.prompts_per_set": 2,
    "eval.seeds_per_prompt": 1,
    "reward.panel": "[shapes_gold]",
    "log.tensorboard": False,
}


def _evaluated(run) -> list[int]:
    return [r["epoch"] for r in read_metrics(run) if "eval/unseen/shapes_gold" in r]


def test_the_last_epoch_is_evaluated_and_a_resume_refreshes_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(tmp_path), "--set", "run_name=run", "--set"]
    args += ["train.epochs=1"]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert _evaluated(run) == [0, 1]
    assert main(["report", str(run)]) == 0
    index = run / "report" / "index.html"
    first = index.read_text()
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert _evaluated(run) == [0, 1, 2]
    assert "held-out unseen (epoch 2/2)" in out
    assert f"report refreshed with the resumed epochs: {index}" in out
    refreshed = index.read_text()
    assert refreshed != first
    verdict = judge([read_metrics(run)], "shapes_aesthetic")
    assert verdict.conclusion and f"<b>{html.escape(verdict.conclusion)}</b>" in refreshed
    assert "epoch 2" in refreshed


def test_a_resume_without_a_report_writes_none(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(tmp_path), "--set", "run_name=run"]
    for key, value in {**SMALL, "train.epochs": 1, "eval.every": 0}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert "report" not in {p.name for p in run.iterdir()}
    assert "report refreshed" not in capsys.readouterr().out
